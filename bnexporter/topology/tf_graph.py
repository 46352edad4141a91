"""TensorFlow graphs (TF1 ``.meta`` MetaGraphDef, SavedModel functions) in the shared IR.

Pure protobuf wire decoding (:mod:`bnexporter.formats.protowire`): no TensorFlow, no
protobuf package. Variables are named as the TF bundle reader names TF1 Saver keys: the
variable op's name (``bn1/moving_mean``), found by following ``Identity`` /
``ReadVariableOp`` reads back to ``VariableV2`` / ``VarHandleOp``.

Only nodes reachable from a ``Placeholder`` become IR nodes (ops reading just a shape stop
the flow); ``BiasAdd`` folds into the conv / dense node it follows. Unknown ops become
``other``. A TF2 SavedModel's concrete function is first inlined into such a node list by
:mod:`tf_functions`, its variables named as the ``variables/`` bundle reader names them.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from bnexporter.errors import CheckpointError
from bnexporter.formats import protowire as pw
from bnexporter.topology import tf_functions
from bnexporter.topology.graph import Graph, Node
from bnexporter.topology.tf_functions import MAX_META
from bnexporter.topology.tf_nodes import TFNode, output_index, parse_node_def

_VAR_OPS = {"VariableV2", "Variable", "VarHandleOp", "VarIsInitializedOp"}
_READS = {"Identity", "ReadVariableOp", "Enter", "Snapshot", "Cast"}
_SIMPLE = {"Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Tanh": "tanh",
           "Elu": "activation", "Selu": "activation", "Softmax": "softmax",
           "LeakyRelu": "leaky_relu", "Add": "add", "AddV2": "add", "Mul": "mul",
           "Identity": "identity", "StopGradient": "identity", "Squeeze": "reshape",
           "Reshape": "reshape", "Pad": "pad", "StridedSlice": "reshape", "Slice": "reshape",
           "ExpandDims": "reshape"}
# ops reading only a tensor's shape: no value flows on from them
_SHAPE_OPS = {"Shape", "ShapeN", "Size", "Rank"}
# values of a Const read as axes / paddings / a concat axis (real ones: at most 8); a
# longer constant is no such thing, and decoding one of megabytes costs ~10x it
_MAX_CONST_INTS = 64


def _tensor_ints(raw: bytes, where: str) -> list[int] | None:
    if len(raw) > 16 * _MAX_CONST_INTS + 256:  # not even parsed (a copy of megabytes)
        return None
    t = pw.parse(raw, where)
    content = pw.get_bytes(t, 4, where)
    dtype = pw.get_int(t, 1, where=where)
    if content:
        if dtype == 3 and len(content) % 4 == 0:  # DT_INT32
            return list(struct.unpack(f"<{len(content) // 4}i", content))
        if dtype == 9 and len(content) % 8 == 0:  # DT_INT64
            return list(struct.unpack(f"<{len(content) // 8}q", content))
        return None
    out: list[int] = []
    for v in t.get(7, []) + t.get(10, []):
        if isinstance(v, int):
            out.append(v - (1 << 64) if v >= 1 << 63 else v)
        else:
            pos = 0
            while pos < len(v):
                n, pos = pw.read_varint(v, pos, where)
                out.append(n - (1 << 64) if n >= 1 << 63 else n)
    return out


def parse_graph_def(raw: bytes, where: str) -> list[TFNode]:
    return [parse_node_def(nd, where) for nd in pw.get_messages(pw.parse(raw, where), 1, where)]


def graph_from_meta(path: str) -> Graph | None:
    """The IR of a TF1 ``.meta`` MetaGraphDef, or None when it has no graph_def."""
    try:
        size = os.path.getsize(path)
        if size > MAX_META:
            raise CheckpointError(path, f"meta graph of {size} bytes exceeds {MAX_META}",
                                  "too_large")
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror}", "io") from None
    meta = pw.parse(raw, path)
    gd = pw.get_bytes(meta, 2, path)
    if gd is None:
        return None
    return graph_from_graph_def(parse_graph_def(gd, path), source="graph:meta")


def _base(inp: str) -> tuple[str, int]:
    name, _, idx = inp.partition(":")
    return name, output_index(idx)


def _window(value: Any) -> list[int]:
    """A 4-entry NHWC int list attribute (strides, dilations, ksize), else all ones: an
    attribute of another type (an int, a string) is not one to index."""
    ok = isinstance(value, list) and len(value) == 4
    return value if ok else [1, 1, 1, 1]


def _padding(value: Any) -> str:
    return value.decode("ascii", "replace").lower() if isinstance(value, bytes) else "valid"


def graph_from_graph_def(tf_nodes: list[TFNode], source: str = "graph:tf"  # noqa: C901
                         ) -> Graph:
    by = {n.name: n for n in tf_nodes}

    def var_of(inp: str, depth: int = 0) -> str | None:
        name, _ = _base(inp)
        n = by.get(name)
        if n is None or depth > 16:
            return None
        if n.op in _VAR_OPS:
            return n.name
        if n.op in _READS and n.inputs:
            return var_of(n.inputs[0], depth + 1)
        return None

    def const_ints(inp: str) -> list[int] | None:
        n = by.get(_base(inp)[0])
        if n is None or n.op != "Const":
            return None
        v = n.attrs.get("value")
        if isinstance(v, tuple) and v[0] == "tensor" and v[1] is not None:
            return _tensor_ints(v[1], "const")
        return None

    # activations: reachable from a Placeholder through data inputs
    order = _toposort(tf_nodes, by)
    active: set[str] = set()
    ir: dict[str, dict[str, Any]] = {}   # TF node -> IR node spec (mutable until the end)
    alias: dict[str, str] = {}           # TF node -> IR node name holding its output
    out: list[str] = []

    def src(inp: str) -> str | None:
        name, idx = _base(inp)
        if name not in active:
            return None
        if idx != 0 and by[name].op.startswith("FusedBatchNorm"):
            return None
        return alias.get(name)

    def emit(name: str, op: str, ins: list[str], params: dict[str, str] | None = None,
             attrs: dict[str, Any] | None = None) -> None:
        ir[name] = {"op": op, "inputs": ins, "params": dict(params or {}),
                    "attrs": dict(attrs or {})}
        alias[name] = name
        out.append(name)

    for n in order:
        if n.op == "Placeholder":
            active.add(n.name)
            emit(n.name, "input", [], attrs={"shape": None})
            continue
        data = [i for i in n.inputs if _base(i)[0] in active]
        if not data or n.op in _SHAPE_OPS:
            continue
        active.add(n.name)
        ins = [s for s in (src(i) for i in n.inputs) if s]
        first = src(n.inputs[0]) if n.inputs else None
        if n.op.startswith("FusedBatchNorm"):
            params = {}
            for role, inp in zip(("gamma", "beta", "mean", "var"), n.inputs[1:5]):
                v = var_of(inp)
                if v:
                    params[role] = v
            eps = n.attrs.get("epsilon")
            emit(n.name, "bn", [first] if first else [], params,
                 {"eps": float(eps) if isinstance(eps, float) else 1e-3, "axis": -1})
        elif n.op in ("Conv2D", "DepthwiseConv2dNative"):
            kernel = var_of(n.inputs[1]) if len(n.inputs) > 1 else None
            strides = _window(n.attrs.get("strides"))
            dil = _window(n.attrs.get("dilations"))
            attrs: dict[str, Any] = {
                     "stride": (strides[1], strides[2]), "dilation": (dil[1], dil[2]),
                     "padding": _padding(n.attrs.get("padding")), "groups": 1}
            if n.op == "DepthwiseConv2dNative":
                attrs["depthwise"] = True
            emit(n.name, "conv", [first] if first else [],
                 {"kernel": kernel} if kernel else {}, attrs)
        elif n.op == "MatMul":
            kernel = var_of(n.inputs[1]) if len(n.inputs) > 1 else None
            if kernel and first:
                emit(n.name, "dense", [first], {"kernel": kernel})
            else:
                emit(n.name, "other", ins, attrs={"name": n.op})
        elif n.op == "BiasAdd" and len(n.inputs) > 1 and first \
                and ir.get(first, {}).get("op") in ("conv", "dense") \
                and "bias" not in ir[first]["params"] and var_of(n.inputs[1]):
            ir[first]["params"]["bias"] = var_of(n.inputs[1])
            alias[n.name] = first
        elif n.op in ("MaxPool", "AvgPool"):
            k = _window(n.attrs.get("ksize"))
            s = _window(n.attrs.get("strides"))
            attrs = {"pool": (k[1], k[2]), "stride": (s[1], s[2]),
                     "padding": _padding(n.attrs.get("padding"))}
            if n.op == "AvgPool":
                attrs["count_include_pad"] = False
            emit(n.name, "maxpool" if n.op == "MaxPool" else "avgpool",
                 [first] if first else [], attrs=attrs)
        elif n.op in ("Mean", "Max") and len(n.inputs) == 2:
            axes = const_ints(n.inputs[1])
            if axes is not None and sorted(a % 4 for a in axes) == [1, 2]:
                emit(n.name, "gap" if n.op == "Mean" else "gmp", [first] if first else [],
                     attrs={"keepdims": bool(n.attrs.get("keep_dims", False))})
            else:
                emit(n.name, "other", ins, attrs={"name": n.op})
        elif n.op in ("ConcatV2", "Concat"):
            axis_in = n.inputs[-1] if n.op == "ConcatV2" else n.inputs[0]
            axis = const_ints(axis_in)
            tens = [s for s in (src(i) for i in n.inputs) if s]
            if axis and len(axis) == 1:
                emit(n.name, "concat", tens, attrs={"axis": axis[0]})
            else:
                emit(n.name, "other", tens, attrs={"name": n.op})
        elif n.op in _SIMPLE:
            op = _SIMPLE[n.op]
            tens = ins if op in ("add", "mul") else ([first] if first else ins)
            if op in ("add", "mul") and len(tens) != 2:
                emit(n.name, "other", ins, attrs={"name": n.op})
                continue
            attrs = {"name": n.op.lower()} if op == "activation" else {}
            if op == "softmax":
                attrs = {"axis": -1}
            if op == "leaky_relu":
                alpha = n.attrs.get("alpha")
                attrs = {"alpha": float(alpha) if isinstance(alpha, float) else 0.2}
            if op == "pad":
                p = const_ints(n.inputs[1]) if len(n.inputs) > 1 else None
                if p is not None and len(p) == 8 and p[0] == p[1] == p[6] == p[7] == 0:
                    attrs = {"pads": ((p[2], p[3]), (p[4], p[5])), "value": 0.0}
                else:
                    op, attrs = "other", {"name": "Pad"}
            emit(n.name, op, tens, attrs=attrs)
        else:
            emit(n.name, "other", ins, attrs={"name": n.op})
    nodes = tuple(Node(name, ir[name]["op"], tuple(ir[name]["inputs"]), ir[name]["params"],
                       ir[name]["attrs"]) for name in out)
    return Graph(nodes, source=source, layout="nhwc", kernel_layout="hwio")


def _toposort(nodes: list[TFNode], by: dict[str, TFNode]) -> list[TFNode]:
    """Kahn's order over data inputs (a GraphDef need not be sorted); cycles (while
    loops) keep file order for the rest. One node per name (the last, as ``by``)."""
    nodes = list(by.values())
    indeg = {n.name: 0 for n in nodes}
    users: dict[str, list[str]] = {}
    for n in nodes:
        for i in n.inputs:
            b = _base(i)[0]
            if b in by and b != n.name:
                indeg[n.name] += 1
                users.setdefault(b, []).append(n.name)
    ready = [n.name for n in nodes if indeg[n.name] == 0]
    out: list[TFNode] = []
    done: set[str] = set()
    while ready:
        name = ready.pop()
        out.append(by[name])
        done.add(name)
        for u in users.get(name, []):
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    out.extend(n for n in nodes if n.name not in done)
    return out


# -- SavedModel ------------------------------------------------------------------------------

_KERAS_MODEL_IDS = ("_tf_keras_model", "_tf_keras_network", "_tf_keras_sequential")


def keras_config_from_metadata(raw: bytes, where: str) -> dict[str, Any] | None:
    """The Keras model config in a ``keras_metadata.pb`` (SavedMetadata: field 1 nodes,
    each SavedObject with 3 node_path, 4 identifier, 5 metadata JSON)."""
    import json
    for node in pw.get_messages(pw.parse(raw, where), 1, where):
        if pw.get_str(node, 3, where) != "root" or \
                pw.get_str(node, 4, where) not in _KERAS_MODEL_IDS:
            continue
        try:
            meta = json.loads(pw.get_str(node, 5, where))
        except ValueError:
            raise CheckpointError(where, "keras_metadata.pb: root metadata is not JSON"
                                  ) from None
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return _untuple({"class_name": meta.get("class_name"), "config": meta["config"]})
    return None


def _untuple(v: Any, depth: int = 0) -> Any:
    """SavedModel metadata writes tuples as ``{"class_name": "__tuple__", "items": [...]}``;
    the Keras config translator expects plain lists, as in ``.h5`` configs."""
    if depth > 200:
        raise CheckpointError("keras_metadata.pb", "model config nests too deeply", "too_large")
    if isinstance(v, dict):
        if v.get("class_name") == "__tuple__" and isinstance(v.get("items"), list):
            return [_untuple(x, depth + 1) for x in v["items"]]
        return {k: _untuple(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list):
        return [_untuple(x, depth + 1) for x in v]
    return v


def graph_from_saved_model(folder: str) -> Graph | dict[str, Any] | None:
    """A SavedModel folder's graph: the Keras model config dict when ``keras_metadata.pb``
    carries one (translate it with ``keras_ir``), else the graph of the concrete function
    in ``saved_model.pb`` with the most BNs (:mod:`tf_functions`), its variables named as
    the ``variables/`` bundle reader names them; None when neither says anything."""
    meta = os.path.join(folder, "keras_metadata.pb")
    if os.path.isfile(meta):
        try:
            with open(meta, "rb") as fh:
                raw = fh.read(MAX_META + 1)
        except OSError as exc:
            raise CheckpointError(meta, f"cannot read: {exc.strerror}", "io") from None
        if len(raw) > MAX_META:
            raise CheckpointError(meta, "keras_metadata.pb is too large", "too_large")
        config = keras_config_from_metadata(raw, meta)
        if config is not None:
            return config
    prefix = os.path.join(folder, "variables", "variables")
    if not os.path.isfile(os.path.join(folder, "saved_model.pb")) or \
            not os.path.isfile(prefix + ".index"):
        return None
    sm = tf_functions.read_saved_model(folder)
    if sm is None:
        return None
    where = os.path.join(folder, "saved_model.pb")
    if sm.has_objects:
        return _graph_from_functions(sm, tf_functions.bundle_names(sm, prefix), where)
    graph = graph_from_graph_def(sm.graph_nodes, source="graph:savedmodel")  # TF1 builder
    return graph if any(n.op == "bn" and "mean" in n.params for n in graph.nodes) else None


_TRIES = 3  # candidate functions translated in full


def _graph_from_functions(sm: tf_functions.SavedModel, names: dict[int, str], where: str
                          ) -> Graph | None:
    """Of the best few concrete functions, the graph with the most named BNs."""
    tensors = {tf_functions.var_node(oid): t for oid, t in names.items()}
    best, count = None, 0
    for name in tf_functions.candidates(sm)[:_TRIES]:
        g = graph_from_graph_def(tf_functions.flatten(sm, name, names, where),
                                 source="graph:savedmodel")
        nodes = tuple(Node(n.name, n.op, n.inputs, {r: tensors[v] for r, v in n.params.items()
                                                    if v in tensors}, n.attrs)
                      for n in g.nodes)
        found = sum(1 for n in nodes if n.op == "bn" and "mean" in n.params)
        if found > count:
            best, count = Graph(nodes, g.source, g.layout, g.kernel_layout), found
    return best
