"""TF2 SavedModels without a Keras config (Keras 3 ``model.export``): the graph comes from
the function library in ``saved_model.pb``, its variables named as the bundle reader
names the ``variables/`` tensors. Checked against the framework's truth file."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from bnexporter.errors import CheckpointError
from bnexporter.formats.tf_bundle import TFBundleReader
from bnexporter.topology import tf_bnfold, tf_functions, tf_graph
from bnexporter.topology.graph import Graph
from bnexporter.topology.resolve import bn_contexts
from bnexporter.topology.tf_graph import graph_from_graph_def
from bnexporter.topology.tf_nodes import TFNode

D = os.path.join(os.path.dirname(__file__), "..", "fixtures", "topology")
SM = os.path.join(D, "k3_resnet_savedmodel")


def _truth() -> dict:
    with open(SM + ".graph.json") as fh:
        return json.load(fh)


def _graph(folder: str = SM) -> Graph:
    g = tf_graph.graph_from_saved_model(folder)
    assert isinstance(g, Graph)
    return g


@pytest.fixture(scope="module")
def reader():
    r = TFBundleReader(os.path.join(SM, "variables", "variables"))
    yield r
    r.close()


def _same_tensor(reader: TFBundleReader, name: str, key: str) -> bool:
    """``name`` (a reader tensor) holds the bundle key ``key``, or an exact copy of it."""
    if reader.checkpoint_keys.get(name) == key:
        return True
    other = next(n for n, k in reader.checkpoint_keys.items() if k == key)
    return bool(np.array_equal(reader.read_array(name), reader.read_array(other)))


def test_every_bn_has_the_true_consumer_and_producer(reader) -> None:
    g = _graph()
    ctx = bn_contexts(g)
    by_key = {reader.checkpoint_keys[mean]: c for mean, c in ctx.items()}
    layers = _truth()["layers"]
    assert len(ctx) == len(layers)
    by = g.by_name()
    for layer in layers:
        keys = [layer["tensors"]["mean"], *layer["tensor_aliases"]["mean"]]
        c = next(by_key[k] for k in keys if k in by_key)
        assert c.consumer == layer["consumer"], layer["bn"]
        assert c.producer is not None and c.producer_node is not None
        assert _same_tensor(reader, c.producer, layer["producer_tensor"]), layer["bn"]
        assert bool(by[c.producer_node].attrs.get("depthwise")) == \
            (layer["producer_kind"] == "depthwise")
        bn = by[c.node]
        assert bn.attrs["eps"] == pytest.approx(layer["eps"])
        for role in ("gamma", "mean", "var"):  # betas of the two add inputs are equal
            assert _same_tensor(reader, bn.params[role], layer["tensors"][role])


def test_params_are_the_tensors_the_reader_names_as_bn_layers(reader) -> None:
    names = set(reader.names())
    for n in _graph().nodes:
        assert set(n.params.values()) <= names
        if n.op == "bn":
            layer = n.params["mean"].rsplit("/", 1)[0]
            assert n.params == {"gamma": f"{layer}/gamma", "beta": f"{layer}/beta",
                                "mean": f"{layer}/moving_mean",
                                "var": f"{layer}/moving_variance"}


def test_scan_uses_the_saved_model_graph() -> None:
    from bnexporter.scan import ScanOptions, analyse_path
    report = analyse_path(SM, ScanOptions(bn_only=True))
    assert report.error is None
    truth = {t["bn"]: t["consumer"] for t in _truth()["layers"]}
    got = {layer.name: (layer.consumer, layer.consumer_source) for layer in report.bn_layers}
    assert got == {name: (c, "graph:savedmodel") for name, c in truth.items()}


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "sm"
    shutil.copytree(SM, dst)
    return dst


def test_truncated_saved_model_is_an_error_or_none(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    raw = Path(SM, "saved_model.pb").read_bytes()
    for cut in (0, 1, 7, len(raw) // 3, len(raw) // 2, len(raw) - 1):
        (d / "saved_model.pb").write_bytes(raw[:cut])
        try:
            got = tf_graph.graph_from_saved_model(str(d))
        except CheckpointError:
            continue
        assert got is None or isinstance(got, Graph)


def test_corrupted_saved_model_never_crashes_or_hangs(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    raw = bytearray(Path(SM, "saved_model.pb").read_bytes())
    rnd = random.Random(7)
    start = time.monotonic()
    for _ in range(40):
        bad = bytearray(raw)
        for _ in range(rnd.randrange(1, 8)):
            bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        (d / "saved_model.pb").write_bytes(bytes(bad))
        try:
            got = tf_graph.graph_from_saved_model(str(d))
        except CheckpointError:
            continue
        assert got is None or isinstance(got, Graph)
    assert time.monotonic() - start < 60


def test_missing_bundle_or_graph_is_none(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    shutil.rmtree(d / "variables")
    assert tf_graph.graph_from_saved_model(str(d)) is None


def _const(name: str, value: float) -> TFNode:
    tensor = bytes([0x08, 0x01, 0x22, 0x04]) + struct.pack("<f", value)  # dtype, content
    return TFNode(name, "Const", [], {"value": ("tensor", tensor)})


def test_unfused_batch_norm_without_scale_is_folded() -> None:
    """``tf.nn.batch_normalization(x, m, v, offset=b, scale=None)`` -> one BN."""
    nodes = [TFNode("x", "Placeholder", []),
             *(TFNode(v, "VarHandleOp", []) for v in ("m", "v", "b", "k")),
             TFNode("conv", "Conv2D", ["x", "k"]),
             _const("eps", 1e-5),
             TFNode("bn/add", "AddV2", ["v", "eps"]),
             TFNode("bn/Rsqrt", "Rsqrt", ["bn/add"]),
             TFNode("bn/mul_1", "Mul", ["conv", "bn/Rsqrt"]),
             TFNode("bn/mul_2", "Mul", ["m", "bn/Rsqrt"]),
             TFNode("bn/sub", "Sub", ["b", "bn/mul_2"]),
             TFNode("bn/add_1", "AddV2", ["bn/mul_1", "bn/sub"]),
             TFNode("relu", "Relu6", ["bn/add_1"])]
    g = graph_from_graph_def(tf_bnfold.fuse_batchnorms(nodes))
    by = g.by_name()
    bn = by["bn/add_1"]
    assert bn.op == "bn" and bn.inputs == ("conv",)
    assert dict(bn.params) == {"beta": "b", "mean": "m", "var": "v"}
    assert bn.attrs["eps"] == pytest.approx(1e-5)
    assert g.consumers()["bn/add_1"] == ["relu"] and g.consumers()["conv"] == ["bn/add_1"]


def test_arithmetic_that_is_not_a_batch_norm_stays() -> None:
    nodes = [TFNode("x", "Placeholder", []), TFNode("v", "VarHandleOp", []),
             _const("eps", 1e-3),
             TFNode("add", "AddV2", ["v", "eps"]), TFNode("r", "Rsqrt", ["add"]),
             TFNode("y", "Mul", ["x", "r"])]
    assert [n.op for n in tf_bnfold.fuse_batchnorms(nodes)] == \
        ["Placeholder", "VarHandleOp", "Const", "AddV2", "Rsqrt", "Mul"]


def test_calls_nest_no_deeper_than_the_bound() -> None:
    fns = {}
    for i in range(tf_functions.MAX_DEPTH + 3):
        callee = [TFNode("c", "StatefulPartitionedCall", ["x"],
                         {"f": ("func", f"f{i + 1}")})] if i < tf_functions.MAX_DEPTH + 2 else []
        fn = tf_functions.Function(f"f{i}", [("x", 1)], ["y"], {"y": "x"}, [], "<test>")
        fn._nodes = callee
        fns[fn.name] = fn
    inl = tf_functions._Inliner(fns, "<test>")
    with pytest.raises(CheckpointError):
        inl.inline("f0", "", {"x": "x"}, 0)


def test_call_fan_out_is_bounded() -> None:
    """Each function calls the next twice: 2**40 inlined calls unless counted."""
    fns = {}
    for i in range(41):
        calls = [TFNode(f"c{j}", "PartitionedCall", ["x"], {"f": ("func", f"f{i + 1}")})
                 for j in range(2)] if i < 40 else []
        fn = tf_functions.Function(f"f{i}", [("x", 1)], ["y"], {"y": "x"}, [], "<test>")
        fn._nodes = calls
        fns[fn.name] = fn
    start = time.monotonic()
    with pytest.raises(CheckpointError):
        tf_functions._Inliner(fns, "<test>").inline("f0", "", {"x": "x"}, 0)
    assert time.monotonic() - start < 30
