"""From a graph (any source, one IR) to what each BatchNorm feeds and what feeds it.

The consumer of a BN is the first operation its output meets, looking through
operations that keep each channel's sign where it is (identity, dropout,
padding, max-pooling, reshapes, concatenation): a channel that is never
positive before them is never positive after them.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnexporter.topology.graph import Graph, Node

# ops that pass a channel's sign pattern through unchanged
_THROUGH = frozenset({"identity", "pad", "maxpool", "gmp", "flatten", "reshape", "concat"})
_KIND = {"relu": "relu", "relu6": "relu6", "add": "add", "conv": "linear", "dense": "linear",
         "bn": "linear", "avgpool": "linear", "gap": "linear", "output": "linear",
         "silu": "silu", "hardswish": "hardswish"}
_MAX_DEPTH = 64


@dataclass(frozen=True)
class BNContext:
    node: str
    consumer: str
    producer: str | None       # kernel tensor of the conv / dense computing the BN input
    producer_node: str | None
    after_activation: bool = False  # the BN normalises a ReLU's output (Conv -> ReLU -> BN)


def _activation_kind(node: Node) -> str:
    name = str(node.attrs.get("name", "")).lower()
    if name == "relu":
        slope = float(node.attrs.get("negative_slope") or 0.0)
        threshold = float(node.attrs.get("threshold") or 0.0)
        max_value = node.attrs.get("max_value")
        if slope or threshold:
            return "other"
        if max_value is None:
            return "relu"
        return "relu6" if float(max_value) == 6.0 else "other"
    if name in ("relu6", "silu", "hardswish"):
        return name
    if name in ("swish",):
        return "silu"
    if name in ("hard_swish", "hard_silu"):
        return "hardswish"
    if name in ("linear", "identity"):
        return "through"
    return "other"


def _kind(node: Node) -> str:
    if node.op in _THROUGH:
        return "through"
    if node.op == "activation":
        return _activation_kind(node)
    return _KIND.get(node.op, "other")


def consumer_kind(graph: Graph, name: str) -> str:
    """relu / relu6 / add / linear / silu / hardswish / other / unknown for one output."""
    nodes = graph.by_name()
    users = graph.consumers()
    kinds: set[str] = set()
    stack = [(u, 0) for u in users.get(name, [])]
    seen: set[str] = set()
    if not stack:
        return "linear"  # a model output
    while stack:
        user, depth = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        node = nodes.get(user)
        if node is None:
            kinds.add("other")
            continue
        kind = "unknown" if node.op == "other" else _kind(node)  # an op the source could not name
        if kind == "through" and depth < _MAX_DEPTH:
            nxt = users.get(user, [])
            if not nxt:
                kinds.add("linear")
            stack.extend((u, depth + 1) for u in nxt)
        else:
            kinds.add("other" if kind == "through" else kind)
    if "unknown" in kinds:
        return "unknown"
    if len(kinds) == 1:
        return kinds.pop()
    if kinds <= {"add", "linear"}:
        return "add"
    return "other"


def _producer(graph: Graph, node: Node) -> Node | None:
    nodes = graph.by_name()
    cur = node
    for _ in range(_MAX_DEPTH):
        if len(cur.inputs) != 1:
            return None
        src = nodes.get(cur.inputs[0])
        if src is None:
            return None
        if src.op in ("conv", "dense"):
            return src
        if src.op not in ("identity", "pad"):
            return None
        cur = src
    return None


def bn_contexts(graph: Graph) -> dict[str, BNContext]:
    """Per BN *mean tensor name* (the key that matches discovered layers)."""
    out: dict[str, BNContext] = {}
    for node in graph.nodes:
        if node.op != "bn" or "mean" not in node.params:
            continue
        prod = _producer(graph, node)
        src = graph.by_name().get(node.inputs[0]) if len(node.inputs) == 1 else None
        out[node.params["mean"]] = BNContext(
            node.name, consumer_kind(graph, node.name),
            prod.params.get("kernel") if prod is not None else None,
            prod.name if prod is not None else None,
            src is not None and src.op in ("relu", "relu6"))
    return out
