"""safetensors: u64 header length, JSON header, one flat byte buffer.

The header is validated completely (sizes, offsets, no holes, no overlap)
before any tensor is trusted, so a file that lies about its layout is rejected
with the exact inconsistency.
"""

from __future__ import annotations

import json
import math
import struct
from typing import BinaryIO

from bnexporter.formats import dtypes
from bnexporter.formats.base import OffsetReader, RangeFile, TensorInfo
from bnexporter.formats.spec import Format, Incomplete

MAX_HEADER = 100_000_000

_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "F64": "float64", "I64": "int64", "U64": "uint64", "C64": "complex64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
_SUBBYTE = {"F4", "F6_E2M3", "F6_E3M2"}


def looks_like(head: bytes) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


class SafetensorsReader(OffsetReader):
    format = "safetensors"
    keeps_module_order = False

    def __init__(self, path: str):
        super().__init__(path)
        self._file = RangeFile(path)
        self._parse_or_close()

    def _parse(self) -> None:
        f = self._file
        assert f is not None
        if f.size < 8:
            raise self.error("file shorter than the 8-byte header length", "truncated", True)
        (n,) = struct.unpack("<Q", f.read(0, 8))
        if n > MAX_HEADER:
            raise self.error(f"header length {n} exceeds the 100 MB limit")
        if 8 + n > f.size:
            raise self.error(f"header of {n} bytes extends past end of file ({f.size} bytes)",
                             "truncated", True)
        try:
            header = json.loads(f.read(8, n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.error(f"header is not valid JSON ({exc.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise self.error("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise self.error("__metadata__ is not an object")
        self.metadata = {str(k): str(v) for k, v in (meta or {}).items()}
        spans = []
        for name, entry in header.items():
            if not isinstance(entry, dict):
                raise self.error(f"tensor {name!r}: entry is not an object")
            code = entry.get("dtype")
            shape = entry.get("shape")
            offs = entry.get("data_offsets")
            if not isinstance(code, str):
                raise self.error(f"tensor {name!r}: dtype {code!r} is not a string")
            if code in _SUBBYTE:
                raise self.error(f"tensor {name!r}: dtype {code} is not supported", "unsupported")
            if code not in _DTYPES:
                raise self.error(f"tensor {name!r}: unknown dtype {code!r}")
            if (not isinstance(shape, list) or len(shape) > 32
                    or not all(isinstance(d, int) and d >= 0 for d in shape)):
                raise self.error(f"tensor {name!r}: invalid shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) and o >= 0 for o in offs) or offs[0] > offs[1]):
                raise self.error(f"tensor {name!r}: invalid data_offsets {offs!r}")
            dtype = _DTYPES[code]
            expected = math.prod(shape) * dtypes.itemsize(dtype)
            if offs[1] - offs[0] != expected:
                raise self.error(f"tensor {name!r}: data_offsets span {offs[1] - offs[0]} bytes "
                                 f"but shape {shape} of {code} needs {expected}")
            spans.append((offs[0], offs[1], name))
            self._infos[name] = TensorInfo(name, tuple(shape), dtype)
            self._offsets[name] = 8 + n + offs[0]
        spans.sort()
        end = 0
        for b, e, name in spans:
            if b != end:
                what = "overlaps the previous tensor" if b < end else "leaves a hole before it"
                raise self.error(f"tensor {name!r} at byte {b} {what}")
            end = e
        if 8 + n + end != f.size:
            short = 8 + n + end > f.size
            raise self.error(
                f"header describes {8 + n + end} bytes but the file has {f.size}",
                "truncated" if short else "corrupt", retryable=short)
        step = self.metadata.get("step") or self.metadata.get("global_step")
        # int() refuses over 4300 digits; a real step counter fits in 18
        step = step.strip() if step is not None else ""
        if step.isascii() and step.isdigit() and len(step) <= 18:
            self.meta.step = int(step)
        self.meta.framework = "torch" if any(k.endswith("running_var") for k in self._infos) \
            else "generic"


def incomplete(path: str, fh: BinaryIO, head: bytes, size: int) -> Incomplete:
    """8 + header length + the largest data offset must equal the file size."""
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n > size:
        return "truncated", f"safetensors header ({n} bytes) extends past the end of the file"
    fh.seek(8)
    try:
        header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # not our business: the reader reports a corrupt header precisely
    if 8 + n + end > size:
        return "truncated", f"safetensors data ends at {8 + n + end} bytes, file has {size}"
    return None


FORMAT = Format("safetensors", looks_like, lambda p: looks_like(p.head), SafetensorsReader,
                incomplete, ("*.safetensors",))
