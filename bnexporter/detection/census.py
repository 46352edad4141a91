"""Activation census: an inference-mode forward pass of a checkpoint over a sample.

The weights-only estimate assumes a Gaussian BN input; running the network over a
few dozen real (unlabeled) inputs measures each BN channel's activity instead.
This is a small, plain-numpy interpreter of the graph IR (``bnexporter.topology.graph``):
no framework at run time, nothing from the checkpoint is executed.

Per BN node the census records, over every position seen (N·H·W per channel):
``active`` = fraction of positions with BN output > 0, the raw ``positive_count``,
``positions``, ``saturated`` = fraction >= 6 (only for BNs read by a ReLU6), the
count of outputs within ``NEAR_ZERO`` of 0 (where a different summation order may flip
the sign) and the per-channel output range.

Layout: activations are kept channels-last internally (N, H, W, C). A graph in
``nchw`` layout (torch) has its sample and kernels transposed once; ``flatten``,
``reshape``, ``dense`` on spatial tensors and axis attributes are mapped back to
the graph's own order, so a torch ``Linear`` after ``flatten`` sees the features in
torch order.

Failures are local: a node the engine cannot run (unsupported op, missing tensor,
shape mismatch) is skipped with a reason, and so is everything that depends on it;
those BNs keep the weights-only estimate. Memory is bounded: the sample is processed
in mini-batches and an activation is freed as soon as its last consumer has run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnexporter.topology.graph import Graph, Node

NEAR_ZERO = 1e-4
# im2col buffers above this many bytes are built for a slice of the batch at a time
_PATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class BNActivity:
    """What one BN's output did over the sample, per channel."""

    active: np.ndarray            # float64: fraction of positions with y > 0
    positive_count: np.ndarray    # int64: positions with y > 0
    positions: int                # positions seen per channel (N·H·W)
    saturated: np.ndarray | None  # float64: fraction with y >= 6 (ReLU6 consumers only)
    near_zero_count: np.ndarray   # int64: positions with |y| <= NEAR_ZERO
    minimum: np.ndarray           # float64 per-channel min of y
    maximum: np.ndarray           # float64 per-channel max of y

    @property
    def channels(self) -> int:
        return int(self.active.shape[0])


@dataclass(frozen=True)
class CensusResult:
    layers: Mapping[str, BNActivity]
    skipped: Mapping[str, str] = field(default_factory=dict)  # node -> reason
    seconds: float = 0.0
    inputs: int = 0          # sample inputs whose statistics are included
    timed_out: bool = False

    def __getitem__(self, name: str) -> BNActivity:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers


class _Unsupported(Exception):
    """The engine cannot run this node; the message is the skip reason."""


# -- small helpers -----------------------------------------------------------------------

def _tuple2(value: Any, default: int, one_d: bool = False) -> tuple[int, int]:
    """(h, w) from an int or a sequence; a 1-D layer runs as 2-D with H = 1."""
    if value is None:
        return (1, default) if one_d else (default, default)
    if isinstance(value, (int, np.integer)):
        return (1, int(value)) if one_d else (int(value), int(value))
    vals = tuple(int(v) for v in value)
    if len(vals) == 1:
        return (1, vals[0])
    return (vals[0], vals[1])


def _same_pads(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "same": pad_total = max((ceil(in/stride)-1)*stride + (k-1)*dilation + 1 - in, 0)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _explicit_pads(padding: Any, rank: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from an int, (p,), (ph, pw), (t, b, l, r) or pairs."""
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return (0, 0, p, p) if rank == 1 else (p, p, p, p)
    vals = list(padding)
    if vals and isinstance(vals[0], (list, tuple)):
        pairs = [tuple(int(x) for x in v) for v in vals]
        if len(pairs) == 1:
            return (0, 0, pairs[0][0], pairs[0][1])
        return (pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1])
    vals = [int(v) for v in vals]
    if len(vals) == 1:
        return (0, 0, vals[0], vals[0]) if rank == 1 else (vals[0],) * 4
    if len(vals) == 2:
        return (0, 0, vals[0], vals[1]) if rank == 1 else (vals[0], vals[0], vals[1], vals[1])
    if len(vals) == 4:
        return (vals[0], vals[1], vals[2], vals[3])
    raise _Unsupported(f"padding {padding!r} not understood")


def _resolve_pads(padding: Any, hw: tuple[int, int], k: tuple[int, int], s: tuple[int, int],
                  d: tuple[int, int], rank: int) -> tuple[int, int, int, int]:
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode == "same":
            t, b = _same_pads(hw[0], k[0], s[0], d[0])
            left, r = _same_pads(hw[1], k[1], s[1], d[1])
            return (t, b, left, r)
        raise _Unsupported(f"padding {padding!r} not supported")
    return _explicit_pads(padding, rank)


_NP_PAD = {"zeros": "constant", "constant": "constant", "reflect": "reflect",
           "replicate": "edge", "circular": "wrap"}


def _pad_hw(x: np.ndarray, pads: tuple[int, int, int, int], mode: str = "zeros",
            value: float = 0.0) -> np.ndarray:
    if not any(pads):
        return x
    width = ((0, 0), (pads[0], pads[1]), (pads[2], pads[3]), (0, 0))
    np_mode = _NP_PAD.get(mode)
    if np_mode is None:
        raise _Unsupported(f"padding_mode {mode!r} not supported")
    if np_mode == "constant":
        return np.pad(x, width, mode="constant", constant_values=value)
    return np.pad(x, width, mode=np_mode)  # type: ignore[call-overload]


def _as4d(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """(N, W, C) -> (N, 1, W, C): 1-D layers run as 2-D with H = 1."""
    if x.ndim == 3:
        return x[:, None], True
    if x.ndim != 4:
        raise _Unsupported(f"spatial op on a rank-{x.ndim} tensor")
    return x, False


def _taps(xp: np.ndarray, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int],
          out: tuple[int, int]):
    """Yield (i, j, view) for every kernel tap: the strided input slice it reads."""
    ho, wo = out
    for i in range(k[0]):
        r0 = i * d[0]
        for j in range(k[1]):
            c0 = j * d[1]
            yield i, j, xp[:, r0:r0 + (ho - 1) * s[0] + 1:s[0], c0:c0 + (wo - 1) * s[1] + 1:s[1], :]


def _out_size(size: int, k: int, s: int, d: int) -> int:
    return (size - (k - 1) * d - 1) // s + 1


# -- layers -------------------------------------------------------------------------------

class _Conv:
    def __init__(self, node: Node, kernel: np.ndarray, bias: np.ndarray | None,
                 kernel_layout: str):
        a = node.attrs
        k = np.asarray(kernel, dtype=np.float32)
        if kernel_layout == "oihw":
            if k.ndim == 3:                      # torch Conv1d (O, I, K)
                k = k.transpose(2, 1, 0)[None]
            elif k.ndim == 4:
                k = k.transpose(2, 3, 1, 0)
        elif k.ndim == 3:                        # Keras Conv1D (K, I, O)
            k = k[None]
        if k.ndim != 4:
            raise _Unsupported(f"conv kernel of rank {kernel.ndim}")
        self.kernel = np.ascontiguousarray(k)   # (kh, kw, I, O)
        self.bias = None if bias is None else np.asarray(bias, np.float32).reshape(-1)
        self.attrs = a
        self.padding = a.get("padding", "valid")
        self.mode = str(a.get("padding_mode", "zeros"))
        self.depthwise = bool(a.get("depthwise"))
        self.groups = a.get("groups", 1)
        self.rank = int(a.get("rank", 2))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x, squeezed = _as4d(x)
        _n, h, w, cin = x.shape
        kh, kw, ki, ko = self.kernel.shape
        self.stride = _tuple2(self.attrs.get("stride"), 1, squeezed)
        self.dilation = _tuple2(self.attrs.get("dilation"), 1, squeezed)
        groups = cin if self.depthwise else int(self.groups or 1)
        k, s, d = (kh, kw), self.stride, self.dilation
        pads = _resolve_pads(self.padding, (h, w), k, s, d, 1 if squeezed else self.rank)
        xp = _pad_hw(x, pads, self.mode)
        ho = _out_size(xp.shape[1], kh, s[0], d[0])
        wo = _out_size(xp.shape[2], kw, s[1], d[1])
        if ho <= 0 or wo <= 0:
            raise _Unsupported(f"conv output would be empty (input {h}x{w})")
        if groups == cin and groups > 1 and ki in (1, cin) and (ki == cin or ko % cin == 0):
            # depthwise: Keras (kh, kw, C, m) or grouped (kh, kw, 1, C*m); channel c*m + j
            wdw = self.kernel.reshape(kh, kw, cin, -1)
            y = self._depthwise(xp, wdw, (ho, wo))
        else:
            if cin % groups or ki * groups != cin or ko % groups:
                raise _Unsupported(f"conv kernel {self.kernel.shape} does not fit input with "
                                   f"{cin} channels and {groups} groups")
            y = self._im2col(xp, groups, (ho, wo))
        if self.bias is not None:
            y += self.bias
        return y[:, 0] if squeezed else y

    def _depthwise(self, xp: np.ndarray, wdw: np.ndarray, out: tuple[int, int]) -> np.ndarray:
        n, c, m = xp.shape[0], wdw.shape[2], wdw.shape[3]
        acc = np.zeros((n, out[0], out[1], c, m) if m > 1 else (n, out[0], out[1], c),
                       np.float32)
        for i, j, view in _taps(xp, wdw.shape[:2], self.stride, self.dilation, out):
            if m > 1:
                acc += view[..., None] * wdw[i, j]
            else:
                acc += view * wdw[i, j, :, 0]
        return acc.reshape(n, out[0], out[1], c * m)

    def _im2col(self, xp: np.ndarray, groups: int, out: tuple[int, int]) -> np.ndarray:
        n, cin = xp.shape[0], xp.shape[3]
        kh, kw, ki, ko = self.kernel.shape
        ho, wo = out
        y = np.empty((n, ho, wo, ko), np.float32)
        cols_all = xp if kh == kw == 1 and self.stride == (1, 1) else None
        per_image = ho * wo * kh * kw * cin * 4
        step = max(1, _PATCH_BYTES // max(per_image, 1))
        kmat = self.kernel.reshape(kh * kw, ki, groups, ko // groups)  # o = g * og + j
        for start in range(0, n, step):
            stop = min(n, start + step)
            part = xp[start:stop]
            if cols_all is not None:
                cols = part.reshape(stop - start, ho, wo, 1, cin)
            else:
                cols = np.empty((stop - start, ho, wo, kh * kw, cin), np.float32)
                for i, j, view in _taps(part, (kh, kw), self.stride, self.dilation, out):
                    cols[:, :, :, i * kw + j, :] = view
            rows = (stop - start) * ho * wo
            if groups == 1:
                y[start:stop] = (cols.reshape(rows, kh * kw * cin)
                                 @ self.kernel.reshape(kh * kw * cin, ko)).reshape(
                                     stop - start, ho, wo, ko)
                continue
            og = ko // groups
            cg = cols.reshape(rows, kh * kw, groups, ki)
            for g in range(groups):
                a = cg[:, :, g, :].reshape(rows, kh * kw * ki)
                b = kmat[:, :, g].reshape(kh * kw * ki, og)
                y[start:stop, ..., g * og:(g + 1) * og] = (a @ b).reshape(
                    stop - start, ho, wo, og)
        return y


class _Pool:
    def __init__(self, node: Node, layout: str):
        a = node.attrs
        self.max = node.op == "maxpool"
        self.attrs = a
        self.padding = a.get("padding", "valid")
        self.ceil = bool(a.get("ceil_mode", False))
        self.include_pad = bool(a.get("count_include_pad", layout == "nchw"))
        self.rank = int(a.get("rank", 2))

    def geometry(self, h: int, w: int, squeezed: bool) -> tuple[
            tuple[int, int], tuple[int, int], tuple[int, int], list[int],
            tuple[int, int, int, int]]:
        """Window, stride, dilation, padding and the padding ceil_mode adds (shared with
        the distillation's backward pass)."""
        a = self.attrs
        k = _tuple2(a.get("pool", 2), 2, squeezed)
        s = k if a.get("stride") is None else _tuple2(a.get("stride"), 1, squeezed)
        d = _tuple2(a.get("dilation"), 1, squeezed)
        pads = list(_resolve_pads(self.padding, (h, w), k, s, d, 1 if squeezed else self.rank))
        extra = [0, 0]
        if self.ceil:  # torch ceil_mode: more windows, the last may hang off the edge
            for ax, size in ((0, h), (1, w)):
                lo, hi = pads[2 * ax], pads[2 * ax + 1]
                span = size + lo + hi - (k[ax] - 1) * d[ax] - 1
                out = -(-span // s[ax]) + 1
                if (out - 1) * s[ax] >= size + lo:
                    out -= 1
                extra[ax] = max(0, (out - 1) * s[ax] + (k[ax] - 1) * d[ax] + 1
                                - (size + lo + hi))
        return k, s, d, pads, (pads[0], pads[1] + extra[0], pads[2], pads[3] + extra[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x, squeezed = _as4d(x)
        n, h, w, c = x.shape
        k, s, d, pads, full = self.geometry(h, w, squeezed)
        fill = -np.inf if self.max else 0.0
        xp = _pad_hw(x, full, "zeros", fill)
        ho = _out_size(xp.shape[1], k[0], s[0], d[0])
        wo = _out_size(xp.shape[2], k[1], s[1], d[1])
        if ho <= 0 or wo <= 0:
            raise _Unsupported(f"pool output would be empty (input {h}x{w})")
        if self.max:
            acc = np.full((n, ho, wo, c), -np.inf, np.float32)
            for _, _, view in _taps(xp, k, s, d, (ho, wo)):
                np.maximum(acc, view, out=acc)
        else:
            acc = np.zeros((n, ho, wo, c), np.float32)
            for _, _, view in _taps(xp, k, s, d, (ho, wo)):
                acc += view
            ones = np.zeros((1, xp.shape[1], xp.shape[2], 1), np.float32)
            if self.include_pad:  # explicit padding counts, ceil-mode overhang does not
                ones[:, :h + pads[0] + pads[1], :w + pads[2] + pads[3]] = 1.0
            else:
                ones[:, pads[0]:pads[0] + h, pads[2]:pads[2] + w] = 1.0
            cnt = np.zeros((1, ho, wo, 1), np.float32)
            for _, _, view in _taps(ones, k, s, d, (ho, wo)):
                cnt += view
            acc /= np.maximum(cnt, 1.0)
        return acc[:, 0] if squeezed else acc


_ERF = np.vectorize(math.erf, otypes=[np.float64])


def _erf(x: np.ndarray) -> np.ndarray:
    """Exact erf (numpy has none and scipy is not a dependency); slow but rare (GELU)."""
    return _ERF(x.astype(np.float64))


def _keras_relu(x: np.ndarray, a: Mapping[str, Any]) -> np.ndarray:
    slope = float(a.get("negative_slope") or a.get("alpha") or 0.0)
    threshold = float(a.get("threshold") or 0.0)
    max_value = a.get("max_value")
    y = np.where(x >= threshold, x, slope * (x - threshold)).astype(np.float32)
    if max_value is not None:
        y = np.where(x >= float(max_value), np.float32(max_value), y).astype(np.float32)
    return y


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _elementwise(node: Node) -> Callable[[np.ndarray], np.ndarray]:
    op, a = node.op, node.attrs
    if op == "relu":
        return lambda x: np.maximum(x, 0, dtype=np.float32)
    if op == "relu6":
        return lambda x: np.clip(x, 0, 6).astype(np.float32)
    if op == "sigmoid":
        return _sigmoid
    if op == "silu":
        return lambda x: x * _sigmoid(x)
    if op == "hardswish":
        return lambda x: (x * np.clip(x + 3, 0, 6) / 6).astype(np.float32)
    if op == "tanh":
        return np.tanh
    if op == "leaky_relu":
        alpha = np.float32(a.get("alpha", a.get("negative_slope", 0.01)))
        return lambda x: np.where(x >= 0, x, alpha * x).astype(np.float32)
    if op == "gelu":
        if str(a.get("approximate", "none")).lower() in ("tanh", "true"):
            c = math.sqrt(2 / math.pi)
            return lambda x: (0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x ** 3)))).astype(
                np.float32)
        return lambda x: (0.5 * x * (1 + _erf(x / math.sqrt(2)))).astype(np.float32)
    if op == "activation":
        name = str(a.get("name", "")).lower()
        if name == "relu":
            return lambda x: _keras_relu(x, a)
        if name == "elu":
            alpha = float(a.get("alpha", 1.0))
            return lambda x: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0))).astype(
                np.float32)
        if name == "selu":
            al, sc = 1.6732632423543772, 1.0507009873554805
            return lambda x: (sc * np.where(x > 0, x, al * np.expm1(np.minimum(x, 0)))).astype(
                np.float32)
        if name == "softplus":
            return lambda x: np.logaddexp(0, x).astype(np.float32)
        if name == "softsign":
            return lambda x: (x / (1 + np.abs(x))).astype(np.float32)
        if name == "exponential":
            return lambda x: np.exp(x).astype(np.float32)
        if name == "mish":
            return lambda x: (x * np.tanh(np.logaddexp(0, x))).astype(np.float32)
        if name == "leaky_relu":
            alpha = np.float32(a.get("alpha", a.get("negative_slope", 0.2)))
            return lambda x: np.where(x >= 0, x, alpha * x).astype(np.float32)
        raise _Unsupported(f"unsupported activation {name!r}")
    raise _Unsupported(f"unsupported op {op!r}")


# -- the interpreter ----------------------------------------------------------------------

class _Engine:
    def __init__(self, graph: Graph, fetch: Callable[[str], np.ndarray]):
        self.graph = graph
        self.fetch = fetch
        self.nchw = graph.layout == "nchw"
        self.torch_kernels = graph.kernel_layout == "oihw"

    # layout mapping: internal channels-last <-> the graph's own order
    def to_native(self, x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x, -1, 1) if self.nchw and x.ndim >= 3 else x

    def from_native(self, x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x, 1, -1) if self.nchw and x.ndim >= 3 else x

    def axis(self, axis: int, rank: int) -> int:
        """An axis in the graph's layout -> the internal one."""
        a = axis + rank if axis < 0 else axis
        if not 0 <= a < rank:
            raise _Unsupported(f"axis {axis} out of range for rank {rank}")
        if self.nchw and rank >= 3 and a >= 1:
            return rank - 1 if a == 1 else a - 1
        return a

    def optional(self, node: Node, role: str) -> np.ndarray | None:
        return self.tensor(node, role) if node.params.get(role) is not None else None

    def tensor(self, node: Node, role: str) -> np.ndarray:
        name = node.params.get(role)
        if name is None:
            raise _Unsupported(f"no checkpoint tensor for {role!r}")
        try:
            arr = self.fetch(name)
        except Exception as exc:
            raise _Unsupported(f"cannot read tensor {name!r}: {exc}") from None
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise _Unsupported(f"tensor {name!r} has non-finite values")
        return arr

    def compile(self, node: Node) -> Callable[[list[np.ndarray]], np.ndarray]:
        op, a = node.op, node.attrs
        if op in ("identity", "output"):
            return lambda xs: xs[0]
        if op == "conv":
            conv = _Conv(node, self.tensor(node, "kernel"), self.optional(node, "bias"),
                         "oihw" if self.torch_kernels else "hwio")
            return lambda xs: conv(xs[0])
        if op == "dense":
            w = self.tensor(node, "kernel").astype(np.float32)
            if w.ndim != 2:
                raise _Unsupported(f"dense kernel of rank {w.ndim}")
            if self.torch_kernels:
                w = w.T
            w = np.ascontiguousarray(w)
            b = self.optional(node, "bias")
            b = None if b is None else b.astype(np.float32).reshape(-1)

            def dense(xs: list[np.ndarray]) -> np.ndarray:
                x = self.to_native(xs[0])
                if x.shape[-1] != w.shape[0]:
                    raise _Unsupported(f"dense kernel {w.shape} does not fit input "
                                       f"{x.shape[1:]}")
                y = x @ w
                if b is not None:
                    y += b
                return self.from_native(y)
            return dense
        if op == "bn":
            mean = self.tensor(node, "mean").astype(np.float64).reshape(-1)
            var = self.tensor(node, "var").astype(np.float64).reshape(-1)
            c = mean.shape[0]
            g = self.optional(node, "gamma")
            be = self.optional(node, "beta")
            gamma = np.ones(c) if g is None else g.astype(np.float64).reshape(-1)
            beta = np.zeros(c) if be is None else be.astype(np.float64).reshape(-1)
            eps = float(a.get("eps", 1e-5 if self.nchw else 1e-3))
            if not (var.shape == gamma.shape == beta.shape == (c,)):
                raise _Unsupported("BN vectors of different lengths")
            if (var + eps < 0).any():
                raise _Unsupported("negative variance")
            inv = gamma / np.sqrt(var + eps)
            scale = inv.astype(np.float32)
            shift = (beta - mean * inv).astype(np.float32)
            axis = a.get("axis")

            def bn(xs: list[np.ndarray]) -> np.ndarray:
                x = xs[0]
                if axis is not None and not self.nchw and int(axis) not in (-1, x.ndim - 1):
                    raise _Unsupported(f"BN over axis {axis} of a rank-{x.ndim} tensor")
                if x.shape[-1] != c:
                    raise _Unsupported(f"BN of {c} channels on input {x.shape[1:]}")
                return x * scale + shift
            return bn
        if op in ("relu", "relu6", "silu", "hardswish", "sigmoid", "tanh", "gelu",
                  "leaky_relu", "activation"):
            f = _elementwise(node)
            return lambda xs: f(xs[0])
        if op == "softmax":
            ax = int(a.get("axis", -1 if not self.nchw else 1))

            def softmax(xs: list[np.ndarray]) -> np.ndarray:
                x = xs[0]
                i = self.axis(ax, x.ndim)
                e = np.exp(x - x.max(axis=i, keepdims=True))
                return e / e.sum(axis=i, keepdims=True)
            return softmax
        if op == "add":
            def add(xs: list[np.ndarray]) -> np.ndarray:
                if len(xs) == 1:
                    return xs[0]
                y = xs[0] + xs[1]  # a new array: the inputs may have other readers
                for x in xs[2:]:
                    if np.broadcast_shapes(y.shape, x.shape) == y.shape:
                        y += x
                    else:
                        y = y + x
                return y
            return add
        if op == "mul":
            def mul(xs: list[np.ndarray]) -> np.ndarray:
                y = xs[0]
                for x in xs[1:]:
                    y = y * x
                return y
            return mul
        if op == "concat":
            ax = int(a.get("axis", -1 if not self.nchw else 1))
            return lambda xs: np.concatenate(xs, axis=self.axis(ax, xs[0].ndim))
        if op in ("maxpool", "avgpool"):
            pool = _Pool(node, self.graph.layout)
            return lambda xs: pool(xs[0])
        if op in ("gap", "gmp"):
            keep = bool(a.get("keepdims", False))

            def gpool(xs: list[np.ndarray]) -> np.ndarray:
                x = xs[0]
                if x.ndim < 3:
                    raise _Unsupported(f"global pool of a rank-{x.ndim} tensor")
                axes = tuple(range(1, x.ndim - 1))
                f = np.mean if op == "gap" else np.max
                return f(x, axis=axes, keepdims=keep).astype(np.float32)
            return gpool
        if op == "flatten":
            return lambda xs: self.to_native(xs[0]).reshape(xs[0].shape[0], -1)
        if op == "reshape":
            shape = a.get("shape")
            if shape is None:
                raise _Unsupported("reshape without a target shape")
            target = tuple(int(v) for v in shape)
            return lambda xs: self.from_native(
                self.to_native(xs[0]).reshape((xs[0].shape[0], *target)))
        if op == "pad":
            pads = a.get("pads")
            value = float(a.get("value", 0.0))
            mode = str(a.get("mode", "zeros"))
            if pads is None:
                raise _Unsupported("pad without pads")

            def pad(xs: list[np.ndarray]) -> np.ndarray:
                x, squeezed = _as4d(xs[0])
                pp = _explicit_pads(pads, 1 if squeezed else 2)
                grow = (max(pp[0], 0), max(pp[1], 0), max(pp[2], 0), max(pp[3], 0))
                crop = (max(-pp[0], 0), max(-pp[1], 0), max(-pp[2], 0), max(-pp[3], 0))
                y = _pad_hw(x, grow, mode, value)
                if any(crop):
                    h, w = y.shape[1], y.shape[2]
                    y = y[:, crop[0]:h - crop[1], crop[2]:w - crop[3]]
                return y[:, 0] if squeezed else y
            return pad
        if op == "other":
            raise _Unsupported(f"unsupported op 'other:{a.get('name', '?')}'")
        raise _Unsupported(f"unsupported op {op!r}")


def _bn_saturates(graph: Graph) -> set[str]:
    """BNs read by a ReLU6 (directly or through identities)."""
    by = graph.by_name()
    cons = graph.consumers()
    out = set()
    for n in graph.nodes:
        if n.op != "bn":
            continue
        todo, seen = list(cons.get(n.name, [])), set()
        while todo:
            u = todo.pop()
            if u in seen or u not in by:
                continue
            seen.add(u)
            un = by[u]
            if un.op == "relu6" or (un.op == "activation" and un.attrs.get("name") == "relu"
                                    and un.attrs.get("max_value") == 6.0):
                out.add(n.name)
            elif un.op == "identity":
                todo.extend(cons.get(u, []))
    return out


class _Stats:
    def __init__(self, c: int, saturate: bool):
        self.pos = np.zeros(c, np.int64)
        self.near = np.zeros(c, np.int64)
        self.sat = np.zeros(c, np.int64) if saturate else None
        self.lo = np.full(c, np.inf)
        self.hi = np.full(c, -np.inf)
        self.positions = 0

    def add(self, y: np.ndarray) -> None:
        flat = y.reshape(-1, y.shape[-1])
        self.positions += flat.shape[0]
        self.pos += np.count_nonzero(flat > 0, axis=0)
        self.near += np.count_nonzero(np.abs(flat) <= NEAR_ZERO, axis=0)
        if self.sat is not None:
            self.sat += np.count_nonzero(flat >= 6, axis=0)
        if flat.shape[0]:
            np.minimum(self.lo, flat.min(axis=0), out=self.lo)
            np.maximum(self.hi, flat.max(axis=0), out=self.hi)

    def merge(self, other: _Stats) -> None:
        self.positions += other.positions
        self.pos += other.pos
        self.near += other.near
        if self.sat is not None and other.sat is not None:
            self.sat += other.sat
        np.minimum(self.lo, other.lo, out=self.lo)
        np.maximum(self.hi, other.hi, out=self.hi)

    def result(self) -> BNActivity:
        p = max(self.positions, 1)
        return BNActivity(
            active=self.pos / p, positive_count=self.pos.copy(), positions=self.positions,
            saturated=None if self.sat is None else self.sat / p,
            near_zero_count=self.near.copy(), minimum=self.lo.copy(), maximum=self.hi.copy())


def _check_sample(graph: Graph, sample: np.ndarray) -> np.ndarray:
    x = np.asarray(sample)
    if x.dtype.kind not in "fu" and x.dtype.kind != "i":
        raise ValueError(f"sample dtype {x.dtype} is not numeric")
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"sample of shape {x.shape}: expected (N, ...) with N >= 1")
    if graph.input_shape is not None:
        want = tuple(graph.input_shape)
        got = x.shape[1:]
        if len(got) != len(want) or any(w not in (None, -1) and w != g
                                        for w, g in zip(want, got, strict=False)):
            raise ValueError(f"sample of shape {x.shape} does not match the model input "
                             f"(N, {', '.join(str(v) for v in want)}) in {graph.layout} layout")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("sample has NaN or Inf values")
    return x


def run_census(graph: Graph, fetch: Callable[[str], np.ndarray], sample: np.ndarray, *,
               batch: int = 16, deadline: float | None = None) -> CensusResult:
    """Run ``graph`` in inference mode over ``sample`` (N, ...) in the graph's layout.

    ``fetch(name)`` returns a checkpoint tensor (any float dtype, its stored shape).
    ``deadline`` is a ``time.monotonic()`` value: when it passes, the census stops and
    the BNs not measured yet are reported in ``skipped`` as ``"time budget"``. Statistics
    are merged a mini-batch at a time, so every reported BN saw the same ``inputs``.
    """
    t0 = time.monotonic()
    x_all = _check_sample(graph, sample)
    if batch < 1:
        raise ValueError("batch must be >= 1")
    eng = _Engine(graph, fetch)
    by = graph.by_name()
    cons = graph.consumers()
    bns = [n.name for n in graph.nodes if n.op == "bn"]
    order = graph.needed_by(bns)  # only what some BN depends on is run
    needed = {n.name for n in order}
    skipped: dict[str, str] = {}
    root: dict[str, str] = {}  # skipped node -> the node whose failure caused it

    def skip(name: str, reason: str) -> None:
        if name in skipped:
            return
        skipped[name] = reason
        root[name] = name
        stack = [name]
        while stack:  # everything downstream that was to run
            for u in cons.get(stack.pop(), []):
                if u in needed and u not in skipped:
                    skipped[u] = f"depends on skipped node {name}"
                    root[u] = name
                    stack.append(u)

    fns: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {}
    inputs_seen = [n.name for n in order if n.op == "input"]
    for n in order:
        if n.name in skipped:
            continue
        missing = [i for i in n.inputs if i not in by]
        if missing:
            skip(n.name, f"input {missing[0]!r} is not in the graph")
            continue
        if n.op == "input":
            if n.name != inputs_seen[0]:
                skip(n.name, f"model input {n.name!r}: only one sample is given")
            continue
        try:
            fns[n.name] = eng.compile(n)
        except _Unsupported as exc:
            skip(n.name, str(exc))
        except Exception as exc:
            skip(n.name, f"error: {exc.__class__.__name__}: {exc}")
    refs0: dict[str, int] = {n.name: 0 for n in order}
    for n in order:
        for i in n.inputs:
            if i in refs0:
                refs0[i] += 1
    saturate = _bn_saturates(graph)
    totals: dict[str, _Stats] = {}
    done_inputs = 0
    timed_out = False
    native_first = eng.from_native  # sample is in the graph layout
    for start in range(0, x_all.shape[0], batch):
        xb = native_first(x_all[start:start + batch])
        acts: dict[str, np.ndarray] = {}
        refs = dict(refs0)
        local: dict[str, _Stats] = {}
        for n in order:
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                break
            if n.name in skipped:
                continue
            if n.op == "input":
                y = xb
            else:
                try:
                    y = fns[n.name]([acts[i] for i in n.inputs])
                except _Unsupported as exc:
                    skip(n.name, str(exc))
                    y = None
                except (ValueError, IndexError, MemoryError, FloatingPointError) as exc:
                    skip(n.name, f"error: {exc.__class__.__name__}: {exc}")
                    y = None
            for i in n.inputs:
                if i in refs:
                    refs[i] -= 1
                    if refs[i] <= 0:
                        acts.pop(i, None)
            if y is None:
                continue
            if y.dtype != np.float32:
                y = y.astype(np.float32)
            if n.op == "bn":
                st = local.get(n.name)
                if st is None:
                    st = local[n.name] = _Stats(y.shape[-1], n.name in saturate)
                st.add(y)
            if refs.get(n.name, 0) > 0:
                acts[n.name] = y
        del acts
        if timed_out and totals:
            break  # a partial mini-batch is dropped so that every BN saw the same inputs
        # (a first mini-batch cut short is kept: each BN it reached saw all of it)
        for name, st in local.items():
            if name in skipped:
                continue
            if name in totals:
                totals[name].merge(st)
            else:
                totals[name] = st
        done_inputs += xb.shape[0]
        if timed_out:
            break
    layers = {name: totals[name].result() for name in bns
              if name in totals and name not in skipped}
    for name in bns:
        if name not in layers and name not in skipped:
            skipped[name] = "time budget"
    return CensusResult(layers=layers, skipped=skipped, seconds=time.monotonic() - t0,
                        inputs=done_inputs, timed_out=timed_out)


def forward(graph: Graph, fetch: Callable[[str], np.ndarray], x: np.ndarray,
            outputs: list[str]) -> dict[str, np.ndarray]:
    """The activations of ``outputs`` for one batch ``x``, in the graph's layout.

    A debugging / testing aid (no mini-batching, nothing freed): raises ValueError
    naming the first node on the way that the engine cannot run.
    """
    eng = _Engine(graph, fetch)
    by = graph.by_name()
    needed: set[str] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        if name not in by:
            raise ValueError(f"no node {name!r} in the graph")
        needed.add(name)
        todo.extend(by[name].inputs)
    acts: dict[str, np.ndarray] = {}
    for n in graph.nodes:
        if n.name not in needed:
            continue
        if n.op == "input":
            acts[n.name] = eng.from_native(np.asarray(x, np.float32))
            continue
        try:
            acts[n.name] = eng.compile(n)([acts[i] for i in n.inputs])
        except _Unsupported as exc:
            raise ValueError(f"{n.name}: {exc}") from None
    return {o: eng.to_native(acts[o]) for o in outputs}


__all__ = ["NEAR_ZERO", "BNActivity", "CensusResult", "census_checkpoint", "forward",
           "run_census"]


def census_checkpoint(path: str, sample: np.ndarray, **kwargs: Any) -> CensusResult:
    """Convenience: the census of a Keras checkpoint that carries its own config."""
    from bnexporter.topology.keras_ir import open_keras_ir

    graph, reader = open_keras_ir(path)
    try:
        return run_census(graph, lambda n: reader.read_array(n), sample, **kwargs)
    finally:
        reader.close()

