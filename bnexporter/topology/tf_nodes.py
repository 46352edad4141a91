"""TensorFlow NodeDefs (node_def.proto) decoded from the wire into small records.

Shared by the TF1 ``.meta`` GraphDef translation and the SavedModel function library;
attribute values keep only what the graph translation reads (ints, floats, bools,
strings, int lists, tensors as raw bytes, the function a call node runs).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from bnexporter.errors import CheckpointError
from bnexporter.formats import protowire as pw

# ints of one list attribute (strides, ksize: 4); every attribute of every node is
# decoded, and a packed list of megabytes would be ~10x that in Python ints
MAX_LIST = 1024


@dataclass
class TFNode:
    name: str
    op: str
    inputs: list[str]          # data inputs ("name" or "name:k"), control inputs dropped
    attrs: dict[str, Any] = field(default_factory=dict)


def output_index(text: str) -> int:
    """``k`` of an input ``name:k``: 0 unless ASCII digits; a number of thousands of digits
    is a huge index (an output that does not exist), not int()'s ValueError."""
    if not (text.isascii() and text.isdigit()):
        return 0
    return int(text) if len(text) <= 18 else 1 << 62


def _attr_value(raw: bytes, where: str) -> Any:
    f = pw.parse(raw, where)
    if 2 in f:
        return pw.get_bytes(f, 2, where)
    if 3 in f:
        return pw.get_int(f, 3, where=where, signed=True)
    if 4 in f:
        v = f[4][-1]
        # a float is fixed32; written as a wider varint it is no float (not an OverflowError)
        ok = isinstance(v, int) and v < 1 << 32
        return struct.unpack("<f", v.to_bytes(4, "little"))[0] if ok else None
    if 5 in f:
        return bool(pw.get_int(f, 5, where=where))
    if 1 in f:  # ListValue
        lst = pw.parse(pw.get_bytes(f, 1, where) or b"", where)
        ints: list[int] = []
        for v in lst.get(3, []):
            if len(ints) > MAX_LIST:
                return None
            if isinstance(v, int):
                ints.append(v)
            else:  # packed
                if len(v) > 10 * MAX_LIST:
                    return None
                pos = 0
                while pos < len(v):
                    n, pos = pw.read_varint(v, pos, where)
                    ints.append(n - (1 << 64) if n >= 1 << 63 else n)
        return ints
    if 8 in f:
        return ("tensor", pw.get_bytes(f, 8, where))
    if 10 in f:  # NameAttrList: the function a call node runs
        return ("func", pw.get_str(pw.parse(pw.get_bytes(f, 10, where) or b"", where), 1, where))
    return None


def parse_node_def(nd: pw.Fields, where: str) -> TFNode:
    """One NodeDef (node_def.proto), control inputs dropped."""
    attrs: dict[str, Any] = {}
    for entry in pw.get_messages(nd, 5, where):
        key = pw.get_str(entry, 1, where)
        val = pw.get_bytes(entry, 2, where)
        if val is not None:
            attrs[key] = _attr_value(val, where)
    inputs = []
    for v in nd.get(3, []):
        if not isinstance(v, bytes):
            raise CheckpointError(where, "NodeDef input is not a string")
        s = v.decode("utf-8", "replace")
        if not s.startswith("^"):
            inputs.append(s)
    return TFNode(pw.get_str(nd, 1, where), pw.get_str(nd, 2, where), inputs, attrs)
