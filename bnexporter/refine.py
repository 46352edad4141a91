"""Refined dead-channel estimate from the producing kernel and the upstream BNs.

The plain estimate assumes the BN input x is Gaussian with the running mean and
variance. Two things make that wrong exactly where it matters (early in
training, depthwise layers): x = sum(w * a) over few non-negative inputs is
bounded and skewed, and the running statistics describe the network as it was
(training mode, older weights), not as it runs now. With the producer kernel
and the upstream BN parameters this module

* bounds x: each input a lies in a plausible range (an upstream BN output
  within ``RANGE_SIGMA`` standard deviations, clipped by its ReLU / ReLU6), so
  x lies in [sum of the worst, sum of the best] tap by tap. If the BN output at
  the top of that range is <= 0 the channel cannot fire: dead for certain. A
  dead upstream channel (range {0}) therefore makes the depthwise channel
  reading it constant, which is found without any threshold;
* optionally corrects the running moments of x for the change between
  training mode (where upstream BNs normalise with batch statistics) and
  inference mode (where upstream channels proven dead above are exactly 0),
  by the ratio of the two predicted input variances (``propagate``).

Everything is pure numpy on arrays the caller read; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .analysis import RELU_LIKE, ChannelResult, Thresholds, normal_cdf

if TYPE_CHECKING:  # links.py reads files; this module only needs the shapes of its records
    from .links import Feed, Link

# A Gaussian exceeds 6 standard deviations with probability 1e-9: beyond the
# positions any evaluation set visits, so ranges this wide are safe bounds.
RANGE_SIGMA = 6.0
# correct the running moments for the training -> inference mode change
PROPAGATE = True

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

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(self.var + self.eps)

    @property
    def s(self) -> np.ndarray:
        """Std of the BN output under the plain model."""
        return np.abs(self.gamma) * np.sqrt(self.var) / self.sd

    def finite(self) -> bool:
        return bool(np.isfinite(self.gamma).all() and np.isfinite(self.beta).all()
                    and np.isfinite(self.mean).all() and np.isfinite(self.var).all())


@dataclass
class Dist:
    """Per-channel summary of a tensor: mean, variance and a plausible range."""

    mean: np.ndarray
    var: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    moments: bool = True  # False once an op (max pooling) invalidates mean / var

    def bounded(self) -> Dist:
        """Mean inside the range; variance at most (range / 2)^2 (Popoviciu)."""
        lo, hi = np.minimum(self.lo, self.hi), self.hi
        return Dist(np.clip(self.mean, lo, hi),
                    np.minimum(np.maximum(self.var, 0.0), np.square((hi - lo) / 2.0)),
                    lo, hi, self.moments)


def gaussian(mean: np.ndarray, std: np.ndarray, k: float = RANGE_SIGMA) -> Dist:
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)
    return Dist(mean, std * std, mean - k * std, mean + k * std)


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.square(z)) / _SQRT2PI


def clip(d: Dist, top: float | None) -> Dist:
    """ReLU (top None) or ReLU6 (top 6) of a Gaussian-summarised input.

    Moments are those of a clipped normal with the input's mean and variance;
    the range is clipped exactly.
    """
    m, v = d.mean, np.maximum(d.var, 0.0)
    s = np.sqrt(v)
    pos = s > 0
    ss = np.where(pos, s, 1.0)
    a = -m / ss
    cdf_a, pdf_a = normal_cdf(a), _phi(a)
    if top is None:
        cdf_b, pdf_b = np.ones_like(m), np.zeros_like(m)
        above1 = above2 = b_pdf_b = 0.0
    else:
        b = (top - m) / ss
        cdf_b, pdf_b = normal_cdf(b), _phi(b)
        above1, above2, b_pdf_b = top * (1 - cdf_b), top * top * (1 - cdf_b), b * pdf_b
    mid = cdf_b - cdf_a
    e1 = above1 + m * mid + s * (pdf_a - pdf_b)
    e2 = above2 + (m * m + v) * mid + 2 * m * s * (pdf_a - pdf_b) + v * (a * pdf_a - b_pdf_b)
    cap = np.inf if top is None else top
    e1 = np.where(pos, e1, np.clip(m, 0.0, cap))
    var = np.where(pos, np.maximum(e2 - e1 * e1, 0.0), 0.0)
    return Dist(e1, var, np.clip(d.lo, 0.0, cap), np.clip(d.hi, 0.0, cap), d.moments).bounded()


def add(parts: list[Dist]) -> Dist:
    """Sum of inputs, moments as if independent; ranges add exactly."""
    return Dist(sum(p.mean for p in parts), sum(p.var for p in parts),
                sum(p.lo for p in parts), sum(p.hi for p in parts),
                all(p.moments for p in parts))


def kernel_matrix(kernel: np.ndarray, layout: str) -> np.ndarray:
    """Any supported kernel as (out, in_per_group, taps)."""
    k = np.asarray(kernel, np.float64)
    if layout == "torch":
        return k.reshape(k.shape[0], k.shape[1], -1)
    if layout == "keras_dw":  # (..., in, mult): output channel = in * mult + m
        cin, mult = k.shape[-2], k.shape[-1]
        return k.reshape(-1, cin * mult).T.reshape(cin * mult, 1, -1)
    if k.ndim == 2:  # Dense (in, out)
        return k.T[:, :, None]
    cin, cout = k.shape[-2], k.shape[-1]
    return k.reshape(-1, cin, cout).transpose(2, 1, 0)


@dataclass
class ConvInput:
    """Predicted BN input x for every output channel of a producer."""

    mean: np.ndarray
    var: np.ndarray  # taps of one input channel fully correlated, channels independent
    lo: np.ndarray
    hi: np.ndarray
    moments: bool


def conv_input(w: np.ndarray, groups: int, feed: Dist, bias: np.ndarray | None) -> ConvInput:
    """Moments and range of x = sum(w * a) + bias, with a distributed as ``feed``."""
    out, per_group, taps = w.shape
    cin = feed.mean.shape[0]
    if groups <= 0 or cin != per_group * groups or out % groups:
        raise ValueError("kernel does not match its input")
    idx = (np.arange(out)[:, None] // (out // groups)) * per_group + np.arange(per_group)[None, :]
    m, v, lo, hi = feed.mean[idx], feed.var[idx], feed.lo[idx], feed.hi[idx]
    if taps > 1:  # zero padding: border taps read 0
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    wpos = np.maximum(w, 0.0).sum(axis=2)
    wneg = np.minimum(w, 0.0).sum(axis=2)
    wsum = wpos + wneg
    b = np.zeros(out) if bias is None else np.asarray(bias, np.float64)
    return ConvInput(
        mean=(wsum * m).sum(axis=1) + b,
        var=(np.square(wsum) * v).sum(axis=1),
        lo=(wpos * lo + wneg * hi).sum(axis=1) + b,
        hi=(wpos * hi + wneg * lo).sum(axis=1) + b,
        moments=feed.moments)


@dataclass
class Refined:
    """Refined view of one BN layer (inference mode)."""

    p_active: np.ndarray  # P(y > 0)
    y_lo: np.ndarray      # range of the BN output over plausible inputs (+-inf: unknown)
    y_hi: np.ndarray
    x_mean: np.ndarray    # inference-mode moments of the BN input
    x_var: np.ndarray


@dataclass(frozen=True)
class Producer:
    """A link with its kernel read: (out, in_per_group, taps) and optional bias."""

    link: Link
    w: np.ndarray
    bias: np.ndarray | None


def refine_network(params: Mapping[str, BNParams], producers: Mapping[str, Producer],
                   propagate: bool | None = None, k: float | None = None
                   ) -> dict[str, Refined]:
    """Refine every BN with a usable producer, upstream layers first.

    Layers whose feed cannot be evaluated are left out (plain estimate).
    ``None`` takes the module defaults ``PROPAGATE`` / ``RANGE_SIGMA``.
    """
    net = _Network(params, producers, PROPAGATE if propagate is None else propagate,
                   RANGE_SIGMA if k is None else k)
    for name in producers:
        net.visit(name, set())
    return net.done


class _Network:
    def __init__(self, params: Mapping[str, BNParams], producers: Mapping[str, Producer],
                 propagate: bool, k: float):
        self.params, self.producers = params, producers
        self.propagate, self.k = propagate, k
        self.done: dict[str, Refined] = {}
        self.failed: set[str] = set()

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
        inf.lo = np.maximum(inf.lo, ref.y_lo)
        inf.hi = np.minimum(inf.hi, ref.y_hi)
        return train, inf.bounded()

    def _feed(self, feed: Feed) -> tuple[Dist, Dist] | None:
        if feed.op == "bn":
            return None if feed.bn is None else self._outputs(feed.bn)
        args = [self._feed(a) for a in feed.args]
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

    def _refine(self, bn: BNParams, prod: Producer, train: Dist, inf: Dist) -> Refined:
        w, groups = prod.w, prod.link.groups
        ci = conv_input(w, groups, inf, prod.bias)
        x_mean, x_var = bn.mean, bn.var
        if self.propagate and ci.moments:
            ct = conv_input(w, groups, train, prod.bias)
            scale = max(float(np.median(ct.var)), 1e-30) * 1e-9
            x_mean = bn.mean + (ci.mean - ct.mean)
            x_var = bn.var * (ci.var + scale) / (ct.var + scale)
        x = Dist(x_mean, x_var, ci.lo, ci.hi).bounded()
        ya = bn.gamma * (ci.hi - bn.mean) / bn.sd + bn.beta
        yb = bn.gamma * (ci.lo - bn.mean) / bn.sd + bn.beta
        y_lo, y_hi = np.minimum(ya, yb), np.maximum(ya, yb)
        y_mean = bn.beta + bn.gamma * (x.mean - bn.mean) / bn.sd
        y_std = np.abs(bn.gamma) * np.sqrt(x.var) / bn.sd
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(y_std > 0, y_mean / y_std, 0.0)
        p = np.where(y_std > 0, normal_cdf(z), (y_mean > 0).astype(np.float64))
        p = np.where(y_hi <= 0, 0.0, np.where(y_lo > 0, 1.0, p))
        return Refined(p, y_lo, y_hi, x.mean, x.var)


def apply(res: ChannelResult, ref: Refined, consumer: str, th: Thresholds) -> ChannelResult:
    """The plain result with dead / near-dead (and constant) taken from ``ref``."""
    p = np.where(np.isfinite(res.p_active), ref.p_active, np.nan)
    finite = np.isfinite(p)
    relu_like = consumer in RELU_LIKE
    dead = relu_like & finite & (p < th.dead_p)
    near = relu_like & finite & ~dead & (p < th.near_dead_p)
    width = ref.y_hi - ref.y_lo
    const = finite & (ref.y_lo > 0) & (width <= th.constant_rel * np.abs(ref.y_hi))
    idx = lambda mask: [int(i) for i in np.flatnonzero(mask)]  # noqa: E731
    constant = sorted(set(res.constant) | set(idx(const)))
    return replace(res, p_active=p, dead=idx(dead), near_dead=idx(near), constant=constant)
