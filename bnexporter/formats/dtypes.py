"""Dtype names and decoding of raw little/big-endian bytes into numpy arrays.

Readers hand raw bytes and a canonical dtype name here; formats numpy cannot
represent natively (bfloat16, float8) are widened to float32 so analysis only
ever sees ordinary numpy dtypes.
"""

from __future__ import annotations

import numpy as np

# canonical name -> (itemsize in bytes, numpy dtype used to hold the raw bits)
_RAW: dict[str, tuple[int, str]] = {
    "float64": (8, "f8"),
    "float32": (4, "f4"),
    "float16": (2, "f2"),
    "bfloat16": (2, "u2"),
    "float8_e4m3fn": (1, "u1"),
    "float8_e5m2": (1, "u1"),
    "float8_e4m3fnuz": (1, "u1"),
    "float8_e5m2fnuz": (1, "u1"),
    "float8_e8m0fnu": (1, "u1"),
    "int64": (8, "i8"),
    "int32": (4, "i4"),
    "int16": (2, "i2"),
    "int8": (1, "i1"),
    "uint64": (8, "u8"),
    "uint32": (4, "u4"),
    "uint16": (2, "u2"),
    "uint8": (1, "u1"),
    "bool": (1, "?"),
    "complex64": (8, "c8"),
    "complex128": (16, "c16"),
}

FLOAT_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16"} | {k for k in _RAW if k.startswith("float8")}
)


def itemsize(dtype: str) -> int:
    try:
        return _RAW[dtype][0]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}") from None


def raw_code(dtype: str) -> str:
    """The numpy dtype code that holds a dtype's raw little-endian items."""
    return _RAW[dtype][1]


def is_supported(dtype: str) -> bool:
    return dtype in _RAW


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def finfo_limits(dtype: str) -> tuple[float, float]:
    """(largest finite, smallest positive normal) for a float dtype."""
    if dtype == "bfloat16":
        return 3.3895314e38, 1.1754944e-38
    if dtype.startswith("float8"):
        table = _f8_table(dtype)
        finite = np.abs(table[np.isfinite(table)])
        return float(finite.max()), float(finite[finite > 0].min())
    fi = np.finfo(np.dtype(_RAW[dtype][1]))
    return float(fi.max), float(fi.tiny)


def _f8_table(dtype: str) -> np.ndarray:
    """All 256 float8 values, decoded from the bit layout (no ml_dtypes needed)."""
    cached = _F8_CACHE.get(dtype)
    if cached is not None:
        return cached
    if dtype == "float8_e8m0fnu":
        codes = np.arange(256, dtype=np.float64)
        table = np.where(codes == 255, np.nan, np.exp2(codes - 127)).astype(np.float32)
        _F8_CACHE[dtype] = table
        return table
    exp_bits, man_bits = (4, 3) if "e4m3" in dtype else (5, 2)
    fnuz = dtype.endswith("fnuz")
    bias = (1 << (exp_bits - 1)) - 1 + (1 if fnuz else 0)
    out = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e = (code >> man_bits) & ((1 << exp_bits) - 1)
        m = code & ((1 << man_bits) - 1)
        if fnuz and code == 0x80:
            out[code] = np.nan
            continue
        if dtype == "float8_e4m3fn" and e == 15 and m == 7:
            out[code] = np.nan
            continue
        if dtype == "float8_e5m2" and e == 31:
            out[code] = sign * np.inf if m == 0 else np.nan
            continue
        if e == 0:
            val = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            val = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        out[code] = sign * val
    _F8_CACHE[dtype] = out
    return out


_F8_CACHE: dict[str, np.ndarray] = {}


def decode(buf: bytes | bytearray | memoryview | np.ndarray, dtype: str,
           big_endian: bool = False) -> np.ndarray:
    """Raw bytes -> 1-D array; bfloat16 and float8 widened to float32."""
    size, code = _RAW[dtype]
    raw = np.frombuffer(buf, dtype=np.dtype(code).newbyteorder(">" if big_endian else "<"))
    if big_endian and size > 1:
        raw = raw.astype(np.dtype(code).newbyteorder("="))
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype.startswith("float8"):
        return _f8_table(dtype)[raw]
    return raw
