"""Refined dead-channel estimate from the producing kernel and the upstream BNs.

The plain estimate assumes the BN input x is Gaussian with the running mean and
variance. That fails where it matters most (early in training, depthwise
layers): x = sum(w * a) over few non-negative inputs is bounded and skewed, and
a dead upstream channel makes x constant. With the producer kernel and the
upstream BN parameters (wiring from links.py) this module

* bounds x: each input lies in a plausible range (an upstream BN output within
  ``RANGE_SIGMA`` standard deviations, clipped by its ReLU / ReLU6), so x lies
  between the sums of the worst and the best input per tap, whatever the
  correlations. If the BN output cannot exceed 0 over that range the channel is
  dead for certain; a dead upstream channel (range {0}) makes the depthwise
  channel reading it constant. This bound is what decides "dead";
* predicts inference-mode moments of x (running moments times the predicted
  training -> inference change, upstream channels proven dead contributing
  nothing) and its skewness (one-factor model of correlated taps), and turns
  them into a shifted-gamma tail probability. That model is less certain and
  only feeds the near-dead warning (see docs/accuracy.md for the measurements).

Everything is pure numpy on arrays the caller read; no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from bnexporter.detection.analysis import (
    ChannelResult,
    Thresholds,
    indices,
    median,
    normal_cdf,
)
from bnexporter.detection.wiring import Feed, Link
from bnexporter.report import RELU_LIKE

# A Gaussian exceeds 6 standard deviations with probability 1e-9: beyond the
# positions any evaluation set visits, so ranges this wide are safe bounds.
RANGE_SIGMA = 6.0
# Measured choices (docs/accuracy.md), module constants so the benchmark can compare:
PROPAGATE = True      # correct the running moments for the training -> inference change
SKEW = True           # shifted-gamma tail from the predicted skewness, not a Gaussian one
DEAD_FROM = "bound"   # dead from plain + range bound ("bound") or from the tail model
NEAR_FROM_MODEL = True  # the tail model may add near-dead warnings

_SQRT2PI = math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class BNParams:
    """One BN layer's vectors as float64, gamma / beta filled when absent."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @staticmethod
    def of(gamma: np.ndarray | None, beta: np.ndarray | None, mean: np.ndarray,
           var: np.ndarray, eps: float) -> BNParams:
        m = np.asarray(mean, np.float64)
        g = np.ones_like(m) if gamma is None else np.asarray(gamma, np.float64)
        b = np.zeros_like(m) if beta is None else np.asarray(beta, np.float64)
        v = np.maximum(np.asarray(var, np.float64), 0.0)
        return BNParams(g, b, m, v, float(eps))

    # computed once per layer (the refinement asks for them several times per layer)
    @functools.cached_property
    def sd(self) -> np.ndarray:
        return np.sqrt(self.var + self.eps)

    @functools.cached_property
    def s(self) -> np.ndarray:
        """Std of the BN output under the plain model."""
        return np.abs(self.gamma) * np.sqrt(self.var) / self.sd

    @functools.cached_property
    def _finite(self) -> bool:
        return bool(np.isfinite(self.gamma).all() and np.isfinite(self.beta).all()
                    and np.isfinite(self.mean).all() and np.isfinite(self.var).all())

    def finite(self) -> bool:
        return self._finite


@dataclass
class Dist:
    """Per-channel summary of a tensor: mean, variance, third central moment, range."""

    mean: np.ndarray
    var: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    moments: bool = True  # False once an op (max pooling) invalidates the moments
    k3: np.ndarray | float = 0.0

    def bounded(self) -> Dist:
        """Mean inside the range; variance at most (range / 2)^2 (Popoviciu).

        Shrinking the variance keeps the skewness.
        """
        lo, hi = np.minimum(self.lo, self.hi), self.hi
        var0 = np.maximum(self.var, 0.0)
        var = np.minimum(var0, np.square((hi - lo) / 2.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            shrink = np.where(var0 > 0, np.sqrt(var / var0), 0.0) ** 3
        return Dist(np.clip(self.mean, lo, hi), var, lo, hi, self.moments, self.k3 * shrink)


def gaussian(mean: np.ndarray, std: np.ndarray, k: float = RANGE_SIGMA) -> Dist:
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    return Dist(mean, std * std, mean - k * std, mean + k * std)


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.square(z)) / _SQRT2PI


def clip(d: Dist, top: float | None) -> Dist:
    """ReLU (top None) or ReLU6 (top 6) of an input summarised as a Gaussian.

    Mean, variance and third moment are those of the clipped normal with the
    input's mean and variance (its skewness is not used); the range is exact.
    """
    m, v = d.mean, np.maximum(d.var, 0.0)
    s = np.sqrt(v)
    pos = s > 0
    ss = np.where(pos, s, 1.0)
    a = -m / ss
    # partial moments of the standard normal over [a, b]: M_k = int_a^b z^k phi(z) dz
    fa, pa = normal_cdf(a), _phi(a)
    if top is None:
        fb, pb, b, tail = np.ones_like(m), np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    else:
        b = (top - m) / ss
        fb, pb = normal_cdf(b), _phi(b)
        tail = 1.0 - fb  # mass clipped to ``top``
    m0 = fb - fa
    m1 = pa - pb
    m2 = m0 + a * pa - b * pb
    m3 = 2.0 * m1 + a * a * pa - b * b * pb
    cap = 0.0 if top is None else top
    e1 = m * m0 + s * m1 + cap * tail
    e2 = m * m * m0 + 2 * m * s * m1 + v * m2 + cap ** 2 * tail
    e3 = m ** 3 * m0 + 3 * m * m * s * m1 + 3 * m * v * m2 + v * s * m3 + cap ** 3 * tail
    hi_cap = np.inf if top is None else top
    const = np.clip(m, 0.0, hi_cap)
    e1 = np.where(pos, e1, const)
    var = np.where(pos, np.maximum(e2 - e1 * e1, 0.0), 0.0)
    k3 = np.where(pos, e3 - 3 * e1 * e2 + 2 * e1 ** 3, 0.0)
    return Dist(e1, var, np.clip(d.lo, 0.0, hi_cap), np.clip(d.hi, 0.0, hi_cap), d.moments,
                k3).bounded()


def add(parts: list[Dist]) -> Dist:
    """Sum of inputs, cumulants as if independent; ranges add exactly."""
    def total(values: list[Any]) -> Any:
        out = values[0]
        for v in values[1:]:
            out = out + v
        return out

    return Dist(total([p.mean for p in parts]), total([p.var for p in parts]),
                total([p.lo for p in parts]), total([p.hi for p in parts]),
                all(p.moments for p in parts), total([p.k3 for p in parts]))


def _gamma_p_q(a: float, x: float) -> tuple[float, float]:
    """Regularised incomplete gamma (P, Q); series below a + 1, continued fraction above."""
    if x <= 0.0:
        return 0.0, 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1.0
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        p = min(1.0, total * math.exp(log_front))
        return p, 1.0 - p
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    q = min(1.0, math.exp(log_front) * h)
    return 1.0 - q, q


def _pearson3_sf_one(z: float, skew: float) -> float:
    if abs(skew) < 1e-3:
        return 0.5 * math.erfc(z / math.sqrt(2.0))
    k = 4.0 / (skew * skew)
    if k > 50:  # Wilson-Hilferty: accurate for a gamma this close to normal
        g = k + math.copysign(1.0, skew) * z * math.sqrt(k)
        if g <= 0:
            return 1.0 if skew > 0 else 0.0
        w = ((g / k) ** (1.0 / 3.0) - (1.0 - 1.0 / (9.0 * k))) * math.sqrt(9.0 * k)
        upper = 0.5 * math.erfc(w / math.sqrt(2.0))
        return upper if skew > 0 else 1.0 - upper
    if skew > 0:  # z = (G - k) / sqrt(k)
        return _gamma_p_q(k, k + z * math.sqrt(k))[1] if k + z * math.sqrt(k) > 0 else 1.0
    g = k - z * math.sqrt(k)  # z = (k - G) / sqrt(k): bounded above by sqrt(k)
    return _gamma_p_q(k, g)[0] if g > 0 else 0.0


def pearson3_sf(z: np.ndarray, skew: np.ndarray) -> np.ndarray:
    """P(U > z) for a standardised shifted gamma U with the given skewness.

    The three-moment model of a skewed sum: skewness 0 is the normal; a negative
    skewness bounds U above at 2 / |skew| (a short right tail), a positive one
    gives a long right tail.
    """
    zz, sk = np.broadcast_arrays(np.asarray(z, np.float64), np.asarray(skew, np.float64))
    shape = zz.shape
    zz, sk = zz.ravel(), sk.ravel()
    out = np.empty(zz.size, np.float64)
    # the two closed forms of _pearson3_sf_one vectorised (normal_cdf: relative error
    # < 1.2e-7, also in the far tails); only strongly skewed channels take the scalar
    # incomplete gamma
    normal = np.abs(sk) < 1e-3
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        k = 4.0 / (sk * sk)
    wh = ~normal & (k > 50)
    rest = ~normal & ~wh
    if normal.any():
        out[normal] = normal_cdf(-zz[normal])
    if wh.any():
        kw, sw, zw = k[wh], sk[wh], zz[wh]
        g = kw + np.copysign(1.0, sw) * zw * np.sqrt(kw)
        pos = g > 0
        gp = np.where(pos, g, kw)
        w = ((gp / kw) ** (1.0 / 3.0) - (1.0 - 1.0 / (9.0 * kw))) * np.sqrt(9.0 * kw)
        upper = normal_cdf(-w)
        val = np.where(sw > 0, upper, 1.0 - upper)
        out[wh] = np.where(pos, val, np.where(sw > 0, 1.0, 0.0))
    if rest.any():
        out[rest] = [_pearson3_sf_one(float(a), float(b)) for a, b in zip(zz[rest], sk[rest])]
    return out.reshape(shape)


def kernel_matrix(kernel: np.ndarray, layout: str) -> np.ndarray:
    """Any supported kernel as (out, in_per_group, taps)."""
    k = np.asarray(kernel, np.float32)
    if layout == "torch":
        return k.reshape(k.shape[0], k.shape[1], -1)
    if layout == "keras_dw":  # (..., in, mult): output channel = in * mult + m
        cin, mult = k.shape[-2], k.shape[-1]
        return k.reshape(-1, cin * mult).T.reshape(cin * mult, 1, -1)
    if k.ndim == 2:  # Dense (in, out)
        return k.T[:, :, None]
    cin, cout = k.shape[-2], k.shape[-1]
    return k.reshape(-1, cin, cout).transpose(2, 1, 0)


@dataclass(frozen=True)
class KernelStats:
    """What the refinement needs from a (out, in_per_group, taps) kernel.

    Per (output, input) pair: the sums of the positive and negative taps (for
    range bounds: each tap takes its input at its best or worst), the tap sum
    and its square and cube (taps alike), and the sums of w^2 and w^3 (taps
    independent). Computed once per kernel; the kernel itself is not kept.
    """

    wpos: np.ndarray
    wneg: np.ndarray
    wsum: np.ndarray
    wsum2: np.ndarray
    wsum3: np.ndarray
    w2: np.ndarray
    w3: np.ndarray
    taps: int

    @staticmethod
    def of(w: np.ndarray, arena: Arena | None = None) -> KernelStats:
        """Float32 throughout: these feed moment estimates, not exact arithmetic.

        No kernel-sized temporaries: the sums run over cache-sized blocks of rows
        (taps contiguous, torch layout) or tap by tap (taps outermost, Keras layout:
        no transposed copy of the kernel). With an ``arena`` the arrays live in its
        reused buffers (valid until the next kernel): a fresh process pays a page
        fault per 4 KiB of every new large array, which was a third of the cost.
        """
        a = arena if arena is not None else Arena()
        w = np.asarray(w, np.float32)
        out, per_group, taps = w.shape
        if taps == 1:  # 1x1 conv / dense: every sum is the weight itself
            src = w[:, :, 0]
            one = a.like("one", src)  # Keras: stays transposed, matmul takes it
            np.copyto(one, src)
            sq = np.multiply(one, one, out=a.like("sq", one))
            cube = np.multiply(sq, one, out=a.like("cube", one))
            return KernelStats(np.maximum(one, 0, out=a.like("pos", one)),
                               np.minimum(one, 0, out=a.like("neg", one)),
                               one, sq, cube, sq, cube, 1)
        outer = w.transpose(2, 1, 0)  # (taps, per_group, out)
        if outer.flags.c_contiguous and not w.flags.c_contiguous:
            sums = _tap_sums_outer(outer, a).transpose(0, 2, 1)
        else:
            sums = _tap_sums_rows(np.ascontiguousarray(w).reshape(-1, taps), a).reshape(
                4, out, per_group)
        wsum, wpos, w2, w3 = sums  # views (transposed for Keras): BLAS reads them in place
        sq = np.multiply(wsum, wsum, out=a.like("sq", wsum))
        return KernelStats(wpos, np.subtract(wsum, wpos, out=a.like("neg", wsum)), wsum, sq,
                           np.multiply(sq, wsum, out=a.like("cube", wsum)), w2, w3, taps)


class Arena:
    """Reused float32 buffers, one per role, grown to the largest request."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.size < n:
            buf = self._buffers[key] = np.empty(n, np.float32)
        return buf[:n].reshape(shape)

    def like(self, key: str, a: np.ndarray) -> np.ndarray:
        """A buffer of ``a``'s shape and memory order (C, or F for a transposed view)."""
        if a.ndim == 2 and not a.flags.c_contiguous and a.T.flags.c_contiguous:
            return self.get(key, a.T.shape).T
        return self.get(key, a.shape)


_BLOCK_ELEMENTS = 1 << 16  # 256 KiB of float32 per block: the temporaries stay in L2


def _tap_sums_rows(flat: np.ndarray, arena: Arena) -> np.ndarray:
    """(sum, sum of positives, sum of squares, sum of cubes) of each row of ``flat``
    (rows x taps, C order), as a (4, rows) float32 array."""
    rows, taps = flat.shape
    res = arena.get("sums", (4, rows))
    block = max(1, _BLOCK_ELEMENTS // taps)
    ones = np.ones(taps, np.float32)
    buf = arena.get("t", (min(block, rows), taps))
    sq = arena.get("t2", (min(block, rows), taps))
    for s in range(0, rows, block):
        part = flat[s: s + block]
        n = part.shape[0]
        t, t2 = buf[:n], sq[:n]
        # sums over a short last axis: a matrix-vector product is much faster than .sum
        np.matmul(part, ones, out=res[0, s: s + n])
        np.maximum(part, 0, out=t)
        np.matmul(t, ones, out=res[1, s: s + n])
        np.multiply(part, part, out=t2)
        np.matmul(t2, ones, out=res[2, s: s + n])
        np.multiply(t2, part, out=t)
        np.matmul(t, ones, out=res[3, s: s + n])
    return res


def _tap_sums_outer(outer: np.ndarray, arena: Arena) -> np.ndarray:
    """The same sums over axis 0 of a C-ordered (taps, a, b) array: (4, a, b)."""
    res = arena.get("sums", (4, *outer.shape[1:]))
    res.fill(0.0)
    t = arena.get("t", outer.shape[1:])
    t2 = arena.get("t2", outer.shape[1:])
    for tap in outer:
        res[0] += tap
        np.maximum(tap, 0, out=t)
        res[1] += t
        np.multiply(tap, tap, out=t2)
        res[2] += t2
        np.multiply(t2, tap, out=t)
        res[3] += t
    return res


@dataclass
class ConvInput:
    """Predicted BN input x for every output channel of a producer.

    Moments come in two limits for the taps of one input channel: independent
    (``_ind``) and identical (``_full``: neighbouring pixels alike). Input
    channels are independent in both.
    """

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    moments: bool
    var_ind: np.ndarray
    var_full: np.ndarray
    k3_ind: np.ndarray
    k3_full: np.ndarray

    def var(self, rho: np.ndarray | float) -> np.ndarray:
        return (1.0 - rho) * self.var_ind + rho * self.var_full

    def k3(self, rho: np.ndarray | float) -> np.ndarray:
        """One-factor model: tap = sqrt(rho) F + sqrt(1 - rho) E_tap, cumulants add."""
        rho = np.clip(rho, 0.0, 1.0)
        return (1.0 - rho) ** 1.5 * self.k3_ind + rho ** 1.5 * self.k3_full

    def rho(self, var: np.ndarray) -> np.ndarray:
        """Tap correlation that makes the predicted variance equal ``var``."""
        span = self.var_full - self.var_ind
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(np.abs(span) > 1e-12 * np.abs(self.var_full),
                         (var - self.var_ind) / span, 1.0)
        return np.clip(np.where(np.isfinite(r), r, 1.0), 0.0, 1.0)


def conv_input(ks: KernelStats, groups: int, feed: Dist, bias: np.ndarray | None,
               variance_only: bool = False) -> ConvInput:
    """Moments and range of x = sum(w * a) + bias, with a distributed as ``feed``.

    With several taps, zero padding can feed zeros at the borders: the range of
    every input is widened to contain 0. ``variance_only``: the mean and the two
    variance limits only (range and third moments left at 0), 3 products of 9.
    """
    out, per_group = ks.wpos.shape
    cin = feed.mean.shape[0]
    if groups <= 0 or cin != per_group * groups or out % groups:
        raise ValueError("kernel does not match its input")
    lo, hi = feed.lo, feed.hi
    if ks.taps > 1:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    k3 = np.broadcast_to(np.asarray(feed.k3, np.float64), feed.mean.shape)

    def mix(w: np.ndarray, a: np.ndarray) -> np.ndarray:
        """sum over the inputs of each output's group: w (out, per_group) . a (cin,)"""
        a32 = np.asarray(a, np.float32)
        if groups == 1:
            return (w @ a32).astype(np.float64)
        return np.einsum("gop,gp->go", w.reshape(groups, out // groups, per_group),
                         a32.reshape(groups, per_group)).reshape(out).astype(np.float64)

    b = np.zeros(out) if bias is None else np.asarray(bias, np.float64)
    mean = mix(ks.wsum, feed.mean) + b
    var_ind = mix(ks.w2, feed.var)
    # one tap (1x1 conv, dense): both limits are the same product
    var_full = var_ind if ks.wsum2 is ks.w2 else mix(ks.wsum2, feed.var)
    if variance_only:
        zero = np.zeros(out)
        return ConvInput(mean, zero, zero, feed.moments, var_ind, var_full, zero, zero)
    k3_ind = mix(ks.w3, k3)
    return ConvInput(
        mean=mean,
        lo=mix(ks.wpos, lo) + mix(ks.wneg, hi) + b,
        hi=mix(ks.wpos, hi) + mix(ks.wneg, lo) + b,
        moments=feed.moments,
        var_ind=var_ind,
        var_full=var_full,
        k3_ind=k3_ind,
        k3_full=k3_ind if ks.wsum3 is ks.w3 else mix(ks.wsum3, k3))


@dataclass
class Refined:
    """Refined view of one BN layer (inference mode)."""

    p_active: np.ndarray  # P(y > 0)
    y_lo: np.ndarray      # range of the BN output over plausible inputs (+-inf: unknown)
    y_hi: np.ndarray
    x_mean: np.ndarray    # inference-mode moments of the BN input
    x_var: np.ndarray
    x_k3: np.ndarray | float = 0.0


def conv_inputs(ks: KernelStats, groups: int, inf: Dist, train: Dist,
                bias: np.ndarray | None) -> tuple[ConvInput, ConvInput]:
    """x in inference mode, and in training mode (mean and variances only)."""
    return (conv_input(ks, groups, inf, bias),
            conv_input(ks, groups, train, bias, variance_only=True))


class ProducerLike(Protocol):
    """What the refinement reads of a producer: eager (:class:`Producer`) or lazy."""

    @property
    def link(self) -> Link: ...
    def inputs(self, inf: Dist, train: Dist) -> tuple[ConvInput, ConvInput]:
        """:func:`conv_inputs` of this producer's kernel and bias."""
        ...


@dataclass(frozen=True)
class Producer:
    """A link with its kernel reduced to :class:`KernelStats`, and its bias."""

    link: Link
    kernel: KernelStats
    bias: np.ndarray | None

    @staticmethod
    def of(link: Link, w: np.ndarray, bias: np.ndarray | None) -> Producer:
        return Producer(link, KernelStats.of(w), bias)

    def inputs(self, inf: Dist, train: Dist) -> tuple[ConvInput, ConvInput]:
        return conv_inputs(self.kernel, self.link.groups, inf, train, self.bias)


def refine_network(params: Mapping[str, BNParams], producers: Mapping[str, ProducerLike],
                   propagate: bool | None = None, k: float | None = None
                   ) -> dict[str, Refined]:
    """Refine every BN with a usable producer, upstream layers first.

    Layers whose feed cannot be evaluated are left out (plain estimate).
    ``None`` takes the module defaults ``PROPAGATE`` / ``RANGE_SIGMA``.
    """
    net = _Network(params, producers, PROPAGATE if propagate is None else propagate,
                   RANGE_SIGMA if k is None else k, SKEW)
    for name in producers:
        net.visit(name, set())
    return net.done


class _Network:
    def __init__(self, params: Mapping[str, BNParams], producers: Mapping[str, ProducerLike],
                 propagate: bool, k: float, skew: bool):
        self.params, self.producers = params, producers
        self.propagate, self.k, self.skew = propagate, k, skew
        self.done: dict[str, Refined] = {}
        self.failed: set[str] = set()
        # a feed's value once every BN it reads is settled (refined or failed): in a
        # residual network each block's feed contains the whole stream before it, so
        # without this the clipped moments are recomputed ~10x per layer
        self._settled: dict[Feed, tuple[Dist, Dist] | None] = {}

    def visit(self, name: str, stack: set[str]) -> None:
        if name in self.done or name in self.failed or name in stack:
            return
        prod = self.producers.get(name)
        bn = self.params.get(name)
        if prod is None or prod.link.feed is None or bn is None or not bn.finite():
            self.failed.add(name)
            return
        stack.add(name)
        for up in sorted(prod.link.feed.bns()):
            self.visit(up, stack)
        stack.discard(name)
        try:
            feeds = self._feed(prod.link.feed)
            if feeds is None:
                self.failed.add(name)
                return
            self.done[name] = self._refine(bn, prod, *feeds)
        except (ValueError, IndexError, FloatingPointError):
            self.failed.add(name)

    def _outputs(self, name: str) -> tuple[Dist, Dist] | None:
        """(training-mode, inference-mode) summaries of a BN's output."""
        bn = self.params.get(name)
        if bn is None or not bn.finite():
            return None
        train = gaussian(bn.beta, bn.s, self.k)
        ref = self.done.get(name)
        if ref is None:
            return train, train
        mean = bn.beta + bn.gamma * (ref.x_mean - bn.mean) / bn.sd
        std = np.abs(bn.gamma) * np.sqrt(ref.x_var) / bn.sd
        inf = gaussian(mean, std, self.k)
        inf.k3 = (bn.gamma / bn.sd) ** 3 * ref.x_k3
        inf.lo = np.maximum(inf.lo, ref.y_lo)
        inf.hi = np.minimum(inf.hi, ref.y_hi)
        return train, inf.bounded()

    def _is_settled(self, name: str) -> bool:
        return name in self.done or name in self.failed or name not in self.producers

    def _feed(self, feed: Feed) -> tuple[Dist, Dist] | None:
        return self._feed_memo(feed)[0]

    def _feed_memo(self, feed: Feed) -> tuple[tuple[Dist, Dist] | None, bool]:
        """(value, settled): a settled value cannot change any more and is kept."""
        try:
            return self._settled[feed], True
        except KeyError:
            pass
        if feed.op == "bn":
            if feed.bn is None:
                return None, True
            value, settled = self._outputs(feed.bn), self._is_settled(feed.bn)
        else:
            parts = [self._feed_memo(a) for a in feed.args]
            settled = all(p[1] for p in parts)
            value = self._combine(feed, [p[0] for p in parts])
        if settled:
            self._settled[feed] = value
        return value, settled

    def _combine(self, feed: Feed, args: list[tuple[Dist, Dist] | None]
                 ) -> tuple[Dist, Dist] | None:
        if not args or any(a is None for a in args):
            return None
        pairs = [a for a in args if a is not None]
        if feed.op in ("relu", "relu6") and len(pairs) == 1:
            top = None if feed.op == "relu" else 6.0
            return clip(pairs[0][0], top), clip(pairs[0][1], top)
        if feed.op == "add" and len({p[0].mean.shape for p in pairs}) == 1:
            return add([p[0] for p in pairs]), add([p[1] for p in pairs])
        if feed.op == "maxpool" and len(pairs) == 1:
            return tuple(replace(d, moments=False) for d in pairs[0])  # type: ignore[return-value]
        return None

    def _refine(self, bn: BNParams, prod: ProducerLike, train: Dist, inf: Dist) -> Refined:
        ci, ct = prod.inputs(inf, train)
        x_mean, x_var, skew = bn.mean, bn.var, np.zeros_like(bn.mean)
        if ci.moments:
            # the running variance (training mode) tells how alike the taps are
            rho = ct.rho(bn.var)
            vi = ci.var(rho)
            if self.propagate:
                vt = ct.var(rho)
                finite_vt = vt[np.isfinite(vt)]
                scale = max(median(finite_vt) if finite_vt.size else 0.0, 1e-30) * 1e-9
                x_mean = bn.mean + (ci.mean - ct.mean)
                x_var = bn.var * (vi + scale) / (vt + scale)
            if self.skew:
                with np.errstate(divide="ignore", invalid="ignore"):
                    skew = np.where(vi > 0, ci.k3(rho) / np.maximum(vi, 1e-300) ** 1.5, 0.0)
                skew = np.where(np.isfinite(skew), skew, 0.0)
        x = Dist(x_mean, x_var, ci.lo, ci.hi, True, skew * np.maximum(x_var, 0.0) ** 1.5)
        x = x.bounded()
        ya = bn.gamma * (ci.hi - bn.mean) / bn.sd + bn.beta
        yb = bn.gamma * (ci.lo - bn.mean) / bn.sd + bn.beta
        y_lo, y_hi = np.minimum(ya, yb), np.maximum(ya, yb)
        # y > 0  <=>  u > z with u = sign(gamma) (x - mean_x) / std_x
        sign = np.where(bn.gamma < 0, -1.0, 1.0)
        std = np.sqrt(x.var)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (-bn.beta * bn.sd / np.abs(bn.gamma) - sign * (x.mean - bn.mean)) / std
            u_skew = np.where(std > 0, sign * x.k3 / std ** 3, 0.0)
        ok = (std > 0) & np.isfinite(z) & (bn.gamma != 0)
        p = pearson3_sf(np.where(ok, z, 0.0), np.where(ok, u_skew, 0.0))
        y_const = bn.beta + bn.gamma * (x.mean - bn.mean) / bn.sd
        p = np.where(ok, p, (y_const > 0).astype(np.float64))
        p = np.where(y_hi <= 0, 0.0, np.where(y_lo > 0, 1.0, p))
        # a non-finite weight spoils only the channels it reaches: they keep the plain view
        valid = (np.isfinite(y_lo) & np.isfinite(y_hi) & np.isfinite(x.mean)
                 & np.isfinite(x.var) & np.isfinite(x.k3))
        return Refined(np.where(valid, p, np.nan), np.where(valid, y_lo, -np.inf),
                       np.where(valid, y_hi, np.inf), np.where(valid, x.mean, bn.mean),
                       np.where(valid, x.var, bn.var), np.where(valid, x.k3, 0.0))


def apply(res: ChannelResult, ref: Refined, consumer: str, th: Thresholds) -> ChannelResult:
    """The plain result refined by ``ref``.

    ``p_active`` (and so dead) is the plain Gaussian value unless the range bound
    settles the channel: 0 when its output can never exceed 0, 1 when it never
    falls below. Near-dead also takes the refined tail model (propagated
    moments, skewness): an early warning may use the less certain model.
    """
    finite = np.isfinite(res.p_active)
    bound = np.where(ref.y_hi <= 0, 0.0, np.where(ref.y_lo > 0, 1.0, res.p_active))
    p = np.where(finite, bound if DEAD_FROM == "bound" else ref.p_active, np.nan)
    relu_like = consumer in RELU_LIKE
    dead = relu_like & finite & (p < th.dead_p)
    warn = (p < th.near_dead_p) | (NEAR_FROM_MODEL & (ref.p_active < th.near_dead_p))
    near = relu_like & finite & ~dead & warn
    width = ref.y_hi - ref.y_lo
    const = finite & (ref.y_lo > 0) & (width <= th.constant_rel * np.abs(ref.y_hi))
    constant = sorted(set(res.constant) | set(indices(const)))
    would_be = (consumer == "unknown") & finite & (p < th.dead_p)
    return replace(res, p_active=p, dead=indices(dead), near_dead=indices(near),
                   constant=constant, would_be_dead=indices(would_be))
