"""Data-free census: inputs distilled from the checkpoint's own BN statistics (ZeroQ).

ZeroQ (Cai et al., CVPR 2020) optimises a batch of noise inputs until, at the input of
*every* BN layer, the batch mean and standard deviation per channel match that layer's
running mean and ``sqrt(running_var + eps)``. The census (``census.run_census``) then
runs on those inputs instead of real data. This module is that optimisation with no
framework at run time: a plain-numpy reverse-mode pass over the graph IR.

Two choices differ from the paper (docs/distill.md has the measurements):

- ``bn_mode="train"`` (the default of :func:`distill`): while distilling, every BN
  normalises by the batch's own statistics, as in the training steps that produced the
  running statistics. Early in training the running statistics describe the *training*
  mode network: on real images the inference-mode BN inputs of a MobileNetV2 at step 100
  have 0.1 - 0.3 of the running standard deviation in the last blocks, while their
  training-mode batch statistics match it (0.85 - 1.0). Matching the targets in
  inference mode (``bn_mode="eval"``, the paper's) forces far more activity than real
  data have and misses most early deaths.
- a smoothness prior (``smooth``, :meth:`Program._smoothness`): statistics alone are
  matched by high-frequency noise at twice the amplitude of real data, which behaves like
  real data in training mode and not in inference mode (false deaths in the last BN).

Forward pass: the census engine's layers (``census._Conv``, ``_Pool``, the elementwise
functions, ``_Engine.compile``); in ``eval`` mode exactly the census's inference-mode
network. Each op also keeps the little it needs for its backward pass (ReLU / ReLU6: a
boolean mask; conv: nothing, only its kernel; BN: its input or normalised input), and
activations are freed after their last forward reader.

Loss (``normalize="channel"``, the default), summed over BN layers and averaged over
them, one term per layer averaged over its channels:

    L_l = mean_c [ (mu_b,c - mu_c)^2 + (sd_b,c - sd_c)^2 ] / d_c^2
    sd_b,c = sqrt(var_b,c + eps)   sd_c = sqrt(running_var_c + eps)
    d_c = max(sd_c, floor * median_c(sd_c))

``mu_b`` / ``var_b`` are the batch statistics of the BN *input* over N·H·W (biased
variance, as BN's training mode computes it). Dividing by ``d_c`` makes each channel's
error count in units of that channel's own spread (what decides the sign of the BN
output) and every layer count alike, however its scale grew in training; the floor keeps
channels whose running variance collapsed from dominating. ``normalize="zeroq"`` is the
paper's plain ``||.||^2 / C`` per layer. There is no stop-gradient: the whole loss
backpropagates through every layer.

Optimiser: Adam on the inputs (betas 0.9 / 0.999), seeded Gaussian start, optional cosine
decay of the learning rate. Everything is float32 and single-process: a seed gives the same
bytes. ``init`` warm-starts from earlier inputs (the previous checkpoint's), which is what
makes a daemon affordable: a few iterations instead of hundreds (``detection/warm.py``).

Evidence: :func:`distilled_census` labels its result ``census:distilled``;
:func:`layer_evidence` / :func:`channel_evidence` combine a sample census, a distilled one
and the weights-only estimate into per-layer and per-channel evidence labels.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnexporter.detection.census import (
    _NP_PAD,
    _PATCH_BYTES,
    CensusResult,
    _as4d,
    _Conv,
    _Engine,
    _explicit_pads,
    _out_size,
    _pad_hw,
    _Pool,
    _resolve_pads,
    _sigmoid,
    _taps,
    _Unsupported,
    run_census,
)
from bnexporter.topology.graph import Graph, Node

EVIDENCE_SAMPLE = "census:sample"
EVIDENCE_DISTILLED = "census:distilled"
EVIDENCE_ESTIMATE = "estimate"

DEFAULT_ITERS = 300       # a one-shot scan (cold start)
DEFAULT_WARM_ITERS = 60   # a daemon warm-started from the previous checkpoint's inputs
DEFAULT_LR = 0.1
DEFAULT_N = 32
STD_FLOOR = 0.1           # d_c >= STD_FLOOR * median running std of the layer
DEFAULT_BN_MODE = "train"  # BNs normalise by the batch, as when the statistics were taken
DEFAULT_SMOOTH = 0.005     # weight of the smoothness prior (scale-free, docs/distill.md)


# -- results --------------------------------------------------------------------------

@dataclass(frozen=True)
class BNMismatch:
    """How far one BN's input statistics on the distilled batch are from its running ones.

    ``mean_err`` / ``std_err``: RMS over channels of ``(mu_b - mu) / d`` and
    ``(sd_b - sd) / d`` (in units of the channel's running std, floored); ``worst`` the
    largest per-channel ``max(|.|, |.|)``; ``loss`` the layer's term of the objective.
    """

    mean_err: float
    std_err: float
    worst: float
    loss: float


@dataclass(frozen=True)
class Distilled:
    inputs: np.ndarray                    # (n, *input_shape) float32, graph layout
    loss: float                           # objective at ``inputs`` (after the last step)
    iterations: int                       # optimiser steps run
    seconds: float
    mismatch: Mapping[str, BNMismatch]    # per BN that takes part in the loss
    losses: tuple[float, ...] = ()        # objective before each step (then the final one)
    skipped: Mapping[str, str] = field(default_factory=dict)  # node -> reason
    timed_out: bool = False
    seed: int = 0
    lr: float = DEFAULT_LR
    warm: bool = False                    # started from ``init``


@dataclass(frozen=True)
class DistilledCensus:
    census: CensusResult
    distilled: Distilled
    evidence: str = EVIDENCE_DISTILLED
    seconds: float = 0.0                  # distillation + census


# -- backward-capable layers ----------------------------------------------------------

def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``g`` down to ``shape`` (the reverse of numpy broadcasting)."""
    if g.shape == shape:
        return g
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape, strict=True))
                 if b == 1 and a != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


def _pad_backward(g: np.ndarray, hw: tuple[int, int], pads: tuple[int, int, int, int],
                  mode: str) -> np.ndarray:
    """Gradient of ``census._pad_hw`` (N, H, W, C) with non-negative pads."""
    if not any(pads):
        return g
    h, w = hw
    np_mode = _NP_PAD.get(mode)
    if np_mode == "constant":
        return g[:, pads[0]:pads[0] + h, pads[2]:pads[2] + w]
    if np_mode is None:
        raise _Unsupported(f"padding_mode {mode!r} not supported")
    ih = np.pad(np.arange(h), (pads[0], pads[1]), mode=np_mode)  # type: ignore[call-overload]
    iw = np.pad(np.arange(w), (pads[2], pads[3]), mode=np_mode)  # type: ignore[call-overload]
    t = np.zeros((g.shape[0], h, g.shape[2], g.shape[3]), g.dtype)
    np.add.at(t, (slice(None), ih), g)  # type: ignore[arg-type]
    out = np.zeros((g.shape[0], h, w, g.shape[3]), g.dtype)
    np.add.at(out, (slice(None), slice(None), iw), t)  # type: ignore[arg-type]
    return out


class _ConvOp:
    def __init__(self, node: Node, eng: _Engine):
        self.conv = _Conv(node, eng.tensor(node, "kernel"), eng.optional(node, "bias"),
                          "oihw" if eng.torch_kernels else "hwio")

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        x = xs[0]
        y = self.conv(x)
        return y, x.shape

    def backward(self, g: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray | None]:
        conv = self.conv
        squeezed = len(shape) == 3
        if squeezed:
            g = g[:, None]
            shape = (shape[0], 1, shape[1], shape[2])
        n, h, w, cin = shape
        kh, kw, ki, ko = conv.kernel.shape
        s, d = conv.stride, conv.dilation
        pads = _resolve_pads(conv.padding, (h, w), (kh, kw), s, d, 1 if squeezed else conv.rank)
        hp, wp = h + pads[0] + pads[1], w + pads[2] + pads[3]
        ho, wo = g.shape[1], g.shape[2]
        groups = cin if conv.depthwise else int(conv.groups or 1)
        g = np.ascontiguousarray(g, np.float32)
        dxp = np.zeros((n, hp, wp, cin), np.float32)
        if groups == cin and groups > 1 and ki in (1, cin) and (ki == cin or ko % cin == 0):
            wdw = conv.kernel.reshape(kh, kw, cin, -1)
            m = wdw.shape[3]
            gr = g.reshape(n, ho, wo, cin, m) if m > 1 else g
            for i, j, view in _taps(dxp, (kh, kw), s, d, (ho, wo)):
                if m > 1:
                    view += (gr * wdw[i, j]).sum(axis=-1)
                else:
                    view += gr * wdw[i, j, :, 0]
        else:
            one = kh == kw == 1 and s == (1, 1)
            per_image = ho * wo * kh * kw * cin * 4
            step = max(1, _PATCH_BYTES // max(per_image, 1))
            og = ko // groups
            kmat = conv.kernel.reshape(kh * kw, ki, groups, og)
            for start in range(0, n, step):
                stop = min(n, start + step)
                b = stop - start
                rows = b * ho * wo
                gy = g[start:stop].reshape(rows, ko)
                if groups == 1:
                    dcols = gy @ conv.kernel.reshape(kh * kw * cin, ko).T
                else:
                    dc = np.empty((rows, kh * kw, groups, ki), np.float32)
                    for gi in range(groups):
                        bm = kmat[:, :, gi].reshape(kh * kw * ki, og)
                        dc[:, :, gi, :] = (gy[:, gi * og:(gi + 1) * og] @ bm.T).reshape(
                            rows, kh * kw, ki)
                    dcols = dc
                part = dxp[start:stop]
                if one:
                    part[:, :ho, :wo] += dcols.reshape(b, ho, wo, cin)
                    continue
                dcols = dcols.reshape(b, ho, wo, kh * kw, cin)
                for i, j, view in _taps(part, (kh, kw), s, d, (ho, wo)):
                    view += dcols[:, :, :, i * kw + j, :]
        dx = _pad_backward(dxp, (h, w), pads, conv.mode)
        return [dx[:, 0] if squeezed else dx]


class _DenseOp:
    def __init__(self, node: Node, eng: _Engine):
        self.eng = eng
        self.fn = eng.compile(node)
        w = eng.tensor(node, "kernel").astype(np.float32)
        self.w = np.ascontiguousarray(w.T if eng.torch_kernels else w)

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        return self.fn(xs), None

    def backward(self, g: np.ndarray, _ctx: Any) -> list[np.ndarray | None]:
        eng = self.eng
        return [eng.from_native(eng.to_native(g) @ self.w.T)]


class _BNOp:
    """Eval-mode BN (the running-statistics affine map) + the ZeroQ target."""

    def __init__(self, node: Node, eng: _Engine):
        self.fn = eng.compile(node)   # validates shapes / vectors like the census
        mean = eng.tensor(node, "mean").astype(np.float64).reshape(-1)
        var = eng.tensor(node, "var").astype(np.float64).reshape(-1)
        c = mean.shape[0]
        g = eng.optional(node, "gamma")
        self.gamma = np.ones(c) if g is None else g.astype(np.float64).reshape(-1)
        self.eps = float(node.attrs.get("eps", 1e-5 if eng.nchw else 1e-3))
        self.scale = (self.gamma / np.sqrt(var + self.eps)).astype(np.float32)
        self.mu = mean
        self.sd = np.sqrt(np.maximum(var, 0.0) + self.eps)

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        return self.fn(xs), None

    def backward(self, g: np.ndarray, _ctx: Any) -> list[np.ndarray | None]:
        return [g * self.scale]


class _TrainBNOp(_BNOp):
    """Training-mode BN: the batch's own statistics normalise it (as in the training
    step that produced the running statistics); the ZeroQ target is unchanged."""

    def __init__(self, node: Node, eng: _Engine):
        super().__init__(node, eng)
        b = eng.optional(node, "beta")
        self.g32 = self.gamma.astype(np.float32)
        self.b32 = np.zeros_like(self.g32) if b is None else b.astype(np.float32).reshape(-1)

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        x = xs[0]
        c = self.g32.shape[0]
        if x.shape[-1] != c:
            raise _Unsupported(f"BN of {c} channels on input {x.shape[1:]}")
        flat = x.reshape(-1, c)
        m = flat.mean(axis=0, dtype=np.float64).astype(np.float32)
        v = flat.var(axis=0, dtype=np.float64)
        inv = (1.0 / np.sqrt(v + self.eps)).astype(np.float32)
        xhat = (x - m) * inv
        return xhat * self.g32 + self.b32, (xhat, inv)

    def backward(self, g: np.ndarray, ctx: Any) -> list[np.ndarray | None]:
        xhat, inv = ctx
        c = self.g32.shape[0]
        gf = g.reshape(-1, c)
        p = max(gf.shape[0], 1)
        s1 = gf.sum(axis=0, dtype=np.float64) / p
        s2 = np.einsum("pc,pc->c", gf, xhat.reshape(-1, c), dtype=np.float64) / p
        dx = (g - s1.astype(np.float32) - xhat * s2.astype(np.float32)) * (self.g32 * inv)
        return [dx]


class _ElementwiseOp:
    def __init__(self, node: Node, eng: _Engine):
        self.fn = eng.compile(node)
        self.deriv = _derivative(node)

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        x = xs[0]
        return self.fn(xs), self.deriv(x)

    def backward(self, g: np.ndarray, dydx: np.ndarray) -> list[np.ndarray | None]:
        if dydx.dtype == np.bool_:
            return [np.where(dydx, g, np.float32(0))]
        return [g * dydx]


def _derivative(node: Node) -> Callable[[np.ndarray], np.ndarray]:  # noqa: C901
    """d act / dx as a function of the input (a boolean mask for 0/1 derivatives)."""
    op, a = node.op, node.attrs
    f32 = np.float32
    if op == "relu":
        return lambda x: x > 0
    if op == "relu6":
        return lambda x: (x > 0) & (x < 6)
    if op == "sigmoid":
        def dsig(x: np.ndarray) -> np.ndarray:
            s = _sigmoid(x)
            return (s * (1 - s)).astype(f32)
        return dsig
    if op == "silu":
        def dsilu(x: np.ndarray) -> np.ndarray:
            s = _sigmoid(x)
            return (s * (1 + x * (1 - s))).astype(f32)
        return dsilu
    if op == "hardswish":
        return lambda x: np.where(x <= -3, f32(0), np.where(x >= 3, f32(1),
                                                            (2 * x + 3) / 6)).astype(f32)
    if op == "tanh":
        return lambda x: (1 - np.tanh(x) ** 2).astype(f32)
    if op == "leaky_relu":
        alpha = f32(a.get("alpha", a.get("negative_slope", 0.01)))
        return lambda x: np.where(x >= 0, f32(1), alpha).astype(f32)
    if op == "gelu":
        if str(a.get("approximate", "none")).lower() in ("tanh", "true"):
            c = math.sqrt(2 / math.pi)

            def dgelu_t(x: np.ndarray) -> np.ndarray:
                u = c * (x + 0.044715 * x ** 3)
                t = np.tanh(u)
                return (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
                        ).astype(f32)
            return dgelu_t
        erf = np.vectorize(math.erf, otypes=[np.float64])

        def dgelu(x: np.ndarray) -> np.ndarray:
            xd = x.astype(np.float64)
            return (0.5 * (1 + erf(xd / math.sqrt(2)))
                    + xd * np.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)).astype(f32)
        return dgelu
    if op == "activation":
        name = str(a.get("name", "")).lower()
        if name == "relu":
            slope = f32(a.get("negative_slope") or a.get("alpha") or 0.0)
            thr = float(a.get("threshold") or 0.0)
            mx = a.get("max_value")

            def drelu(x: np.ndarray) -> np.ndarray:
                d = np.where(x >= thr, f32(1), slope).astype(f32)
                if mx is not None:
                    d[x >= float(mx)] = 0
                return d
            return drelu
        if name == "elu":
            al = float(a.get("alpha", 1.0))
            return lambda x: np.where(x > 0, 1.0, al * np.exp(np.minimum(x, 0))).astype(f32)
        if name == "selu":
            al, sc = 1.6732632423543772, 1.0507009873554805
            return lambda x: (sc * np.where(x > 0, 1.0, al * np.exp(np.minimum(x, 0)))
                              ).astype(f32)
        if name == "softplus":
            return lambda x: _sigmoid(x).astype(f32)
        if name == "softsign":
            return lambda x: (1 / (1 + np.abs(x)) ** 2).astype(f32)
        if name == "exponential":
            return lambda x: np.exp(x).astype(f32)
        if name == "mish":
            def dmish(x: np.ndarray) -> np.ndarray:
                sp = np.logaddexp(0, x)
                t = np.tanh(sp)
                return (t + x * (1 - t * t) * _sigmoid(x)).astype(f32)
            return dmish
        if name == "leaky_relu":
            alpha = f32(a.get("alpha", a.get("negative_slope", 0.2)))
            return lambda x: np.where(x >= 0, f32(1), alpha).astype(f32)
    raise _Unsupported(f"no derivative for {op} {a.get('name', '')!r}".strip())


class _PassOp:  # identity / output
    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        return xs[0], None

    def backward(self, g: np.ndarray, _ctx: Any) -> list[np.ndarray | None]:
        return [g]


class _AddOp:
    def __init__(self, node: Node, eng: _Engine):
        self.fn = eng.compile(node)

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        return self.fn(xs), [x.shape for x in xs]

    def backward(self, g: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray | None]:
        return [_unbroadcast(g, s) for s in shapes]


class _MulOp:
    def __init__(self, node: Node, eng: _Engine):
        self.fn = eng.compile(node)

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        return self.fn(xs), list(xs)

    def backward(self, g: np.ndarray, xs: list[np.ndarray]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for i, x in enumerate(xs):
            p = g
            for j, other in enumerate(xs):
                if j != i:
                    p = p * other
            out.append(_unbroadcast(p, x.shape))
        return out


class _ConcatOp:
    def __init__(self, node: Node, eng: _Engine):
        self.eng = eng
        self.ax = int(node.attrs.get("axis", -1 if not eng.nchw else 1))

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        i = self.eng.axis(self.ax, xs[0].ndim)
        return np.concatenate(xs, axis=i), (i, [x.shape[i] for x in xs])

    def backward(self, g: np.ndarray, ctx: Any) -> list[np.ndarray | None]:
        i, sizes = ctx
        return list(np.split(g, np.cumsum(sizes)[:-1], axis=i))


class _SoftmaxOp:
    def __init__(self, node: Node, eng: _Engine):
        self.fn = eng.compile(node)
        self.eng = eng
        self.ax = int(node.attrs.get("axis", -1 if not eng.nchw else 1))

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        y = self.fn(xs)
        return y, y

    def backward(self, g: np.ndarray, y: np.ndarray) -> list[np.ndarray | None]:
        i = self.eng.axis(self.ax, y.ndim)
        return [y * (g - (g * y).sum(axis=i, keepdims=True))]


class _PoolOp:
    def __init__(self, node: Node, eng: _Engine):
        self.pool = _Pool(node, eng.graph.layout)

    def _geometry(self, shape: tuple[int, ...]) -> tuple[Any, ...]:
        """The padding / window arithmetic of ``census._Pool.__call__``."""
        p = self.pool
        squeezed = len(shape) == 3
        n, h, w, c = (shape[0], 1, shape[1], shape[2]) if squeezed else shape
        k, s, d, pads, full = p.geometry(h, w, squeezed)
        hp, wp = h + full[0] + full[1], w + full[2] + full[3]
        ho, wo = _out_size(hp, k[0], s[0], d[0]), _out_size(wp, k[1], s[1], d[1])
        return squeezed, (n, h, w, c), k, s, d, pads, full, (hp, wp), (ho, wo)

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        x = xs[0]
        y = self.pool(x)
        if not self.pool.max:
            return y, x.shape
        # which tap won (the first maximal one, like a framework's argmax)
        squeezed, _, k, s, d, _, full, _, out = self._geometry(x.shape)
        x4, _ = _as4d(x)
        y4 = y[:, None] if squeezed else y
        xp = _pad_hw(x4, full, "zeros", -np.inf)
        arg = np.full(y4.shape, -1, np.int16)
        for i, j, view in _taps(xp, k, s, d, out):
            hit = (arg < 0) & (view == y4)
            arg[hit] = i * k[1] + j
        return y, (x.shape, arg)

    def backward(self, g: np.ndarray, ctx: Any) -> list[np.ndarray | None]:
        shape, arg = (ctx if self.pool.max else (ctx, None))
        squeezed, (n, h, w, c), k, s, d, pads, full, (hp, wp), out = self._geometry(shape)
        g4 = g[:, None] if squeezed else g
        dxp = np.zeros((n, hp, wp, c), np.float32)
        if self.pool.max:
            for i, j, view in _taps(dxp, k, s, d, out):
                view += np.where(arg == i * k[1] + j, g4, np.float32(0))
        else:
            ones = np.zeros((1, hp, wp, 1), np.float32)
            if self.pool.include_pad:
                ones[:, :h + pads[0] + pads[1], :w + pads[2] + pads[3]] = 1.0
            else:
                ones[:, pads[0]:pads[0] + h, pads[2]:pads[2] + w] = 1.0
            cnt = np.zeros((1, out[0], out[1], 1), np.float32)
            for _, _, view in _taps(ones, k, s, d, out):
                cnt += view
            gs = g4 / np.maximum(cnt, 1.0)
            for _, _, view in _taps(dxp, k, s, d, out):
                view += gs
        dx = dxp[:, full[0]:full[0] + h, full[2]:full[2] + w]
        return [dx[:, 0] if squeezed else dx]


class _GlobalPoolOp:
    def __init__(self, node: Node, eng: _Engine):
        self.fn = eng.compile(node)
        self.mean = node.op == "gap"
        self.keep = bool(node.attrs.get("keepdims", False))

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        x = xs[0]
        y = self.fn(xs)
        if self.mean:
            return y, x.shape
        axes = tuple(range(1, x.ndim - 1))
        return y, (x.shape, x == x.max(axis=axes, keepdims=True))

    def backward(self, g: np.ndarray, ctx: Any) -> list[np.ndarray | None]:
        if self.mean:
            shape = ctx
            spatial = int(np.prod(shape[1:-1]))
            gk = g.reshape((shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],))
            return [np.broadcast_to(gk / np.float32(spatial), shape).astype(np.float32)]
        shape, hit = ctx
        # ties share the gradient equally (rare in float inputs)
        gk = g.reshape((shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],))
        axes = tuple(range(1, len(shape) - 1))
        cnt = hit.sum(axis=axes, keepdims=True).astype(np.float32)
        return [np.where(hit, gk / np.maximum(cnt, 1), np.float32(0))]


class _ReshapeOp:  # flatten / reshape
    def __init__(self, node: Node, eng: _Engine):
        self.fn = eng.compile(node)
        self.eng = eng

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        x = xs[0]
        return self.fn(xs), (x.shape, self.eng.to_native(x).shape)

    def backward(self, g: np.ndarray, ctx: Any) -> list[np.ndarray | None]:
        _, native = ctx
        return [self.eng.from_native(self.eng.to_native(g).reshape(native))]


class _PadOp:
    def __init__(self, node: Node, eng: _Engine):
        self.fn = eng.compile(node)
        self.pads = node.attrs.get("pads")
        self.mode = str(node.attrs.get("mode", "zeros"))

    def forward(self, xs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        return self.fn(xs), xs[0].shape

    def backward(self, g: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray | None]:
        squeezed = len(shape) == 3
        g4 = g[:, None] if squeezed else g
        h, w = (1, shape[1]) if squeezed else (shape[1], shape[2])
        pp = _explicit_pads(self.pads, 1 if squeezed else 2)
        grow = (max(pp[0], 0), max(pp[1], 0), max(pp[2], 0), max(pp[3], 0))
        crop = (max(-pp[0], 0), max(-pp[1], 0), max(-pp[2], 0), max(-pp[3], 0))
        if any(crop):
            g4 = np.pad(g4, ((0, 0), (crop[0], crop[1]), (crop[2], crop[3]), (0, 0)))
        dx = _pad_backward(g4, (h, w), grow, self.mode)
        return [dx[:, 0] if squeezed else dx]


def _make_op(node: Node, eng: _Engine, bn_mode: str = "eval") -> Any:
    op = node.op
    if op in ("identity", "output"):
        return _PassOp()
    if op == "conv":
        return _ConvOp(node, eng)
    if op == "dense":
        return _DenseOp(node, eng)
    if op == "bn":
        return _TrainBNOp(node, eng) if bn_mode == "train" else _BNOp(node, eng)
    if op in ("relu", "relu6", "silu", "hardswish", "sigmoid", "tanh", "gelu",
              "leaky_relu", "activation"):
        return _ElementwiseOp(node, eng)
    if op == "add":
        return _AddOp(node, eng)
    if op == "mul":
        return _MulOp(node, eng)
    if op == "concat":
        return _ConcatOp(node, eng)
    if op == "softmax":
        return _SoftmaxOp(node, eng)
    if op in ("maxpool", "avgpool"):
        return _PoolOp(node, eng)
    if op in ("gap", "gmp"):
        return _GlobalPoolOp(node, eng)
    if op in ("flatten", "reshape"):
        return _ReshapeOp(node, eng)
    if op == "pad":
        return _PadOp(node, eng)
    eng.compile(node)  # raises the census's own reason
    raise _Unsupported(f"unsupported op {op!r}")


# -- the program: forward, ZeroQ loss, backward ---------------------------------------

class Program:
    """The graph compiled for distillation: ``loss_and_grad(x)`` over the BNs it reaches.

    Nodes the engine cannot run are skipped (with a reason) together with everything that
    depends on them; the BNs left out take no part in the loss.
    """

    def __init__(self, graph: Graph, fetch: Callable[[str], np.ndarray], *,  # noqa: C901
                 normalize: str = "channel", std_floor: float = STD_FLOOR,
                 layers: Sequence[str] | None = None, bn_mode: str = "eval",
                 smooth: float = 0.0):
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"bn_mode must be eval or train, not {bn_mode!r}")
        if not smooth >= 0:
            raise ValueError(f"smooth must be >= 0, not {smooth!r}")
        self.smooth = float(smooth)
        if normalize not in ("channel", "layer", "zeroq"):
            raise ValueError(f"normalize must be channel, layer or zeroq, not {normalize!r}")
        self.graph = graph
        self.eng = _Engine(graph, fetch)
        by = graph.by_name()
        cons = graph.consumers()
        bns = [n.name for n in graph.nodes if n.op == "bn"]
        if layers is not None:
            wanted = set(layers)
            bns = [b for b in bns if b in wanted]
        # a BN's output is only needed when a later BN reads it: its own loss is on its
        # input, which is what the walk from its inputs reaches
        self.order = graph.needed_by(bns)
        needed = {n.name for n in self.order}
        self.skipped: dict[str, str] = {}
        self.ops: dict[str, Any] = {}

        def skip(name: str, reason: str) -> None:
            if name in self.skipped:
                return
            self.skipped[name] = reason
            stack = [name]
            while stack:
                for u in cons.get(stack.pop(), []):
                    if u in needed and u not in self.skipped:
                        self.skipped[u] = f"depends on skipped node {name}"
                        stack.append(u)

        inputs = [n.name for n in self.order if n.op == "input"]
        self.input_name = inputs[0] if inputs else None
        for n in self.order:
            if n.name in self.skipped:
                continue
            missing = [i for i in n.inputs if i not in by]
            if missing:
                skip(n.name, f"input {missing[0]!r} is not in the graph")
                continue
            if n.op == "input":
                if n.name != self.input_name:
                    skip(n.name, f"model input {n.name!r}: only one input is distilled")
                continue
            try:
                self.ops[n.name] = _make_op(n, self.eng, bn_mode)
            except _Unsupported as exc:
                skip(n.name, str(exc))
            except Exception as exc:
                skip(n.name, f"error: {exc.__class__.__name__}: {exc}")
        self.bns = [b for b in bns if b in needed and b not in self.skipped]
        self.normalize = normalize
        self.weights: dict[str, np.ndarray] = {}
        for b in self.bns:
            op = self.ops[b]
            sd = op.sd
            if normalize == "channel":
                floor = std_floor * float(np.median(sd)) if sd.size else 0.0
                den = np.maximum(sd, floor) ** 2
            elif normalize == "layer":
                den = np.full_like(sd, float(np.mean(sd ** 2)))
            else:
                den = np.ones_like(sd)
            self.weights[b] = 1.0 / (den * max(sd.size, 1))
        self._refs0: dict[str, int] = {n.name: 0 for n in self.order}
        for n in self.order:
            for i in n.inputs:
                if i in self._refs0:
                    self._refs0[i] += 1
        self._by = by

    def loss_and_grad(self, x: np.ndarray, *, grad: bool = True  # noqa: C901
                      ) -> tuple[float, np.ndarray | None, dict[str, BNMismatch]]:
        """The objective at ``x`` (graph layout), its gradient (same layout) and per-BN
        mismatches. BNs that fail at run time (shape errors) are skipped for good."""
        eng = self.eng
        acts: dict[str, np.ndarray] = {}
        ctxs: dict[str, Any] = {}
        refs = dict(self._refs0)
        bn_grads: dict[str, np.ndarray] = {}
        mism: dict[str, BNMismatch] = {}
        total = 0.0
        nb = max(len(self.bns), 1)
        ran: list[str] = []
        for n in self.order:
            if n.name in self.skipped:
                continue
            if n.op == "input":
                y = eng.from_native(np.asarray(x, np.float32))
            else:
                op = self.ops[n.name]
                if any(i not in acts for i in n.inputs):
                    self._skip_runtime(n.name, "an input was skipped")
                    continue
                xs = [acts[i] for i in n.inputs]
                try:
                    if n.name in self.weights:
                        term, gx, mm = self._bn_loss(n.name, xs[0], grad)
                        total += term / nb
                        mism[n.name] = mm
                        if gx is not None:
                            bn_grads[n.name] = gx / np.float32(nb)
                    y, ctx = op.forward(xs)
                except _Unsupported as exc:
                    self._skip_runtime(n.name, str(exc))
                    continue
                except (ValueError, IndexError, FloatingPointError) as exc:
                    self._skip_runtime(n.name, f"error: {exc.__class__.__name__}: {exc}")
                    continue
                ctxs[n.name] = ctx
                ran.append(n.name)
            if y.dtype != np.float32:
                y = y.astype(np.float32)
            for i in n.inputs:
                if i in refs:
                    refs[i] -= 1
                    if refs[i] <= 0:
                        acts.pop(i, None)
            if refs.get(n.name, 0) > 0:
                acts[n.name] = y
        del acts
        prior, g_prior = self._smoothness(x, grad) if self.smooth else (0.0, None)
        total += prior
        if not grad:
            return total, None, mism
        grads: dict[str, np.ndarray] = {}
        for name in reversed(ran):
            n = self._by[name]
            gy = grads.pop(name, None)
            gin: list[np.ndarray | None]
            if gy is not None:
                gin = self.ops[name].backward(gy, ctxs.pop(name))
            else:
                ctxs.pop(name, None)
                gin = [None] * len(n.inputs)
            if name in bn_grads:
                extra = bn_grads.pop(name)
                gin[0] = extra if gin[0] is None else gin[0] + extra
            for src, gi in zip(n.inputs, gin, strict=True):
                if gi is None:
                    continue
                prev = grads.get(src)
                grads[src] = gi if prev is None else prev + gi
        gx = grads.get(self.input_name or "")
        if gx is None:
            gx = np.zeros_like(np.asarray(x, np.float32))
        else:
            gx = eng.to_native(gx).astype(np.float32)
        if g_prior is not None:
            gx = gx + g_prior
        return total, np.ascontiguousarray(gx), mism

    def _smoothness(self, x: np.ndarray, grad: bool) -> tuple[float, np.ndarray | None]:
        """``smooth`` x T / V: T the squared difference of neighbouring input values along
        each spatial axis (mean per axis, averaged over the axes), V the variance of all
        the values; and its gradient.

        Without it the inputs that match the statistics are high-frequency noise several
        times the amplitude of real data; once the BNs run on their own running
        statistics (the census, inference mode) such inputs propagate unlike real ones.
        T / V does not change with the input's scale (pixels in 0..255 or -1..1 alike):
        white noise has 2, the images of the test generator ~0.26.
        """
        x = np.asarray(x, np.float32)
        span = range(1, x.ndim - 1) if self.graph.layout != "nchw" else range(2, x.ndim)
        axes = [a for a in span if x.shape[a] > 1]
        cen = x - np.float32(x.mean(dtype=np.float64))
        v = float(np.mean(cen.astype(np.float64) ** 2))
        if not axes or v <= 0:
            return 0.0, None
        t = 0.0
        gt = np.zeros_like(x) if grad else None
        for a in axes:
            hi = [slice(None)] * x.ndim
            lo = [slice(None)] * x.ndim
            hi[a], lo[a] = slice(1, None), slice(None, -1)
            d = x[tuple(hi)] - x[tuple(lo)]
            t += float(np.mean(d.astype(np.float64) ** 2)) / len(axes)
            if gt is not None:
                step = d * np.float32(2 / (d.size * len(axes)))
                gt[tuple(hi)] += step
                gt[tuple(lo)] -= step
        loss = self.smooth * t / v
        if gt is None:
            return loss, None
        gv = cen * np.float32(2 / cen.size)
        return loss, (gt * np.float32(self.smooth / v)
                      - gv * np.float32(self.smooth * t / (v * v)))

    def _skip_runtime(self, name: str, reason: str) -> None:
        cons = self.graph.consumers()
        if name not in self.skipped:
            self.skipped[name] = reason
        stack = [name]
        while stack:
            for u in cons.get(stack.pop(), []):
                if u in self._refs0 and u not in self.skipped:
                    self.skipped[u] = f"depends on skipped node {name}"
                    stack.append(u)
        self.bns = [b for b in self.bns if b not in self.skipped]

    def _bn_loss(self, name: str, x: np.ndarray, grad: bool
                 ) -> tuple[float, np.ndarray | None, BNMismatch]:
        op = self.ops[name]
        c = op.mu.shape[0]
        if x.shape[-1] != c:
            raise _Unsupported(f"BN of {c} channels on input {x.shape[1:]}")
        flat = x.reshape(-1, c)
        p = flat.shape[0]
        m = flat.mean(axis=0, dtype=np.float64)
        cen = flat - m.astype(np.float32)
        var = np.einsum("pc,pc->c", cen, cen, dtype=np.float64) / p if p else np.zeros(c)
        sd_b = np.sqrt(var + op.eps)
        dm = m - op.mu
        ds = sd_b - op.sd
        w = self.weights[name]
        term = float(np.sum(w * (dm * dm + ds * ds)))
        unit = np.sqrt(w * max(c, 1))  # 1 / d_c
        em, es = dm * unit, ds * unit
        mm = BNMismatch(mean_err=float(np.sqrt(np.mean(em ** 2))) if c else 0.0,
                        std_err=float(np.sqrt(np.mean(es ** 2))) if c else 0.0,
                        worst=float(np.max(np.maximum(np.abs(em), np.abs(es)))) if c else 0.0,
                        loss=term)
        if not grad or p == 0:
            return term, None, mm
        a = (2.0 * w * dm / p).astype(np.float32)
        b = (2.0 * w * ds / (sd_b * p)).astype(np.float32)
        gx = cen * b + a
        return term, gx.reshape(x.shape), mm


# -- the optimiser ---------------------------------------------------------------------

def _resolve_shape(graph: Graph, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    shape = tuple(input_shape) if input_shape is not None else graph.input_shape
    if shape is None or any(s is None or int(s) < 1 for s in shape):
        raise ValueError("the model input shape is unknown: pass input_shape=")
    return tuple(int(s) for s in shape)


def distill(graph: Graph, fetch: Callable[[str], np.ndarray], *, n: int = DEFAULT_N,
            iters: int | None = None, lr: float = DEFAULT_LR, seed: int = 0,
            init: np.ndarray | None = None, deadline: float | None = None,
            input_shape: Sequence[int] | None = None, normalize: str = "channel",
            std_floor: float = STD_FLOOR, cosine: bool = True, tol: float = 0.0,
            layers: Sequence[str] | None = None, program: Program | None = None,
            clip: tuple[float, float] | None = None, bn_mode: str = DEFAULT_BN_MODE,
            smooth: float = DEFAULT_SMOOTH) -> Distilled:
    """Optimise ``n`` inputs (graph layout) until every BN's input statistics match its
    running statistics.

    ``iters`` defaults to ``DEFAULT_ITERS`` from noise, ``DEFAULT_WARM_ITERS`` from
    ``init`` (earlier inputs, e.g. the previous checkpoint's; their shape wins over ``n``
    and ``input_shape``). ``input_shape`` overrides ``graph.input_shape`` (distilling at a
    reduced resolution: a fully convolutional graph runs at any size). ``deadline`` is a
    ``time.monotonic()`` value checked before every step; ``tol`` stops once the objective
    is below it. ``cosine`` decays the learning rate to 5 % of ``lr`` over ``iters``.
    ``layers`` restricts the loss to those BNs (an ablation: ZeroQ uses them all).
    ``clip`` = (lo, hi) projects the inputs into the model's input range after each step
    (e.g. (-1, 1) for Keras MobileNetV2 preprocessing); ZeroQ leaves them unbounded.
    """
    t0 = time.monotonic()
    if init is not None:
        x = np.array(init, dtype=np.float32, copy=True)
        if x.ndim < 2 or x.shape[0] < 1 or not np.isfinite(x).all():
            raise ValueError(f"init of shape {x.shape}: expected finite (N, ...) inputs")
        shape = tuple(x.shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise ValueError(f"init of shape {x.shape} does not match input_shape "
                             f"{tuple(input_shape)}")
    else:
        shape = _resolve_shape(graph, input_shape)
        if n < 1:
            raise ValueError("n must be >= 1")
        x = np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)
    if clip is not None:
        np.clip(x, clip[0], clip[1], out=x)
    if iters is None:
        iters = DEFAULT_WARM_ITERS if init is not None else DEFAULT_ITERS
    if iters < 0:
        raise ValueError("iters must be >= 0")
    g_at = graph if graph.input_shape == shape else dataclasses.replace(graph, input_shape=shape)
    prog = program if program is not None else Program(g_at, fetch, normalize=normalize,
                                                       std_floor=std_floor, layers=layers,
                                                       bn_mode=bn_mode, smooth=smooth)
    m1 = np.zeros_like(x)
    m2 = np.zeros_like(x)
    b1, b2, eps = 0.9, 0.999, 1e-8
    losses: list[float] = []
    timed_out = False
    done = 0
    for t in range(1, iters + 1):
        if deadline is not None and time.monotonic() > deadline:
            timed_out = True
            break
        loss, g, _ = prog.loss_and_grad(x)
        losses.append(loss)
        if loss <= tol:
            break
        assert g is not None
        rate = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (t - 1) / max(iters, 1)))) \
            if cosine else lr
        m1 *= b1
        m1 += (1 - b1) * g
        m2 *= b2
        m2 += (1 - b2) * (g * g)
        mh = m1 / np.float32(1 - b1 ** t)
        vh = m2 / np.float32(1 - b2 ** t)
        x -= np.float32(rate) * mh / (np.sqrt(vh) + np.float32(eps))
        if clip is not None:
            np.clip(x, clip[0], clip[1], out=x)
        done = t
    final, _, mism = prog.loss_and_grad(x, grad=False)
    losses.append(final)
    return Distilled(inputs=x, loss=final, iterations=done, seconds=time.monotonic() - t0,
                     mismatch=mism, losses=tuple(losses), skipped=dict(prog.skipped),
                     timed_out=timed_out, seed=seed, lr=lr, warm=init is not None)


def distilled_census(graph: Graph, fetch: Callable[[str], np.ndarray], *,
                     batch: int = 16, deadline: float | None = None,
                     **kwargs: Any) -> DistilledCensus:
    """Distil inputs (``distill``'s keywords) and run the census on them.

    The census runs at the distilled resolution (``input_shape`` / ``init``'s shape) and
    its BNs are evidence ``census:distilled``. ``deadline`` bounds both steps: the census
    gets what the distillation left (it runs on whatever inputs exist by then).
    """
    t0 = time.monotonic()
    d = distill(graph, fetch, deadline=deadline, **kwargs)
    shape = tuple(d.inputs.shape[1:])
    g_at = graph if graph.input_shape == shape else dataclasses.replace(graph, input_shape=shape)
    res = run_census(g_at, fetch, d.inputs, batch=batch, deadline=None)
    return DistilledCensus(census=res, distilled=d, seconds=time.monotonic() - t0)


def census_checkpoint_distilled(path: str, **kwargs: Any) -> DistilledCensus:
    """Convenience: the distilled census of a Keras checkpoint that carries its config."""
    from bnexporter.topology.keras_ir import open_keras_ir

    graph, reader = open_keras_ir(path)
    try:
        return distilled_census(graph, lambda n: reader.read_array(n), **kwargs)
    finally:
        reader.close()


# -- evidence -------------------------------------------------------------------------

def layer_evidence(bns: Sequence[str], *, sample: CensusResult | None = None,
                   distilled: CensusResult | None = None) -> dict[str, str]:
    """Per BN, what its verdict rests on: a census over the user's sample, one over
    distilled inputs, else the weights-only estimate."""
    out = {}
    for b in bns:
        if sample is not None and b in sample:
            out[b] = EVIDENCE_SAMPLE
        elif distilled is not None and b in distilled:
            out[b] = EVIDENCE_DISTILLED
        else:
            out[b] = EVIDENCE_ESTIMATE
    return out


@dataclass(frozen=True)
class ChannelEvidence:
    """One BN's never-positive channels and what says so.

    ``dead``: channel -> evidence (``census:sample`` when the sample census saw it never
    positive, ``census:distilled`` when only the distilled census measured the layer).
    ``distilled_only``: channels never positive on the distilled inputs that the sample
    census saw positive (not dead: the sample wins, but the disagreement is reported).
    """

    evidence: str
    dead: Mapping[int, str]
    distilled_only: tuple[int, ...] = ()


def channel_evidence(bns: Sequence[str], *, sample: CensusResult | None = None,
                     distilled: CensusResult | None = None) -> dict[str, ChannelEvidence]:
    """Census verdicts per BN and channel with their evidence (layers neither census
    measured are left to the estimate and absent here)."""
    out: dict[str, ChannelEvidence] = {}
    for b in bns:
        s = sample.layers.get(b) if sample is not None else None
        d = distilled.layers.get(b) if distilled is not None else None
        if s is not None:
            dead_s = np.flatnonzero(s.positive_count == 0)
            only: tuple[int, ...] = ()
            if d is not None and d.channels == s.channels:
                only = tuple(int(c) for c in np.flatnonzero((d.positive_count == 0)
                                                            & (s.positive_count > 0)))
            out[b] = ChannelEvidence(EVIDENCE_SAMPLE, {int(c): EVIDENCE_SAMPLE for c in dead_s},
                                     only)
        elif d is not None:
            dead_d = np.flatnonzero(d.positive_count == 0)
            out[b] = ChannelEvidence(EVIDENCE_DISTILLED,
                                     {int(c): EVIDENCE_DISTILLED for c in dead_d},
                                     tuple(int(c) for c in dead_d))
    return out


__all__ = ["DEFAULT_ITERS", "DEFAULT_LR", "DEFAULT_N", "DEFAULT_WARM_ITERS",
           "EVIDENCE_DISTILLED", "EVIDENCE_ESTIMATE", "EVIDENCE_SAMPLE", "BNMismatch",
           "ChannelEvidence", "Distilled", "DistilledCensus", "Program",
           "census_checkpoint_distilled", "channel_evidence", "distill", "distilled_census",
           "layer_evidence"]
