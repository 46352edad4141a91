"""Infer what follows a BatchNorm when no graph says it, and say how.

A state_dict names tensors, not operations: a ``Sequential(Conv, BN, ReLU)``
and a ``Sequential(Conv, BN)`` store the same keys. Two kinds of evidence are
used, each labelled in ``consumer_source``:

``inferred:downstream-mean``
    The next BN's running mean is the running mean of the conv between them,
    so it must agree with that conv applied to ``E[h(y)]`` for the activation
    ``h`` that really sits after the first BN (``y ~ N(beta, gamma^2)`` is the
    BN output during training, when those running means were accumulated).
    Each candidate ``h`` (identity, ReLU, ReLU6, SiLU, hard-swish) gets a
    least-squares fit with one free scale (zero padding shrinks the mean); a
    candidate is accepted only when it fits well and clearly better than every
    other family. A wrong pairing (the conv does not read this BN, as across a
    residual sum) fits no candidate and decides nothing.
``inferred:post-activation``
    A BN whose running means are all >= 0 over many channels normalises a
    rectified input (Conv -> ReLU -> BN, common in audio and older Keras code):
    it follows the activation, so its own consumer is taken not to be a ReLU.
``inferred:residual-block``
    In a block with numbered BNs (``bn1, bn2[, bn3]`` or ``norm1..``) beside a
    shortcut BN (``downsample`` / ``shortcut`` / ``proj``) in it or a sibling
    block, the last numbered BN and the shortcut BN feed the residual Add.
    Used only where the statistics did not decide.

Nothing here is a guess in the unsafe direction by design: an undecided BN
stays ``unknown``, which is never counted as a dead ReLU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bnexporter.formats.base import Reader

# acceptance of the downstream-mean test (relative residual of the fit)
FIT_MAX = 0.4          # the best candidate must explain the mean this well ...
MARGIN = 0.7           # ... and its residual be below this times every other family's
SMOOTH_MARGIN = 0.5    # SiLU / hard-swish must beat the ReLU family by more (they look alike)
SCALE_RANGE = (0.3, 1.6)  # padding shrinks a conv's mean; other scales mean a wrong pairing
MIN_CHANNELS = 8       # fewer channels cannot tell the candidates apart
POST_ACT_MIN = 16      # channels needed before "all means >= 0" is evidence

_SHORTCUT = re.compile(r"(^|[._/])(downsample|shortcut|proj|skip|residual)([._/]|$)", re.I)
_NUMBERED = re.compile(r"^(bn|norm|n|batchnorm|batch_norm)(\d+)$", re.I)
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(48)
_GH_W = _GH_W / _GH_W.sum()


class BNRef(Protocol):
    """What inference reads of a discovered BN layer."""

    @property
    def name(self) -> str: ...
    @property
    def channels(self) -> int: ...
    @property
    def mean(self) -> str: ...
    @property
    def var(self) -> str: ...
    @property
    def gamma(self) -> str | None: ...
    @property
    def beta(self) -> str | None: ...


@dataclass(frozen=True)
class Inferred:
    consumer: str
    source: str
    producer: str | None = None  # the kernel tensor producing this BN's input, when seen
    detail: str = ""


def _split(name: str) -> tuple[str, str]:
    for sep in (".", "/"):
        if sep in name:
            head, tail = name.rsplit(sep, 1)
            return head, tail
    return "", name


@dataclass(frozen=True)
class _Module:
    prefix: str
    kernel: str | None = None
    bias: str | None = None
    bn: str | None = None  # BN layer name when this module is a discovered BN


def _modules(reader: Reader, bns: Sequence[BNRef]) -> list[_Module]:
    """Modules in the file's own tensor order (state_dict order = construction order)."""
    bn_of = {}
    for layer in bns:
        for t in (layer.mean, layer.var, layer.gamma, layer.beta):
            if t:
                bn_of[t] = layer.name
    order: list[str] = []
    seen: dict[str, dict[str, str]] = {}
    for name in reader.names():
        if name in reader.meta.auxiliary:
            continue
        if name in bn_of:
            key = "\0bn:" + bn_of[name]
            if key not in seen:
                seen[key] = {"bn": bn_of[name]}
                order.append(key)
            continue
        prefix, leaf = _split(name)
        leaf = leaf.split(":")[0]
        info = reader.info(name)
        entry = seen.get(prefix)
        if leaf in ("weight", "kernel") and len(info.shape) >= 2:
            if entry is None:
                entry = seen[prefix] = {}
                order.append(prefix)
            entry["kernel"] = name
        elif leaf == "bias" and entry is not None:
            entry["bias"] = name
    out = []
    for key in order:
        e = seen[key]
        out.append(_Module(key, e.get("kernel"), e.get("bias"), e.get("bn")))
    return out


def _normal_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    from math import erf
    return 0.5 * (1.0 + np.vectorize(erf)(z / math.sqrt(2.0)))


def _e_relu(b: np.ndarray, s: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """E[max(y - shift, 0)] for y ~ N(b, s^2)."""
    m = b - shift
    safe = np.where(s > 0, s, 1.0)
    z = m / safe
    val = s * _normal_pdf(z) + m * _normal_cdf(z)
    return np.where(s > 0, val, np.maximum(m, 0.0))


def expectations(beta: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray]:
    """E[h(y)], y ~ N(beta, s^2), for every candidate activation."""
    y = beta[:, None] + s[:, None] * _GH_X[None, :]
    sig = 1.0 / (1.0 + np.exp(-np.clip(y, -60, 60)))
    relu = _e_relu(beta, s)
    return {
        "linear": beta,
        "relu": relu,
        "relu6": relu - _e_relu(beta, s, 6.0),
        "silu": (y * sig) @ _GH_W,
        "hardswish": (y * np.clip(y + 3.0, 0.0, 6.0) / 6.0) @ _GH_W,
    }


_FAMILY = {"linear": "linear", "relu": "relu", "relu6": "relu", "silu": "silu",
           "hardswish": "hardswish"}


def _kernel_sum(w: np.ndarray, channels: int) -> tuple[np.ndarray, bool] | None:
    """Torch layout (out, in/groups, ...) summed over taps: (out, in) or (out,) depthwise."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 2:
        return (w, False) if w.shape[1] == channels else None
    taps = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
    if w.shape[1] == channels:
        return taps, False
    if w.shape[1] == 1 and w.shape[0] % channels == 0:
        return taps[:, 0], True
    return None


def downstream_test(reader: Reader, bn: BNRef, kernel: str, bias: str | None,
                    nxt: BNRef) -> tuple[str, str] | None:
    """(consumer kind, detail) when the next BN's running mean decides it, else None."""
    if bn.channels < MIN_CHANNELS or bn.beta is None:
        return None
    ks = _kernel_sum(reader.read_array(kernel), bn.channels)
    if ks is None:
        return None
    k, depthwise = ks
    if k.shape[0] != nxt.channels:
        return None
    beta = np.asarray(reader.read(bn.beta), np.float64)
    gamma = np.ones_like(beta) if bn.gamma is None else np.asarray(reader.read(bn.gamma),
                                                                   np.float64)
    target = np.asarray(reader.read(nxt.mean), np.float64)
    if bias is not None:
        target = target - np.asarray(reader.read(bias), np.float64)
    if not (np.isfinite(beta).all() and np.isfinite(gamma).all() and np.isfinite(target).all()):
        return None
    norm = float(np.linalg.norm(target))
    if norm <= 1e-12:
        return None
    errs: dict[str, tuple[float, float]] = {}
    for kind, e in expectations(beta, np.abs(gamma)).items():
        if depthwise:
            mult = k.shape[0] // bn.channels
            pred = k * np.repeat(e, mult)
        else:
            pred = k @ e
        pp = float(pred @ pred)
        if pp <= 0:
            continue
        alpha = float(pred @ target) / pp
        errs[kind] = (float(np.linalg.norm(target - alpha * pred)) / norm, alpha)
    if not errs:
        return None
    best = min(errs, key=lambda c: errs[c][0])
    err, alpha = errs[best]
    others = [v[0] for c, v in errs.items() if _FAMILY[c] != _FAMILY[best]]
    if err > FIT_MAX or not SCALE_RANGE[0] <= alpha <= SCALE_RANGE[1]:
        return None
    if others and err > MARGIN * min(others):
        return None
    relu_err = min(errs.get("relu", (math.inf, 0.0))[0], errs.get("relu6", (math.inf, 0.0))[0])
    if _FAMILY[best] in ("silu", "hardswish") and err > SMOOTH_MARGIN * relu_err:
        return None
    if best == "relu6" and errs["relu6"][0] > 0.8 * errs["relu"][0]:
        best = "relu"  # not clearly ReLU6: report the family, no saturation claims
    return best, f"fit {err:.3f} (scale {alpha:.2f}) via {kernel}"


def _post_activation(reader: Reader, bn: BNRef) -> bool:
    if bn.channels < POST_ACT_MIN:
        return False
    mean = np.asarray(reader.read(bn.mean), np.float64)
    var = np.asarray(reader.read(bn.var), np.float64)
    return bool(np.isfinite(mean).all() and (mean >= 0).all() and (var > 0).all()
                and (mean > 0).mean() > 0.9)


def _residual(bns: Sequence[BNRef]) -> dict[str, str]:
    """BN name -> "add" for the sum-feeding BNs of residual-looking blocks."""
    by_block: dict[str, list[tuple[int, str]]] = {}
    shortcut_blocks: set[str] = set()
    for layer in bns:
        block, leaf = _split(layer.name)
        m = _NUMBERED.match(leaf)
        if m:
            by_block.setdefault(block, []).append((int(m.group(2)), layer.name))
        if _SHORTCUT.search(layer.name):
            shortcut_blocks.add(layer.name)
    out: dict[str, str] = {}
    stages_with_shortcut = set()
    for name in shortcut_blocks:
        for block in by_block:
            if name.startswith(block + ".") or name.startswith(block + "/"):
                stages_with_shortcut.add(_split(block)[0])
                out[name] = "add"
    for block, numbered in by_block.items():
        if len(numbered) < 2 or _split(block)[0] not in stages_with_shortcut:
            continue
        out[max(numbered)[1]] = "add"
    return out


def infer_consumers(reader: Reader, bns: Sequence[BNRef],
                    unknown: set[str]) -> dict[str, Inferred]:
    """Inferred consumers (and producers) for the BN layers named in ``unknown``."""
    out: dict[str, Inferred] = {}
    if not unknown:
        return out
    by_name = {b.name: b for b in bns}
    mods = _modules(reader, bns)
    producer: dict[str, str] = {}
    for i, mod in enumerate(mods):
        if mod.bn is None or mod.bn not in unknown:
            continue
        bn = by_name[mod.bn]
        if i > 0 and mods[i - 1].kernel is not None:
            producer[bn.name] = mods[i - 1].kernel or ""
        # the next kernel and the BN right after it
        if i + 2 < len(mods) and mods[i + 1].kernel and mods[i + 2].bn:
            k = mods[i + 1]
            nxt = by_name[mods[i + 2].bn or ""]
            try:
                verdict = downstream_test(reader, bn, k.kernel or "", k.bias, nxt)
            except (ValueError, KeyError, IndexError, FloatingPointError):
                verdict = None
            if verdict is not None:
                out[bn.name] = Inferred(verdict[0], "inferred:downstream-mean",
                                        producer.get(bn.name), verdict[1])
                continue
        try:
            post = _post_activation(reader, bn)
        except (ValueError, KeyError, IndexError):
            post = False
        if post:
            out[bn.name] = Inferred("other", "inferred:post-activation", producer.get(bn.name),
                                    "running means all >= 0: the BN reads a rectified input")
    for name, kind in _residual([b for b in bns if b.name in unknown]).items():
        if name not in out:
            out[name] = Inferred(kind, "inferred:residual-block", producer.get(name))
    return out
