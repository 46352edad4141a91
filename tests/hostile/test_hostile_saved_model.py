"""Hostile TF2 SavedModel function libraries (``saved_model.pb``): decoding, inlining and
the BN folding must end in a CheckpointError or a graph, never in another exception,
and in time and memory bounded by the file, not by what it repeats or nests.

``saved_model.pb`` is written here on the wire (tests/hostile/builders.pb); the
translation runs as the topology finder runs it (tests/fuzz/targets.target_saved_model).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import pytest

from bnexporter.errors import CheckpointError
from bnexporter.formats import protowire as pw
from bnexporter.topology import tf_functions, tf_graph
from bnexporter.topology.graph import Graph
from bnexporter.topology.tf_bnfold import fuse_batchnorms
from bnexporter.topology.tf_nodes import TFNode, parse_node_def
from tests.hostile.builders import pb
from tests.hostile.test_hostile_archives import peak_mib, within

# -- saved_model.pb on the wire ------------------------------------------------------------


def node(name: str, op: str, inputs: Iterable[str] = (),
         attrs: Iterable[tuple[str, bytes]] = ()) -> bytes:
    """A NodeDef; ``attrs`` are (key, AttrValue bytes)."""
    out = pb(1, name.encode()) + pb(2, op.encode())
    out += b"".join(pb(3, i.encode()) for i in inputs)
    return out + b"".join(pb(5, pb(1, k.encode()) + pb(2, v)) for k, v in attrs)


def call(name: str, fn: str, inputs: Iterable[str] = ()) -> bytes:
    return node(name, "StatefulPartitionedCall", inputs, [("f", pb(10, pb(1, fn.encode())))])


def function(name: str, nodes: Sequence[bytes], inputs: Sequence[tuple[str, int]] = (("x", 1),)
             ) -> bytes:
    sig = pb(1, name.encode()) + b"".join(pb(2, pb(1, a.encode()) + pb(3, t))
                                          for a, t in inputs)
    return pb(1, sig) + b"".join(pb(3, n) for n in nodes)


def saved_model(functions: Sequence[bytes], objects: Sequence[tuple[list, str | None]] = (),
                bound: Sequence[str] = ("main",)) -> bytes:
    """``objects``: ([(child id, edge name)], variable name or None) per SavedObject."""
    graph = pb(2, b"".join(pb(1, f) for f in functions))
    og = b""
    for children, var in objects:
        obj = b"".join(pb(1, pb(1, c) + pb(2, e.encode())) for c, e in children)
        og += pb(1, obj + (pb(7, pb(6, var.encode())) if var is not None else b""))
    og += b"".join(pb(2, pb(1, name.encode()) + pb(2, b"")) for name in bound)
    return pb(2, pb(1, pb(4, b"serve")) + pb(2, graph) + pb(7, og))


def translate(raw: bytes, name: str = "main") -> Graph:
    """What the topology finder does with a SavedModel's concrete function."""
    sm = tf_functions.parse_saved_model(raw, "saved_model.pb")
    assert sm is not None
    return tf_graph.graph_from_graph_def(
        tf_functions.flatten(sm, name, tf_functions.checkpoint_keys(sm), "saved_model.pb"))


def bn_body(extra: Sequence[bytes] = (), bn_attrs: Iterable[tuple[str, bytes]] = ()
            ) -> list[bytes]:
    return [node("bn", "FusedBatchNormV3", ["x", "g", "b", "m", "v"], bn_attrs),
            node("r", "Relu", ["bn"]), *extra]


# -- exceptions other than CheckpointError -------------------------------------------------

def test_output_index_of_thousands_of_digits():
    """``name:<5,000 digits>``: int() raised ValueError (Python's 4,300-digit limit)."""
    body = bn_body([node("y", "Relu", ["bn:" + "9" * 5000])])
    g = translate(saved_model([function("main", body)]))
    assert not next(n for n in g.nodes if n.name == "y").inputs  # no such output
    tf_graph.graph_from_graph_def([TFNode("x", "Placeholder", []),
                                   TFNode("y", "Relu", ["x:" + "7" * 5000])])


def test_float_attr_written_as_a_wide_varint():
    """AttrValue.f (fixed32) sent as a varint of 2**40: to_bytes(4) raised OverflowError."""
    attrs = [("epsilon", pb(4, 1 << 40))]
    g = translate(saved_model([function("main", bn_body(bn_attrs=attrs))]))
    assert [n.attrs["eps"] for n in g.nodes if n.op == "bn"] == [1e-3]  # the default


def test_const_float_val_as_a_wide_varint():
    """The folded BN's epsilon Const with float_val (field 5) as a varint past 32 bits."""
    const = ("tensor", pb(1, 1) + pb(5, 1 << 40))
    nodes = [TFNode("v", "VarHandleOp", []), TFNode("e", "Const", [], {"value": const}),
             TFNode("add", "AddV2", ["v", "e"]), TFNode("r", "Rsqrt", ["add"])]
    assert [n.op for n in fuse_batchnorms(nodes)] == ["VarHandleOp", "Const", "AddV2", "Rsqrt"]


@pytest.mark.parametrize("op,attrs", [
    ("Conv2D", [("strides", pb(3, 5))]),                     # an int, not a list
    ("Conv2D", [("dilations", pb(4, 0x3F800000))]),          # a float (1.0)
    ("Conv2D", [("padding", pb(2, b"\xff\xfeSAME"))]),        # not UTF-8
    ("DepthwiseConv2dNative", [("strides", pb(5, 1))]),      # a bool
    ("MaxPool", [("ksize", pb(3, 3))]),
    ("AvgPool", [("padding", pb(2, b"\x80"))]),
])
def test_window_attributes_of_the_wrong_type(op, attrs):
    """Attributes of another type than the op's: TypeError / UnicodeDecodeError before."""
    g = translate(saved_model([function("main", bn_body([node("c", op, ["r", "k"], attrs)]))]))
    assert any(n.name == "c" for n in g.nodes)


def test_bias_add_with_one_input():
    """A BiasAdd of one input after a conv: its bias input was indexed (IndexError)."""
    body = bn_body([node("c", "Conv2D", ["r", "k"]), node("ba", "BiasAdd", ["c"])])
    g = translate(saved_model([function("main", body)]))
    assert "bias" not in next(n for n in g.nodes if n.op == "conv").params


# -- time ----------------------------------------------------------------------------------

def test_duplicate_node_names_cost_linear_time():
    """8,000 nodes named "x" and 8,000 users of "x" (240 KB): each copy walked every user
    (64 M steps, ~20 s), in the function body order and in the graph's."""
    nodes = [node("x", "Relu", ["x_in"]) for _ in range(8000)]
    nodes += [node(f"y{i}", "Relu", ["x"]) for i in range(8000)]
    raw = saved_model([function("main", nodes, [("x_in", 1)])])
    with within(3):
        g = translate(raw)
    assert sum(n.name == "x" for n in g.nodes) == 1
    flat = [TFNode("p", "Placeholder", [])] + [TFNode("x", "Relu", ["p"])] * 8000 + [
        TFNode(f"y{i}", "Relu", ["x"]) for i in range(8000)]
    with within(3):
        assert sum(n.name == "x" for n in tf_graph.graph_from_graph_def(flat).nodes) == 1


def test_wide_node_inlined_many_times_is_refused():
    """A body whose one node has 200,000 inputs, called 5,000 times (840 KB): inlining
    copied 10**9 input references (minutes, gigabytes). The walk is bounded."""
    wide = function("h", [node("w", "Identity", ["q"] * 200_000)], [("q", 1)])
    main = function("main", [call(f"c{i}", "h", ["x"]) for i in range(5000)]
                    + bn_body())
    with within(10), pytest.raises(CheckpointError) as exc:
        translate(saved_model([wide, main]))
    assert exc.value.reason == "too_large"


def test_wide_call_node_walked_on_every_inlining_is_refused():
    """The call node itself carrying 200,000 inputs: not copied, but walked each time."""
    inner = function("g", [], [("q", 1)])
    mid = function("h", [call("c", "g", ["q"] * 200_000)], [("q", 1)])
    main = function("main", [call(f"c{i}", "h", ["x"]) for i in range(5000)] + bn_body())
    with within(10), pytest.raises(CheckpointError) as exc:
        translate(saved_model([inner, mid, main]))
    assert exc.value.reason == "too_large"


def test_many_rsqrt_sharing_one_wide_mul_cost_linear_time():
    """20,000 Rsqrt of one Add, all feeding one Mul of 20,000 inputs: each Rsqrt scanned
    the Mul's inputs (4 * 10**8 steps, ~36 s)."""
    eps = ("tensor", pb(1, 1) + pb(4, struct.pack("<f", 1e-3)))
    nodes = [TFNode("v", "VarHandleOp", []), TFNode("e", "Const", [], {"value": eps}),
             TFNode("add", "AddV2", ["v", "e"])]
    nodes += [TFNode(f"r{i}", "Rsqrt", ["add"]) for i in range(20_000)]
    nodes.append(TFNode("m", "Mul", [f"r{i}" for i in range(20_000)]))
    with within(3):
        assert len(fuse_batchnorms(nodes)) == len(nodes)


# -- memory --------------------------------------------------------------------------------

def test_deep_object_chain_keys_are_bounded():
    """A chain of 8,000 objects, each a variable (120 KB): the checkpoint key of each is
    its whole path, ~2 bytes per level, 64 MB in all (a 20k chain: 772 MB)."""
    objects = [([(i + 1, "a")], "v") for i in range(8000)] + [([], "v")]
    raw = saved_model([function("main", [])], objects)
    sm = tf_functions.parse_saved_model(raw, "saved_model.pb")
    assert sm is not None
    keys: dict[int, str] = {}
    assert peak_mib(lambda: keys.update(tf_functions.checkpoint_keys(sm))) < 24
    assert keys[1] == "a" + tf_functions._VALUE_SUFFIX  # short paths keep their names
    assert max(len(k) for k in keys.values()) <= tf_functions.MAX_KEY + 40


def test_long_constant_is_not_decoded_as_axes():
    """A Mean's axes Const of 8 MB int32: decoded into 2 M Python ints (~90 MB)."""
    content = struct.pack("<2000000i", *range(300, 2_000_300))
    const = ("tensor", pb(1, 3) + pb(4, content))
    nodes = [TFNode("p", "Placeholder", []), TFNode("a", "Const", [], {"value": const}),
             TFNode("m", "Mean", ["p", "a"])]
    graphs: list[Graph] = []
    assert peak_mib(lambda: graphs.append(tf_graph.graph_from_graph_def(nodes))) < 8
    assert [n.op for n in graphs[0].nodes] == ["input", "other"]


def test_long_list_attribute_is_not_decoded():
    """A packed int list attribute of 4 MB (2-byte varints): 2 M Python ints (~70 MB)."""
    packed = b"\xac\x02" * 2_000_000  # 300 each
    raw = node("c", "Conv2D", ["p", "k"], [("strides", pb(1, pb(3, packed)))])
    fields = pw.parse(raw, "n")
    nd: list[TFNode] = []
    assert peak_mib(lambda: nd.append(parse_node_def(fields, "n"))) < 24
    assert nd[0].attrs["strides"] is None
