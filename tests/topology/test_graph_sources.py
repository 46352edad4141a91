"""Graph sources (torch.export, TorchScript, module pickles, graph JSON, TF graphs) against
the frameworks' own truth: tests/fixtures/gen_graph_sources.py writes the files and, per BN,
the consumers taken from the framework's graph (fx node users / TF op consumers)."""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from bnexporter.errors import CheckpointError
from bnexporter.formats import open_reader
from bnexporter.topology import torch_graph as tg
from bnexporter.topology.graph import Graph

D = os.path.join(os.path.dirname(__file__), "..", "fixtures", "graph_sources")
PASS = {"identity", "pad"}


def bn_consumers(g: Graph) -> dict[str, list[str]]:
    """BN layer (module path / TF scope, from its mean tensor) -> sorted consumer ops,
    following users through identity / dropout / pad."""
    users, by = g.consumers(), g.by_name()

    def follow(name: str) -> list[str]:
        out: list[str] = []
        for u in users.get(name, []):
            out.extend(follow(u) if by[u].op in PASS else [by[u].op])
        return out
    out = {}
    for n in g.nodes:
        if n.op == "bn":
            mean = n.params["mean"]
            layer = mean.rsplit(".", 1)[0] if mean.endswith("running_mean") \
                else mean.rsplit("/", 1)[0]
            out[layer] = sorted(follow(n.name))
    return out


def truth(stem: str) -> dict[str, list[str]]:
    with open(os.path.join(D, f"{stem}.truth.json")) as fh:
        return json.load(fh)["bn"]


def reader_names(path: str) -> set[str]:
    r = open_reader(path)
    try:
        return set(r.names())
    finally:
        r.close()


NETS = ["resnetish", "seqnet"]


@pytest.mark.parametrize("net,kind", [("resnetish", "export"), ("resnetish", "traced"),
                                      ("seqnet", "export"), ("seqnet", "scripted"),
                                      ("seqnet", "traced")])
def test_torch_graph_consumers_match_fx(net: str, kind: str) -> None:
    if kind == "export":
        g = tg.graph_from_export(os.path.join(D, f"{net}.pt2"))
    else:
        g = tg.graph_from_torchscript(os.path.join(D, f"{net}_{kind}.pt"))
    assert g is not None and g.layout == "nchw" and g.kernel_layout == "oihw"
    assert bn_consumers(g) == truth(net)
    names = reader_names(os.path.join(D, f"{net}_sd.pt"))
    for n in g.nodes:
        if n.op in ("bn", "conv", "dense"):
            assert n.params and set(n.params.values()) <= names, n
        if n.op == "bn":
            assert set(n.params) == {"gamma", "beta", "mean", "var"}


def test_eps_is_read() -> None:
    for g in (tg.graph_from_export(os.path.join(D, "seqnet.pt2")),
              tg.graph_from_torchscript(os.path.join(D, "seqnet_scripted.pt")),
              tg.graph_from_torchscript(os.path.join(D, "seqnet_traced.pt")),
              tg.graph_from_module_tree(os.path.join(D, "seqnet_dict.pt"))):
        assert g is not None
        assert g.by_name()["bn_h"].attrs["eps"] == pytest.approx(1e-3)
        assert g.by_name()["stem.1"].attrs["eps"] == pytest.approx(1e-5)


def test_groups_and_stride_of_convs() -> None:
    for g in (tg.graph_from_export(os.path.join(D, "seqnet.pt2")),
              tg.graph_from_torchscript(os.path.join(D, "seqnet_traced.pt"))):
        assert g is not None
        assert g.by_name()["six.0"].attrs["groups"] == 8
    g = tg.graph_from_torchscript(os.path.join(D, "resnetish_traced.pt"))
    assert g is not None and g.by_name()["layer1.1.conv1"].attrs["stride"] == (2, 2)


@pytest.mark.parametrize("net,file", [("resnetish", "resnetish_full.pt"),
                                      ("seqnet", "seqnet_dict.pt")])
def test_module_tree_is_right_where_it_claims(net: str, file: str) -> None:
    path = os.path.join(D, file)
    g = tg.graph_from_module_tree(path)
    assert g is not None
    got, want = bn_consumers(g), truth(net)
    assert set(got) == set(want)
    for layer, cons in got.items():  # either the truth, or unknown ("other")
        assert cons == want[layer] or cons == ["other"], layer
    names = reader_names(path)
    for n in g.nodes:
        if n.op == "bn":
            assert set(n.params.values()) <= names
    certain = {k for k, v in got.items() if v == want[k]}
    if net == "resnetish":  # torchvision BasicBlocks are known; the custom stem is not
        assert certain == set(want) - {"bn1"}
    else:  # inside Sequentials: known unless the BN is the Sequential's last module
        assert certain == {"stem.1", "six.1", "mix.1"}


def test_module_tree_report() -> None:
    tree = tg.module_tree(os.path.join(D, "seqnet_dict.pt"))
    assert tree is not None and tree.cls == "gs_nets.SeqNet"
    rep = tg.module_report(tree)
    assert rep["bn_h"] == {"class": "torch.nn.modules.batchnorm.BatchNorm2d", "eps": 1e-3}
    assert [c.path for c in tree.child("stem").children] == ["stem.0", "stem.1", "stem.2"]


def test_other_files_are_not_graphs() -> None:
    assert tg.graph_from_export(os.path.join(D, "seqnet_sd.pt")) is None
    assert tg.graph_from_torchscript(os.path.join(D, "seqnet_sd.pt")) is None
    assert tg.graph_from_torchscript(os.path.join(D, "seqnet.truth.json")) is None
    assert tg.graph_from_module_tree(os.path.join(D, "seqnet_sd.pt")) is None


def test_graph_json_round_trip(tmp_path) -> None:
    g = tg.graph_from_torchscript(os.path.join(D, "resnetish_traced.pt"))
    assert g is not None
    out = str(tmp_path / "g.json")
    tg.write_graph_json(g, out)
    back = tg.graph_from_json(out)
    assert back.nodes == g.nodes and back.layout == "nchw" and back.source == g.source
    assert bn_consumers(back) == truth("resnetish")


@pytest.mark.parametrize("doc,msg", [
    ("[]", "format"),
    ('{"format": "bnexporter-graph", "version": 2, "nodes": []}', "version 2"),
    ('{"format": "bnexporter-graph", "version": 1, "nodes": []}', "non-empty"),
    ('{"format": "bnexporter-graph", "version": 1, "nodes": [{"name": "a", "op": "zap"}]}',
     "unknown op"),
    ('{"format": "bnexporter-graph", "version": 1, "nodes": [{"name": "a", "op": "relu", '
     '"inputs": ["b"]}]}', "not defined before"),
    ('{"format": "bnexporter-graph", "version": 1, "nodes": [{"name": "a", "op": "bn"}]}',
     "mean and var"),
    ('{"format": "bnexporter-graph", "version": 1, "layout": "ncwh", "nodes": []}', "layout"),
    ('{"format": "bnexporter-graph", "version": 1, "nodes": [{"name": "a", "op": "input"}, '
     '{"name": "a", "op": "relu"}]}', "twice"),
    ("{" * 100000, "JSON"),
    ("not json", "not JSON"),
])
def test_graph_json_is_strict(tmp_path, doc: str, msg: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(doc)
    with pytest.raises(CheckpointError) as exc:
        tg.graph_from_json(str(p))
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def _rewrite_zip(src: str, dst: str, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def test_torchscript_code_is_parsed_never_run(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = (f"import os\nos.system('touch {marker}')\n"
            f"__import__('os').system('touch {marker}')\n").encode()

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("code/__torch__/gs_nets.py"):
            body = data.replace(b"    stem = self.stem\n",
                                b"    _z = os.system('touch " + str(marker).encode()
                                + b"')\n    stem = self.stem\n")
            return evil + body
        return data
    dst = str(tmp_path / "evil.pt")
    _rewrite_zip(os.path.join(D, "seqnet_scripted.pt"), dst, edit)
    g = tg.graph_from_torchscript(dst)
    assert not marker.exists()
    assert g is not None and bn_consumers(g) == truth("seqnet")


def test_torchscript_garbage_code_is_an_error(tmp_path) -> None:
    dst = str(tmp_path / "bad.pt")
    _rewrite_zip(os.path.join(D, "seqnet_scripted.pt"), dst,
                 lambda n, d: b"class (:\n" if n.endswith("gs_nets.py") else d)
    with pytest.raises(CheckpointError):
        tg.graph_from_torchscript(dst)


def test_unknown_call_keeps_consumer_unknown(tmp_path) -> None:
    """A BN read through an unknown function is never called a ReLU's input."""
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("container/___torch_mangle_54.py") or (
                b"___torch_mangle_54.Sequential" in data and name.endswith(".py")
                and b"class Sequential" in data):
            return data.replace(b"return (_2).forward(input1, )",
                                b"return (_2).forward(torch.mystery(input1), )")
        return data
    dst = str(tmp_path / "mystery.pt")
    _rewrite_zip(os.path.join(D, "seqnet_scripted.pt"), dst, edit)
    g = tg.graph_from_torchscript(dst)
    assert g is not None
    assert bn_consumers(g)["stem.1"] == ["other"]


def test_export_garbage_json_is_an_error(tmp_path) -> None:
    dst = str(tmp_path / "bad.pt2")
    _rewrite_zip(os.path.join(D, "seqnet.pt2"), dst,
                 lambda n, d: d[: len(d) // 2] if n.endswith("models/model.json") else d)
    with pytest.raises(CheckpointError):
        tg.graph_from_export(dst)


def test_truncated_archive_is_an_error(tmp_path) -> None:
    src = os.path.join(D, "seqnet_traced.pt")
    dst = tmp_path / "cut.pt"
    dst.write_bytes(Path(src).read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        tg.graph_from_torchscript(str(dst))


@pytest.mark.parametrize("net", NETS)
def test_describe_output_matches_fx(net: str) -> None:
    """``describe`` (run by the generator where torch is installed) writes a graph
    description whose BN consumers equal the truth and whose params are state_dict keys."""
    g = tg.graph_from_json(os.path.join(D, f"{net}.describe.graph.json"))
    assert g.source == "describe:fx" and g.input_shape == (3, 16, 16)
    assert bn_consumers(g) == truth(net)
    names = reader_names(os.path.join(D, f"{net}_sd.pt"))
    assert all(set(n.params.values()) <= names for n in g.nodes)


def test_tf1_meta_consumers_match_tf() -> None:
    from bnexporter.topology import tf_graph
    g = tf_graph.graph_from_meta(os.path.join(D, "tf1_net.meta"))
    assert g is not None and g.layout == "nhwc"
    assert bn_consumers(g) == truth("tf1_net")
    names = reader_names(os.path.join(D, "tf1_net"))
    for n in g.nodes:
        if n.op in ("bn", "conv", "dense"):
            assert n.params and set(n.params.values()) <= names, n
        if n.op == "bn":
            assert set(n.params) == {"gamma", "beta", "mean", "var"}
            assert n.attrs["eps"] == pytest.approx(1e-3)
    assert g.by_name()["conv4/Conv2D"].params["bias"] == "conv4/bias"


@pytest.mark.parametrize("cut", [1, 7, 100, 1000, 20000])
def test_tf1_meta_truncated_is_an_error(tmp_path, cut: int) -> None:
    from bnexporter.topology import tf_graph
    raw = Path(D, "tf1_net.meta").read_bytes()
    p = tmp_path / "cut.meta"
    p.write_bytes(raw[:cut])
    with contextlib.suppress(CheckpointError):  # an error, or a graph: never a crash
        tf_graph.graph_from_meta(str(p))


@pytest.mark.parametrize("seed", range(20))
def test_tf1_meta_garbage_never_crashes(tmp_path, seed: int) -> None:
    import random

    from bnexporter.topology import tf_graph
    raw = bytearray(Path(D, "tf1_net.meta").read_bytes())
    rnd = random.Random(seed)
    for _ in range(20):
        raw[rnd.randrange(len(raw))] = rnd.randrange(256)
    p = tmp_path / "bad.meta"
    p.write_bytes(bytes(raw) if seed % 2 else bytes(rnd.randrange(256) for _ in range(4000)))
    with contextlib.suppress(CheckpointError):  # an error, or a graph: never a crash
        tf_graph.graph_from_meta(str(p))


def test_keras_savedmodel_metadata_gives_the_config() -> None:
    from bnexporter.topology import keras_ir, tf_graph
    d = os.path.join(D, "k2_savedmodel")
    cfg = tf_graph.graph_from_saved_model(d)
    assert isinstance(cfg, dict) and cfg["class_name"] == "Functional"
    r = open_reader(os.path.join(d, "variables", "variables.index"))
    try:
        g = keras_ir.keras_graph_ir(cfg, keras_ir.keras_tensors_of(r, cfg))
        names = set(r.names())
    finally:
        r.close()
    assert bn_consumers(g) == truth("k2_savedmodel")
    for n in g.nodes:
        if n.op == "bn":
            assert set(n.params) == {"gamma", "beta", "mean", "var"}
            assert set(n.params.values()) <= names


def test_savedmodel_without_keras_metadata_is_none(tmp_path) -> None:
    from bnexporter.topology import tf_graph
    assert tf_graph.graph_from_saved_model(str(tmp_path)) is None


def test_keras_metadata_garbage_is_an_error(tmp_path) -> None:
    from bnexporter.topology import tf_graph
    raw = Path(D, "k2_savedmodel", "keras_metadata.pb").read_bytes()
    (tmp_path / "keras_metadata.pb").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError):
        tf_graph.graph_from_saved_model(str(tmp_path))
