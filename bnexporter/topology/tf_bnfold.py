"""``tf.nn.batch_normalization``'s unfused arithmetic folded back into one BN node.

Keras 3 ``model.export`` writes inference BN as ``x * inv + (beta - mean * inv)`` with
``inv = rsqrt(var + eps) [* gamma]`` instead of a ``FusedBatchNormV3``; the graph
translation only knows the fused op, so the whole pattern (and nothing less) is
replaced by one, carrying its epsilon and variables.
"""

from __future__ import annotations

import struct

from bnexporter.formats import protowire as pw
from bnexporter.topology.tf_nodes import TFNode

_PASS = {"Identity", "ReadVariableOp", "Cast", "Reshape", "Snapshot"}


def _through(by: dict[str, TFNode], ref: str, ops: set[str]) -> TFNode | None:
    n = by.get(ref.split(":")[0])
    for _ in range(8):
        if n is None or n.op not in ops or not n.inputs:
            return n
        n = by.get(n.inputs[0].split(":")[0])
    return None


def _var(by: dict[str, TFNode], ref: str) -> str | None:
    n = _through(by, ref, _PASS)
    return n.name if n is not None and n.op == "VarHandleOp" else None


def _const_float(by: dict[str, TFNode], ref: str) -> float | None:
    """A float32 / float64 scalar Const (the epsilon), else None."""
    n = _through(by, ref, {"Identity", "Cast"})
    v = n.attrs.get("value") if n is not None and n.op == "Const" else None
    if not (isinstance(v, tuple) and v[0] == "tensor" and v[1]):
        return None
    t = pw.parse(v[1], "const")
    dtype = pw.get_int(t, 1, where="const")
    if dtype not in (1, 2):
        return None
    fmt, width = ("<f", 4) if dtype == 1 else ("<d", 8)
    raw = pw.get_bytes(t, 4, "const")  # tensor_content
    if not raw:
        vals = t.get(5 if dtype == 1 else 6, [])  # float_val / double_val
        if not vals:
            return None
        last = vals[-1]
        if isinstance(last, int) and last >= 1 << (8 * width):
            return None  # a varint wider than the float (to_bytes: OverflowError)
        raw = last.to_bytes(width, "little") if isinstance(last, int) else last[-width:]
    return float(struct.unpack(fmt, raw)[0]) if len(raw) == width else None


def _users(users: dict[str, list[TFNode]], n: TFNode) -> list[TFNode]:
    return users.get(n.name, [])


def _other_input(n: TFNode, name: str) -> str | None:
    """The input of a binary op that is not ``name``."""
    if len(n.inputs) != 2:  # checked first: a wide node shared by many Rsqrts is quadratic
        return None
    rest = [i for i in n.inputs if i.split(":")[0] != name]
    return rest[0] if len(rest) == 1 else None


def _match_bn(r: TFNode, by: dict[str, TFNode], users: dict[str, list[TFNode]]
              ) -> tuple[TFNode, str] | None:
    """From one Rsqrt: the fused node replacing the final add, and the ``x * inv``
    node it makes redundant; None unless the whole pattern is there."""
    add = by.get(r.inputs[0].split(":")[0]) if r.inputs else None
    if add is None or add.op not in ("Add", "AddV2") or len(add.inputs) != 2:
        return None
    var, eps = _var(by, add.inputs[0]), _const_float(by, add.inputs[1])
    if var is None or eps is None:
        return None
    inv, gamma = r, ""
    scaled = _users(users, r)
    if len(scaled) == 1 and scaled[0].op == "Mul":
        g = _var(by, _other_input(scaled[0], r.name) or "")
        if g is not None:
            inv, gamma = scaled[0], g
    muls = _users(users, inv)
    if len(muls) != 2 or any(m.op != "Mul" for m in muls):
        return None
    others = [_other_input(m, inv.name) for m in muls]
    means = [_var(by, o) if o else None for o in others]
    if None in others or (means[0] is None) == (means[1] is None):
        return None
    k = 0 if means[0] is not None else 1
    mean, scale_x, x = means[k], muls[1 - k], others[1 - k]
    centred = _users(users, muls[k])
    if len(centred) != 1 or centred[0].op not in ("Sub", "Neg"):
        return None
    sub, beta = centred[0], ""
    if sub.op == "Sub":
        if len(sub.inputs) != 2 or sub.inputs[1].split(":")[0] != muls[k].name:
            return None
        beta = _var(by, sub.inputs[0]) or ""
        if not beta:
            return None
    out = _users(users, sub)
    if len(out) != 1 or out[0].op not in ("Add", "AddV2") or _users(users, scale_x) != out \
            or len(out[0].inputs) != 2 \
            or {i.split(":")[0] for i in out[0].inputs} != {scale_x.name, sub.name}:
        return None
    assert mean is not None and x is not None
    return TFNode(out[0].name, "FusedBatchNormV3", [x, gamma, beta, mean, var],
                  {"epsilon": eps}), scale_x.name


def fuse_batchnorms(nodes: list[TFNode]) -> list[TFNode]:
    """``x * inv + (beta - mean * inv)``, ``inv = rsqrt(var + eps) [* gamma]`` (what
    ``tf.nn.batch_normalization`` writes) -> one ``FusedBatchNormV3`` on ``x``."""
    by = {n.name: n for n in nodes}
    users: dict[str, list[TFNode]] = {}
    for n in nodes:
        for i in n.inputs:
            users.setdefault(i.split(":")[0], []).append(n)
    replace: dict[str, TFNode] = {}
    drop: set[str] = set()
    for r in nodes:
        got = _match_bn(r, by, users) if r.op == "Rsqrt" else None
        if got is not None:
            replace[got[0].name] = got[0]
            drop.add(got[1])
    return [replace.get(n.name, n) for n in nodes if n.name not in drop]
