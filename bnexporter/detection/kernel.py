"""The full-scan kernel: every per-tensor statistic from integer tests on bit patterns.

A float's magnitude bits (sign bit masked off) order like its value: for
non-negative IEEE floats, ``a < b`` iff ``bits(a) < bits(b)``, with +Inf above
every finite value and the NaNs above +Inf. So each statistic of
:class:`~bnexporter.detection.analysis.TensorStats` is an unsigned-integer
comparison against the bit pattern of its cut-off, in the tensor's own storage
width (16 bits for float16 / bfloat16, 32 for float32, 64 for float64):

- NaN / Inf: ``m >= INF``; huge: ``m > bits(H)``; exact zero: ``m == 0``;
- tiny, deep, subnormal, the two bands above the tiny limit L: ``m < bits(X)``
  for X = L, deep limit, smallest normal, 10 L, 100 L;
- negative: ``raw > SIGN`` (sign set, magnitude non-zero, minus the negative NaNs);
- max / min |w|: ``m.max()`` / ``m.min()`` (over the finite values).

Cut-offs are the limits rounded to float32 (float64 for float64 tensors): the
comparison numpy makes for a float32 array and a Python float (NEP 50), which is
what the previous float-domain ``TensorScan`` computed. For 16-bit dtypes the
bit cut-off is found by enumerating all 32,768 magnitudes, so it is exact by
construction.

Work is done in cache-sized pieces (``PIECE_BYTES`` of raw data, a few hundred
KB) on reused per-thread buffers, so every pass after the first reads from L2:
one masking pass writes ``m``; its max and one column-wise minimum over ``ROWS``
rows read it, and only the few columns holding a value below the
lowest needed cut-off (L, or 100 L with the bands) are gathered: every low count,
the zeros and min |w| come from those (:func:`_column_low`; a piece dense near
zero takes direct compare passes instead). NaN / Inf and huge are only counted
when the piece max says they exist. Filter sums of squares (conv / dense
kernels) use float32 squares summed per piece and accumulated in float64 (float64
squares for float64 tensors, and for float32 pieces whose magnitudes could overflow
or underflow float32 squares).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bnexporter.formats import dtypes
from bnexporter.formats.base import in_raw_buffer

# bytes of raw tensor data per piece: the raw piece, its masked copy and a bool
# mask stay inside a 1-2 MB L2 cache
PIECE_BYTES = 512 << 10

# float32 magnitudes whose squares stay normal and whose sums of squares over a
# piece cannot overflow float32 (2**-60 .. 2**50); outside, the piece uses float64
_SQ_LOW = 0x21800000   # bits(2**-60)
_SQ_HIGH = 0x58800000  # bits(2**50)


@dataclass(frozen=True)
class Spec:
    """Bit-pattern cut-offs of one (dtype, thresholds) pair in one storage width."""

    kind: str          # "u2f16", "u2bf16", "u4", "u8"
    bits: type         # numpy unsigned type of the storage
    sign: int
    mask: int
    inf: int
    huge: int          # m > huge  <=>  |w| > huge limit (finite)
    tiny: int          # m < tiny  <=>  |w| < tiny limit
    ten: int           # 10 L
    top: int           # 100 L
    deep: int          # 0: no deep band for this dtype
    small: int         # smallest normal


def _f32_bits(x: float) -> int:
    with np.errstate(over="ignore"):
        return int(np.float32(x).view(np.uint32))


def _f64_bits(x: float) -> int:
    return int(np.float64(x).view(np.uint64))


@lru_cache(maxsize=4)
def _magnitudes16(kind: str) -> np.ndarray:
    """Values (float64) of all 16-bit magnitude patterns 0 .. 0x7fff."""
    codes = np.arange(0x8000, dtype=np.uint16)
    if kind == "u2f16":
        return codes.view(np.float16).astype(np.float64)
    return (codes.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _cut16(kind: str, x: float, above: bool) -> int:
    """Bits B with ``m > B`` iff value > X32 (above) or ``m < B`` iff value < X32."""
    vals = _magnitudes16(kind)
    inf = 0x7C00 if kind == "u2f16" else 0x7F80
    finite = vals[:inf + 1]  # up to and including +Inf, ordered
    with np.errstate(over="ignore"):
        x32 = float(np.float32(x))
    if above:
        return int(np.searchsorted(finite, x32, side="right")) - 1
    return int(np.searchsorted(finite, x32, side="left"))


@lru_cache(maxsize=256)
def spec(dtype: str, kind: str, huge: float, tiny: float, deep: float, small: float) -> Spec:
    """Cut-offs for ``dtype`` stored as ``kind`` (limits from analysis.extreme_limits)."""
    edges = (tiny, 10.0 * tiny, 100.0 * tiny, deep, small)
    if kind == "u8":
        t, ten, top, dp, sm = (_f64_bits(e) for e in edges)
        return Spec(kind, np.uint64, 1 << 63, (1 << 63) - 1, 0x7FF0000000000000,
                    _f64_bits(huge), t, ten, top, dp if deep else 0, sm)
    if kind == "u4":
        t, ten, top, dp, sm = (_f32_bits(e) for e in edges)
        return Spec(kind, np.uint32, 1 << 31, (1 << 31) - 1, 0x7F800000,
                    _f32_bits(huge), t, ten, top, dp if deep else 0, sm)
    t, ten, top, dp, sm = (_cut16(kind, e, False) for e in edges)
    inf = 0x7C00 if kind == "u2f16" else 0x7F80
    return Spec(kind, np.uint16, 1 << 15, 0x7FFF, inf, _cut16(kind, huge, True),
                t, ten, top, dp if deep else 0, sm)


def kind_of(dtype: str) -> str | None:
    """Native bit-pattern kind of a float dtype; None for integers / bool / complex."""
    if dtype == "float32" or dtype.startswith("float8"):
        return "u4"   # float8 arrives decoded (or table-decoded) to float32 bits
    if dtype == "float64":
        return "u8"
    if dtype == "float16":
        return "u2f16"
    if dtype == "bfloat16":
        return "u2bf16"
    return None


def bits_value(kind: str, b: int) -> float:
    """The float value of magnitude bits ``b`` in ``kind``."""
    if kind == "u8":
        return float(np.uint64(b).view(np.float64))
    if kind == "u4":
        return float(np.uint32(b).view(np.float32))
    if kind == "u2f16":
        return float(np.uint16(b).view(np.float16))
    return float(np.uint32(b << 16).view(np.float32))


class _Scratch:
    """Per-thread reused buffers, grown on demand, never shrunk below a piece."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.overwrite = False  # see overwriting()

    def get(self, key: str, n: int, dt: type) -> np.ndarray:
        a = self.arrays.get(key)
        if a is None or a.size < n or a.dtype != dt:
            a = self.arrays[key] = np.empty(max(n, 1), dtype=dt)
        return a[:n]


_LOCAL = threading.local()


def scratch() -> _Scratch:
    s = getattr(_LOCAL, "scratch", None)
    if s is None:
        s = _LOCAL.scratch = _Scratch()
    return s


@contextmanager
def overwriting() -> Iterator[None]:
    """Within it (this thread), a piece that is the reader's own read buffer
    (``formats.base.raw_buffer``) may be masked in place: one write pass less and
    half the cache footprint. Only for callers that drop each piece once scanned
    (``scan._scan_tensor``), never for one that copies it afterwards (the
    refinement's kernel read)."""
    sc = scratch()
    before, sc.overwrite = sc.overwrite, True
    try:
        yield
    finally:
        sc.overwrite = before


@lru_cache(maxsize=8)
def _f8_bits_table(dtype: str) -> np.ndarray:
    return dtypes._f8_table(dtype).view(np.uint32).copy()


class BitKernel:
    """Accumulators of one float tensor over pieces of its storage bits."""

    def __init__(self, sp: Spec, filters: int, row: int, out_axis: int | None,
                 sumsq: np.ndarray | None, bands: bool = True, negative: bool = True):
        self.sp = sp
        # band1 / band2 and negative cost three of the ~seven passes: a caller that
        # needs them only in rare cases (scan._scan_tensor) switches them off
        self.bands, self.count_negative = bands, negative
        self.filters, self.row, self.out_axis, self.sumsq = filters, row, out_axis, sumsq
        self.nonfinite = self.huge = self.tiny = self.zero = 0
        self.deep = self.band1 = self.band2 = self.subnormal = self.negative = 0
        self.max_bits = 0
        self.min_bits: int | None = None

    # -- one piece -----------------------------------------------------------
    def piece(self, start: int, b: np.ndarray) -> None:
        """``b``: the raw bits of elements ``[start, start + b.size)`` (native order,
        at most a piece long; not modified, unless :func:`overwriting` allows it)."""
        sp = self.sp
        n = b.size
        if n == 0:
            return
        sc = scratch()
        # the negatives (and the negative NaNs) are counted on b after masking
        m = b if sc.overwrite and not self.count_negative and in_raw_buffer(b) \
            else sc.get("m" + sp.kind[:2], n, sp.bits)
        bl = sc.get("bool", n, np.bool_)
        np.bitwise_and(b, sp.mask, out=m)
        mx = int(m.max())
        neg = 0
        if self.count_negative:
            neg = int(np.count_nonzero(np.greater(b, sp.sign, out=bl)))
        bad = 0
        min_bits: int | None = None
        if mx >= sp.inf:  # rare: count NaN / Inf, then treat them as absent (zero them)
            if self.count_negative:  # negative NaNs are not < 0
                neg -= int(np.count_nonzero(np.greater(b, sp.sign | sp.inf, out=bl)))
            np.greater_equal(m, sp.inf, out=bl)
            bad = int(np.count_nonzero(bl))
            finite = m[~bl]
            if finite.size:
                min_bits = int(finite.min())
            np.copyto(m, 0, where=bl)
            mx = int(m.max())
        self.nonfinite += bad
        self.negative += neg
        if bad == n:
            return
        if mx > self.max_bits:
            self.max_bits = mx
        if mx > sp.huge:
            self.huge += int(np.count_nonzero(np.greater(m, sp.huge, out=bl)))
        low = None if bad else _column_low(m, self.sp.top if self.bands else self.sp.tiny)
        low_nonzero_min = self._low(m, bl, n, bad, min_bits) if low is None \
            else self._low_from(*low)
        if self.sumsq is not None:
            self._squares(start, m, mx, low_nonzero_min)

    def _low(self, m: np.ndarray, bl: np.ndarray, n: int, bad: int,
             min_bits: int | None) -> int | None:
        """Zero / tiny / deep / subnormal / band counts and min |w| of one piece.
        Returns the smallest non-zero magnitude when it lies below L (else None).

        Nested cut-offs, each one compare + count pass in cache, skipped once a count
        is 0. A piece without zeros takes min / deep / subnormal from the piece itself;
        otherwise only the values below L are compacted, and zero / deep / subnormal /
        min come from them.
        """
        sp = self.sp
        k10 = k1 = 0
        if self.bands:
            k100 = int(np.count_nonzero(np.less(m, sp.top, out=bl)))
            if k100:
                k10 = int(np.count_nonzero(np.less(m, sp.ten, out=bl)))
                if k10:
                    k1 = int(np.count_nonzero(np.less(m, sp.tiny, out=bl)))
        else:
            k1 = k10 = k100 = int(np.count_nonzero(np.less(m, sp.tiny, out=bl)))
        zeros, deep, sub, lowest = self._below(m, bl, n, k1) if k1 else (0, 0, 0, None)
        zeros -= bad  # the NaN / Inf values were zeroed: not zeros, not below any cut
        k1 -= bad
        k10 -= bad if k10 else 0
        k100 -= bad if k100 else 0
        self.zero += zeros
        self.tiny += k1 - zeros
        self.band1 += k10 - k1
        self.band2 += k100 - k10
        self.deep += deep
        self.subnormal += sub
        if zeros:
            self._note_min(0)
        elif min_bits is not None:
            self._note_min(min_bits)
        elif lowest is not None:
            self._note_min(lowest)
        else:
            self._note_min(int(m.min()))
        return lowest

    def _low_from(self, lo: int, sel: np.ndarray) -> int | None:
        """:meth:`_low` from a piece's minimum ``lo`` and ``sel``, a superset of its
        values below the largest cut-off (see :func:`_column_low`). Returns the
        smallest non-zero magnitude when it lies below L (else None)."""
        sp = self.sp
        if lo >= (sp.top if self.bands else sp.tiny):
            self._note_min(lo)
            return None
        k1 = int(np.count_nonzero(sel < sp.tiny))
        if self.bands:
            k100 = int(np.count_nonzero(sel < sp.top))
            k10 = int(np.count_nonzero(sel < sp.ten)) if k100 else 0
        else:
            k10 = k100 = k1
        zeros = 0 if lo else sel.size - int(np.count_nonzero(sel))
        lowest: int | None = None
        if k1 > zeros:  # non-zero values below L: the smallest, deep, subnormal
            nz = sel[(sel > 0) & (sel < sp.tiny)] if zeros or lo < sp.deep or lo < sp.small \
                else None
            lowest = lo if nz is None else int(nz.min())
            if nz is not None:
                if sp.deep:
                    self.deep += int(np.count_nonzero(nz < sp.deep))
                self.subnormal += int(np.count_nonzero(nz < sp.small))
        self.zero += zeros
        self.tiny += k1 - zeros
        self.band1 += k10 - k1
        self.band2 += k100 - k10
        self._note_min(lo)
        return lowest

    def _below(self, m: np.ndarray, bl: np.ndarray, n: int, k1: int
               ) -> tuple[int, int, int, int | None]:
        """(zeros, deep, subnormal, smallest non-zero magnitude or None) of a piece with
        ``k1`` > 0 values below L; ``bl`` holds ``m < L``."""
        sp = self.sp
        zeros = deep = sub = 0
        lowest: int | None = None
        if 8 * k1 > n:  # dense near zero (zero-filled tensors): direct passes
            zeros = n - int(np.count_nonzero(m))
            if sp.deep:
                deep = int(np.count_nonzero(np.less(m, sp.deep, out=bl))) - zeros
            sub = int(np.count_nonzero(np.less(m, sp.small, out=bl))) - zeros
            if k1 > zeros:
                np.less(m, sp.tiny, out=bl)
                sel = m[bl]
                lowest = int(sel[sel > 0].min())
        elif not (zeros := n - int(np.count_nonzero(m))):
            # no zeros (healthy weights: a few values below L in most pieces): the
            # smallest magnitude is the piece's minimum, and deep / subnormal need a
            # pass only when it lies below them; a uint32 count and a min cost ~0.15
            # ns/element against ~0.5 for compacting the values below L
            lowest = int(m.min())
            if sp.deep and lowest < sp.deep:
                deep = int(np.count_nonzero(np.less(m, sp.deep, out=bl)))
            if lowest < sp.small:
                sub = int(np.count_nonzero(np.less(m, sp.small, out=bl)))
        else:  # bl still holds m < L
            sel = m[bl]
            zeros = k1 - int(np.count_nonzero(sel))
            if k1 > zeros:
                nz = sel[sel > 0] if zeros else sel
                lowest = int(nz.min())
                if sp.deep and lowest < sp.deep:
                    deep = int(np.count_nonzero(nz < sp.deep))
                if lowest < sp.small:
                    sub = int(np.count_nonzero(nz < sp.small))
        return zeros, deep, sub, lowest

    def _note_min(self, b: int) -> None:
        if self.min_bits is None or b < self.min_bits:
            self.min_bits = b

    # -- filter sums of squares ---------------------------------------------
    def _squares(self, start: int, m: np.ndarray, mx: int, lowest: int | None) -> None:
        sp = self.sp
        sc = scratch()
        n = m.size
        assert self.sumsq is not None
        if sp.kind == "u8":
            f = m.view(np.float64)
        elif sp.kind == "u4":
            wide = mx > _SQ_HIGH or (lowest is not None and lowest < _SQ_LOW)
            f = m.view(np.float32)
            if wide:
                f = f.astype(np.float64)
        elif sp.kind == "u2f16":
            f = sc.get("sq32", n, np.float32)
            np.copyto(f, m.view(np.float16))
        else:
            u = sc.get("sq32u", n, np.uint32)
            np.copyto(u, m)
            np.left_shift(u, 16, out=u)
            f = u.view(np.float32)
            if mx > (_SQ_HIGH >> 16) or (lowest is not None and lowest < (_SQ_LOW >> 16)):
                f = f.astype(np.float64)
        add_squares(self.sumsq, start, f, self.row, self.out_axis, self.filters)

    def stats_bits(self) -> tuple[float, float]:
        kind = self.sp.kind
        mx = bits_value(kind, self.max_bits)
        mn = bits_value(kind, self.min_bits) if self.min_bits is not None else math.inf
        return mx, mn


# the column view of a piece (see _column_low): ROWS rows of n // ROWS columns; a piece
# too short for MIN_COLUMNS takes the direct passes
ROWS = 32
MIN_COLUMNS = 256


def _column_low(m: np.ndarray, cut: int) -> tuple[int, np.ndarray] | None:
    """(min of ``m``, a superset of its values below ``cut``), or None where the
    direct passes are cheaper (a short piece, or many values below ``cut``).

    The piece is seen as ``ROWS`` rows; one column-wise minimum (a streaming pass,
    no bool array, no compaction of the whole piece) gives the minimum and the few
    columns holding a value below ``cut``, and only those columns are gathered.
    Healthy weights have a handful of values below 1/T per piece, so the low counts
    then cost a few small array operations.
    """
    n = m.size
    width = n // ROWS
    if width < MIN_COLUMNS:
        return None
    head = m[: ROWS * width].reshape(ROWS, width)
    tail = m[ROWS * width:]
    cm = np.minimum.reduce(head, axis=0, out=scratch().get("cm" + m.dtype.char, width,
                                                            m.dtype.type))
    lo = int(cm.min())
    if tail.size:
        lo = min(lo, int(tail.min()))
    if lo >= cut:
        return lo, head[:0, 0]
    cols = np.flatnonzero(cm < cut)
    if cols.size * 16 > width:  # dense near zero: direct passes
        return None
    sel = head[:, cols].reshape(-1)
    if tail.size:
        sel = np.concatenate((sel, tail[tail < cut]))
    return lo, sel


def _dot(x: np.ndarray) -> float:
    return float(np.einsum("i,i->", x, x))


def add_squares(sumsq: np.ndarray, start: int, f: np.ndarray, row: int,
                out_axis: int | None, filters: int) -> None:
    """sumsq[filter] += sum of f**2 over the filter's elements in ``[start, start+n)``.

    ``out_axis == 0``: filter = flat index // row; ``-1``: filter = flat index % filters.
    Pieces need no alignment: partial rows at either end are summed apart.
    """
    n = f.size
    if out_axis == 0:
        head = min(n, (-start) % row)
        r = start // row
        if head:
            sumsq[r] += _dot(f[:head])
            r += 1
        full = (n - head) // row
        if full:
            block = f[head: head + full * row].reshape(full, row)
            sumsq[r: r + full] += np.einsum("ij,ij->i", block, block)
            r += full
        tail = f[head + full * row:]
        if tail.size:
            sumsq[r] += _dot(tail)
        return
    c0 = start % filters
    head = min(n, (filters - c0) % filters)
    if head:
        part = f[:head]
        sumsq[c0: c0 + head] += part * part
    full = (n - head) // filters
    if full:
        block = f[head: head + full * filters].reshape(full, filters)
        sumsq += np.einsum("ij,ij->j", block, block)
    tail = f[head + full * filters:]
    if tail.size:
        sumsq[: tail.size] += tail * tail


def to_bits(dtype: str, kind: str, chunk: np.ndarray) -> np.ndarray:
    """The storage bits of a chunk in ``kind``, without a copy where the chunk allows.

    Accepts raw storage (uint16 / uint32 / uint64 / float8 uint8 codes) or the decoded
    arrays the readers return (float16 / float32 / float64; bfloat16 and float8 as float32).
    """
    chunk = np.ascontiguousarray(chunk)
    if kind == "u4":
        if chunk.dtype == np.uint8 and dtype.startswith("float8"):
            out = scratch().get("f8", chunk.size, np.uint32)
            np.take(_f8_bits_table(dtype), chunk, out=out)
            return out
        if chunk.dtype != np.float32 and chunk.dtype != np.uint32:
            chunk = chunk.astype(np.float32)
        return chunk.view(np.uint32)
    if kind == "u8":
        if chunk.dtype not in (np.float64, np.uint64):
            chunk = chunk.astype(np.float64)
        return chunk.view(np.uint64)
    if kind == "u2f16":
        if chunk.dtype not in (np.float16, np.uint16):
            chunk = chunk.astype(np.float16)
        return chunk.view(np.uint16)
    # bfloat16
    if chunk.dtype == np.uint16:
        return chunk
    return (chunk.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
