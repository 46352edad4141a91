"""Pure numpy analysis: BN channels -> classes, weight tensors -> anomaly counts.

No I/O here: callers hand in arrays (or an iterator of chunks), so every rule
can be tested on plain numbers. Thresholds are documented in the README.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from bnexporter.detection import kernel
from bnexporter.formats import dtypes
from bnexporter.report import RELU_LIKE


@dataclass(frozen=True)
class Thresholds:
    dead_p: float = 1e-3          # p_active below this: dead
    near_dead_p: float = 0.05     # p_active below this (and not dead): near-dead
    saturated_p: float = 1e-3     # ReLU6: P(y < 6) below this: always saturated
    gamma_abs: float = 1e-6       # |gamma| below this: collapsed gamma ...
    gamma_rel: float = 1e-3       # ... or below this times the layer's median |gamma|
    dead_input_var: float = 1e-6  # running var below this times eps: dead input ...
    dead_input_mean: float = 1e-3  # ... with |running mean| below this times sqrt(eps)
    constant_rel: float = 1e-3    # output std below this times |beta|: input-independent
    extreme: float = 1e5          # |w| > T huge, 0 < |w| < 1/T tiny (capped per dtype)
    dead_filter_rel: float = 1e-6  # filter norm below this times the median norm: dead
    refine: bool = True           # refine p_active from producer kernels (refine.py)
    refine_kernel_max: int = 1 << 22  # larger producer kernels keep the plain estimate


@dataclass(frozen=True)
class ChannelResult:
    p_active: np.ndarray
    dead: list[int]
    near_dead: list[int]
    collapsed_gamma: list[int]
    dead_input: list[int]
    constant: list[int]
    saturated: list[int]
    # dead by the estimate, but the consumer is not known to be a ReLU: reported apart
    would_be_dead: list[int] = field(default_factory=list)

    def classes(self) -> dict[str, list[int]]:
        return {"dead": self.dead, "near_dead": self.near_dead,
                "would_be_dead": self.would_be_dead, "collapsed_gamma": self.collapsed_gamma,
                "dead_input": self.dead_input, "constant": self.constant,
                "saturated": self.saturated}


def _erfc(x: np.ndarray) -> np.ndarray:
    """Complementary error function, vectorised, relative error < 1.2e-7 everywhere.

    The Chebyshev-fitted form from Numerical Recipes (``erfcc``): accurate far
    into the tails, where ``1 - erf`` would round to 0, and ~20x faster than
    calling ``math.erfc`` per element.
    """
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    with np.errstate(under="ignore"):
        ans = t * np.exp(-z * z + poly)
    return np.where(x >= 0, ans, 2.0 - ans)


def median(x: np.ndarray) -> float:
    """``float(np.median(x))`` of a non-empty 1-D array, same value (NaN if any is).

    ``np.median`` imports ``numpy.ma`` on its first call (~8 ms of a BN-only start)
    to check for masked arrays; this is its partition-and-mean, without that.
    """
    x = np.asarray(x).ravel()
    n = x.size
    if np.isnan(x).any():
        return math.nan
    k = n // 2
    if n % 2:
        return float(np.partition(x, k)[k])
    part = np.partition(x, (k - 1, k))
    return float((part[k - 1] + part[k]) / 2)


def normal_cdf(z: np.ndarray) -> np.ndarray:
    """Phi(z), accurate in the far tails."""
    return 0.5 * _erfc(-np.asarray(z, dtype=np.float64) / math.sqrt(2.0))


def _tail_above(threshold: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """P(N(loc, scale^2) > threshold), with the scale == 0 limit."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (loc - threshold) / scale
    p = normal_cdf(np.where(scale > 0, z, 0.0))
    return np.where(scale > 0, p, (loc > threshold).astype(np.float64))


def classify_channels(gamma: np.ndarray | None, beta: np.ndarray | None, mean: np.ndarray,
                      var: np.ndarray, eps: float, consumer: str,
                      th: Thresholds = Thresholds()) -> ChannelResult:
    """Classify each channel of one BN layer from its four vectors.

    y = gamma (x - mean) / sqrt(var + eps) + beta with x ~ N(mean, var) gives
    y ~ N(beta, s^2), s = |gamma| sqrt(var / (var + eps)); p_active = P(y > 0).
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    n = mean.shape[0]
    g = np.ones(n) if gamma is None else np.asarray(gamma, dtype=np.float64)
    b = np.zeros(n) if beta is None else np.asarray(beta, dtype=np.float64)
    finite = np.isfinite(g) & np.isfinite(b) & np.isfinite(mean) & np.isfinite(var)
    v = np.where(np.isfinite(var), np.maximum(var, 0.0), 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.abs(g) * np.sqrt(v / (v + eps))
    s = np.where(np.isfinite(s), s, 0.0)
    p_active = _tail_above(np.zeros(n), b, s)
    p_active = np.where(finite, p_active, np.nan)

    abs_g = np.abs(g)
    med_g = median(abs_g[np.isfinite(abs_g)]) if np.isfinite(abs_g).any() else 0.0
    collapsed = (gamma is not None) & finite & (
        (abs_g < th.gamma_abs) | (abs_g < th.gamma_rel * med_g))
    dead_input = finite & (v < th.dead_input_var * eps) & (
        np.abs(mean) < th.dead_input_mean * math.sqrt(eps))
    constant = finite & (b > 0) & (s <= th.constant_rel * np.abs(b))

    relu_like = consumer in RELU_LIKE
    below = finite & (p_active < th.dead_p)
    dead = relu_like & below
    near = relu_like & finite & ~dead & (p_active < th.near_dead_p)
    would_be = (consumer == "unknown") & below
    if consumer == "relu6":
        p_below6 = 1.0 - _tail_above(np.full(n, 6.0), b, s)
        saturated = finite & (p_below6 < th.saturated_p)
    else:
        saturated = np.zeros(n, dtype=bool)
    return ChannelResult(p_active, indices(dead), indices(near), indices(collapsed),
                         indices(dead_input), indices(constant), indices(saturated),
                         indices(would_be))


def indices(mask: np.ndarray | bool) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


@dataclass(frozen=True)
class TensorStats:
    """One pass over a tensor, as plain counts (computable from bit patterns too).

    ``huge``: |w| > huge limit; ``tiny``: 0 < |w| < tiny limit L (the seed's raw
    counts); ``deep``: 0 < |w| < deep limit (a subset of ``tiny``; 0 for dtypes
    without normal numbers that small); ``band1`` / ``band2``: L <= |w| < 10 L /
    10 L <= |w| < 100 L (the density just above L, see extremes.py);
    ``subnormal``: non-zero values below the dtype's smallest normal; ``negative``:
    values < 0; ``min_abs`` / ``max_abs`` over the finite values. -1 in ``band1`` /
    ``band2`` / ``negative``: not counted (``TensorScan(bands=False, negative=False)``).
    """
    nonfinite: int
    huge: int
    tiny: int
    zero: int
    max_abs: float
    size: int
    dead_filters: list[int] | None = None
    deep: int = 0
    band1: int = 0
    band2: int = 0
    subnormal: int = 0
    negative: int = 0
    min_abs: float = 0.0


def extreme_limits(dtype: str, extreme: float) -> tuple[float, float]:
    """Huge / tiny cut-offs that the dtype can actually represent.

    fp16 cannot hold 1e5 or 1e-5 as a normal number, so its limits tighten to an
    eighth of the largest finite value and the smallest normal.
    """
    if not dtypes.is_float(dtype):
        return extreme, 1.0 / extreme
    largest, smallest_normal = dtypes.finfo_limits(dtype)
    return min(extreme, largest / 8.0), max(1.0 / extreme, smallest_normal)


# 0 < |w| below this is never a healthy tail value (docs/extremes.md)
DEEP_LIMIT = 1e-25


def band_edges(dtype: str, th: Thresholds = Thresholds()) -> tuple[float, float, float, float]:
    """(smallest normal, deep limit, tiny limit L, 100 L) for a dtype.

    The deep band exists only where the dtype holds values far below L as normal
    numbers (fp32, fp64, bf16); fp16 / fp8 get a deep limit of 0: their values
    below L are subnormals, judged by the density test instead.
    """
    tiny = extreme_limits(dtype, th.extreme)[1]
    smallest = dtypes.finfo_limits(dtype)[1] if dtypes.is_float(dtype) else 0.0
    deep = DEEP_LIMIT if smallest < DEEP_LIMIT < tiny else 0.0
    return smallest, deep, tiny, 100.0 * tiny


class TensorScan:
    """Accumulates anomaly counts over the chunks of one tensor.

    ``out_axis`` names the output-filter layout of a conv / dense kernel: 0
    (PyTorch: filter = leading index), -1 (Keras: filter = trailing index), or
    None for tensors that are not kernels. Chunks may start anywhere (``align``
    is 1); they must come in order without gaps only in the sense that every
    element is passed once.

    Float tensors go through :class:`bnexporter.detection.kernel.BitKernel`
    (integer tests on bit patterns, cache-sized pieces, reused buffers); chunks
    are either the raw storage bits (``Reader.iter_raw``) or decoded arrays
    (``Reader.iter_chunks``). Integer / bool / complex tensors use plain numpy.
    """

    def __init__(self, shape: tuple[int, ...], dtype: str, th: Thresholds = Thresholds(),
                 out_axis: int | None = None, bands: bool = True, negative: bool = True):
        """``bands=False`` / ``negative=False`` skip ``band1`` / ``band2`` / ``negative``
        of float tensors (reported as -1, "not counted"): three of the seven passes."""
        self.shape, self.dtype, self.th = shape, dtype, th
        self._partial = (not bands, not negative)
        self.huge_limit, self.tiny_limit = extreme_limits(dtype, th.extreme)
        self.smallest, self.deep_limit, _, self.band_top = band_edges(dtype, th)
        self.nonfinite = self.huge = self.tiny = self.zero = 0
        self.deep = self.band1 = self.band2 = self.subnormal = self.negative = 0
        self.max_abs = 0.0
        self.min_abs = math.inf
        self.size = math.prod(shape)
        # an empty kernel may still declare a huge dimension (2**40, 0, 3, 3): no
        # per-filter sums then, or they alone would be allocated at that size
        self.out_axis = out_axis if (len(shape) >= 2 and dtypes.is_float(dtype)
                                     and self.size > 0) else None
        if self.out_axis == 0:
            self.filters, self.row = shape[0], self.size // max(shape[0], 1)
        elif self.out_axis == -1:
            self.filters, self.row = shape[-1], shape[-1]
        else:
            self.filters, self.row = 0, 1
        self.sumsq = np.zeros(self.filters, dtype=np.float64) if self.filters else None
        self.kind = kernel.kind_of(dtype)
        self._bits: kernel.BitKernel | None = None
        if self.kind is not None:
            sp = kernel.spec(dtype, self.kind, self.huge_limit, self.tiny_limit,
                             self.deep_limit, self.smallest)
            self._bits = kernel.BitKernel(sp, self.filters, self.row, self.out_axis,
                                          self.sumsq, bands, negative)

    @property
    def align(self) -> int:
        return 1

    @property
    def piece_elements(self) -> int:
        """Elements per cache-sized piece (what ``Reader.iter_raw`` should hand in)."""
        return max(1, kernel.PIECE_BYTES // dtypes.itemsize(self.dtype))

    # elements per inner slice of the integer path
    SLICE = 1 << 18

    def update(self, start: int, chunk: np.ndarray) -> None:
        if chunk.size == 0:
            return
        if self._bits is not None:
            assert self.kind is not None
            b = kernel.to_bits(self.dtype, self.kind, chunk.reshape(-1))
            step = max(1, kernel.PIECE_BYTES // b.itemsize)
            for lo in range(0, b.size, step):
                self._bits.piece(start + lo, b[lo: lo + step])
            return
        if chunk.dtype.kind == "b":
            self.zero += int(chunk.size - np.count_nonzero(chunk))
            self.max_abs = max(self.max_abs, float(chunk.any()))
            self.min_abs = min(self.min_abs, float(chunk.all()))
            return
        if chunk.dtype.kind in "iu":
            for lo in range(0, chunk.size, self.SLICE):
                part = chunk[lo: lo + self.SLICE]
                a = np.abs(part.astype(np.float64))
                self.zero += int(part.size - np.count_nonzero(part))
                self.huge += int(np.count_nonzero(a > self.huge_limit))
                self.negative += int(np.count_nonzero(part < 0))
                self.max_abs = max(self.max_abs, float(a.max()))
                self.min_abs = min(self.min_abs, float(a.min()))
            return
        self._update_other(start, chunk)

    def _update_other(self, start: int, chunk: np.ndarray) -> None:
        """Complex (and any other) dtypes: the real part as float32, as before."""
        with np.errstate(all="ignore"):
            a = np.abs(np.real(chunk).astype(np.float32))
        finite = np.isfinite(a)
        bad = int(a.size - np.count_nonzero(finite))
        self.nonfinite += bad
        a = np.where(finite, a, 0.0).astype(np.float32)
        self.max_abs = max(self.max_abs, float(a.max()))
        zeros = int(a.size - np.count_nonzero(a)) - bad
        self.zero += zeros
        self.negative += int(np.count_nonzero(np.real(chunk) < 0))
        self.huge += int(np.count_nonzero(a > self.huge_limit))
        nz = a[(a > 0) & (a < self.band_top)]
        self.min_abs = min(self.min_abs, 0.0 if zeros else float(a[finite].min())
                           if finite.any() else math.inf)
        below_l = int(np.count_nonzero(nz < self.tiny_limit))
        below_10l = int(np.count_nonzero(nz < 10.0 * self.tiny_limit))
        self.tiny += below_l
        self.band1 += below_10l - below_l
        self.band2 += int(nz.size) - below_10l
        if self.deep_limit:
            self.deep += int(np.count_nonzero(nz < self.deep_limit))
        self.subnormal += int(np.count_nonzero(nz < self.smallest))

    def result(self) -> TensorStats:
        if self._bits is not None:
            k = self._bits
            self.nonfinite, self.huge, self.tiny, self.zero = k.nonfinite, k.huge, k.tiny, k.zero
            self.deep, self.band1, self.band2 = k.deep, k.band1, k.band2
            self.subnormal, self.negative = k.subnormal, k.negative
            self.max_abs, self.min_abs = k.stats_bits()
            if self._partial[0]:
                self.band1 = self.band2 = -1
            if self._partial[1]:
                self.negative = -1
        dead = None
        if self.sumsq is not None:
            norms = np.sqrt(self.sumsq)
            median = float(np.median(norms)) if norms.size else 0.0
            dead = [int(i) for i in np.flatnonzero(norms <= self.th.dead_filter_rel * median)] \
                if median > 0 else []
        return TensorStats(self.nonfinite, self.huge, self.tiny, self.zero, self.max_abs,
                           self.size, dead, deep=self.deep, band1=self.band1,
                           band2=self.band2, subnormal=self.subnormal, negative=self.negative,
                           min_abs=self.min_abs if math.isfinite(self.min_abs) else 0.0)


def scan_chunks(shape: tuple[int, ...], dtype: str, chunks: Iterable[tuple[int, np.ndarray]],
                th: Thresholds = Thresholds(), out_axis: int | None = None) -> TensorStats:
    scan = TensorScan(shape, dtype, th, out_axis)
    for start, chunk in chunks:
        scan.update(start, chunk)
    return scan.result()
