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
    The test tells a rectifier from the identity, not ReLU from SiLU or
    hard-swish (a free scale absorbs their difference: measured on real nets of
    both kinds). So it says ``relu`` only for networks without the marks of the
    SiLU / hard-swish era (squeeze-excitation modules); elsewhere a rectifier
    stays ``unknown`` and is never counted dead.
``inferred:timm-efficientnet``
    timm's EfficientNet / MobileNetV3 naming (``conv_stem``, ``blocks.i.j.bnK``,
    ``conv_head``) puts the activation inside the norm layer: SiLU / hard-swish
    after ``bn1`` (and ``bn2`` of inverted-residual blocks), none after the
    block's last BN. Reported as ``silu`` / ``linear``: not ReLUs either way.
``inferred:linear-bottleneck``
    A BN named as a projection (``project``, ``projection``, ``pwl``) closes an inverted
    residual's linear bottleneck: no activation follows it (MobileNetV2/V3,
    EfficientNet). Taken before the statistics, which cannot see the residual sum.
``preset:torchvision_mobilenet_v3``
    torchvision's MobileNetV3 (``features.N.block.M.1``): the block's last BN
    is its linear projection; the others carry the block's activation, ReLU for
    the first blocks and hard-swish after (torchvision's published table, large
    and small told apart by their block count); unknown counts keep only the
    projections.
``inferred:residual-block``
    In a block with numbered BNs (``bn1, bn2[, bn3]`` or ``norm1..``) beside a
    shortcut BN (``downsample`` / ``shortcut`` / ``proj``) in it or a sibling
    block, the last numbered BN and the shortcut BN feed the residual Add.
    Taken before the statistics, which cannot see a sum.

Nothing here is a guess in the unsafe direction by design: an undecided BN
stays ``unknown``, which is never counted as a dead ReLU.
"""

from __future__ import annotations

import functools
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
SCALE_RANGE = (0.3, 1.6)  # padding shrinks a conv's mean; other scales mean a wrong pairing
MIN_CHANNELS = 8       # fewer channels cannot tell the candidates apart
POST_ACT_MIN = 16      # channels needed before "all means >= 0" is evidence

_SE = re.compile(r"(^|[._/])(se|squeeze|excite|excitation|conv_reduce|conv_expand|"
                 r"se_reduce|se_expand)([._/]|$)", re.I)
_PROJECT = re.compile(r"(^|[._/])(project|projection|project_bn|project_BN|pwl|bn_pwl)"
                      r"([._/]|_bn|_BN|$)", re.I)
_SE_FC = re.compile(r"(^|[._/])fc[12][._/](weight|kernel)")  # torchvision's SE convs
_SHORTCUT = re.compile(r"(^|[._/])(downsample|shortcut|proj|skip|residual)([._/]|$)", re.I)
_NUMBERED = re.compile(r"^(bn|norm|n|batchnorm|batch_norm)(\d+)$", re.I)
@functools.cache
def _gauss_hermite() -> tuple[np.ndarray, np.ndarray]:
    """48 nodes and normalised weights; on first use (``numpy.polynomial`` is ~3 ms
    of every start otherwise)."""
    x, w = np.polynomial.hermite_e.hermegauss(48)
    return x, w / w.sum()


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


_STEM_WORDS = {"stem", "conv_stem", "bn_stem", "input", "first", "features"}
_HEAD_WORDS = {"head", "conv_head", "bn_head", "fc", "classifier", "logits", "last", "final"}
_TRAILING = re.compile(r"^(.*?)(\d*)$")


def _structural_key(prefix: str, is_bn: bool) -> tuple[tuple[int, int, int, str], ...]:
    """Sort key that puts modules back in construction order when a file sorted them.

    safetensors stores tensors by dtype and name, so ``c1, c2, n1, n2`` must become
    ``c1, n1, c2, n2``: numbered siblings by their number, a kernel before the BN
    of the same number; stem-like names first and head-like ones last.
    """
    parts = [p for p in re.split(r"[./]", prefix) if p]
    key = []
    for depth, part in enumerate(parts):
        m = _TRAILING.match(part)
        alpha, num = (m.group(1), m.group(2)) if m else (part, "")
        word = part.lower()
        rank = 0 if word in _STEM_WORDS else 2 if word in _HEAD_WORDS else 1
        leaf = depth == len(parts) - 1
        key.append((rank, int(num) if num else -1, int(is_bn) if leaf else 0, alpha))
    return tuple(key)


def _model_order(reader: Reader, bn_of: dict[str, str]) -> list[str]:
    names = [n for n in reader.names() if n not in reader.meta.auxiliary]
    if reader.keeps_module_order:
        return names
    return sorted(names, key=lambda n: _structural_key(
        bn_of[n] if n in bn_of else _split(n)[0], n in bn_of))


def _modules(reader: Reader, bns: Sequence[BNRef]) -> list[_Module]:
    """Modules in construction order (the state_dict's own order, or rebuilt from names)."""
    bn_of = {}
    for layer in bns:
        for t in (layer.mean, layer.var, layer.gamma, layer.beta):
            if t:
                bn_of[t] = layer.name
    order: list[str] = []
    seen: dict[str, dict[str, str]] = {}
    for name in _model_order(reader, bn_of):
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
    gh_x, gh_w = _gauss_hermite()
    y = beta[:, None] + s[:, None] * gh_x[None, :]
    sig = 1.0 / (1.0 + np.exp(-np.clip(y, -60, 60)))
    relu = _e_relu(beta, s)
    return {
        "linear": beta,
        "relu": relu,
        "relu6": relu - _e_relu(beta, s, 6.0),
        "silu": (y * sig) @ gh_w,
        "hardswish": (y * np.clip(y + 3.0, 0.0, 6.0) / 6.0) @ gh_w,
    }


# ReLU, ReLU6, SiLU and hard-swish rectify alike as far as a mean can tell
_FAMILY = {"linear": "linear", "relu": "rectifier", "relu6": "rectifier", "silu": "rectifier",
           "hardswish": "rectifier"}


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


def fit_errors(reader: Reader, bn: BNRef, kernel: str, bias: str | None,
               nxt: BNRef) -> dict[str, tuple[float, float]] | None:
    """Per candidate activation: (relative residual, scale) of the downstream-mean fit."""
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
    return errs or None


def downstream_test(reader: Reader, bn: BNRef, kernel: str, bias: str | None,
                    nxt: BNRef) -> tuple[str, str] | None:
    """(consumer kind, detail) when the next BN's running mean decides it, else None."""
    errs = fit_errors(reader, bn, kernel, bias, nxt)
    if not errs:
        return None
    family = _FAMILY[min(errs, key=lambda c: errs[c][0])]
    # within the family the members fit alike with different scales (hard-swish halves
    # its input near 0): the one with a plausible scale speaks for the family
    members = [c for c in errs if _FAMILY[c] == family
               and SCALE_RANGE[0] <= errs[c][1] <= SCALE_RANGE[1]]
    if not members:
        return None
    best = min(members, key=lambda c: errs[c][0])
    err, alpha = errs[best]
    others = [v[0] for c, v in errs.items() if _FAMILY[c] != family]
    if err > FIT_MAX:
        return None
    if others and err > MARGIN * min(others):
        return None
    if _FAMILY[best] != "linear":
        best = "rectifier"  # ReLU, ReLU6, SiLU and hard-swish fit alike; the caller decides
    return best, f"fit {err:.3f} (scale {alpha:.2f}) via {kernel}"


def _post_activation(reader: Reader, bn: BNRef) -> bool:
    if bn.channels < POST_ACT_MIN:
        return False
    mean = np.asarray(reader.read(bn.mean), np.float64)
    var = np.asarray(reader.read(bn.var), np.float64)
    return bool(np.isfinite(mean).all() and (mean >= 0).all() and (var > 0).all()
                and (mean > 0).mean() > 0.9)


def _timm_efficientnet(names: list[str], unknown: set[str]) -> dict[str, Inferred]:
    """timm EfficientNet / MobileNetV3 names: activation inside the norm layer."""
    if "bn1" not in names or not any(re.match(r"^blocks\.\d+\.\d+\.bn1$", n) for n in names):
        return {}
    blocks: dict[str, set[str]] = {}
    for n in names:
        m = re.match(r"^(blocks\.\d+\.\d+)\.(bn\d)$", n)
        if m:
            blocks.setdefault(m.group(1), set()).add(m.group(2))
    src = "inferred:timm-efficientnet"
    out: dict[str, Inferred] = {}
    for n in names:
        if n not in unknown:
            continue
        if n in ("bn1", "bn2"):
            out[n] = Inferred("silu", src)
            continue
        m = re.match(r"^(blocks\.\d+\.\d+)\.(bn\d)$", n)
        if not m:
            continue
        last = max(blocks[m.group(1)])
        out[n] = Inferred("linear" if m.group(2) == last else "silu", src)
    return out


# blocks using ReLU ("RE") before hard-swish ("HS") in torchvision's MobileNetV3 tables
_MNV3_RELU_BLOCKS = {15: 6, 11: 3}  # large: features.1-6 RE; small: features.1-3 RE
_MNV3 = re.compile(r"^(?P<pre>.*?)features\.(?P<i>\d+)\.block\.(?P<j>\d+)\.1$")


def _torchvision_mnv3(names: list[str], unknown: set[str]) -> dict[str, Inferred]:
    hits = [(m, n) for n in names if (m := _MNV3.match(n))]
    if len(hits) < 4:
        return {}
    pre = hits[0][0].group("pre")
    blocks: dict[int, list[int]] = {}
    for m, _ in hits:
        blocks.setdefault(int(m.group("i")), []).append(int(m.group("j")))
    relu_upto = _MNV3_RELU_BLOCKS.get(len(blocks))
    src = "preset:torchvision_mobilenet_v3"
    out: dict[str, Inferred] = {}
    for m, n in hits:
        if n not in unknown:
            continue
        i, j = int(m.group("i")), int(m.group("j"))
        if j == max(blocks[i]):
            out[n] = Inferred("linear", src)
        elif relu_upto is not None:
            out[n] = Inferred("relu" if i <= relu_upto else "hardswish", src)
    if relu_upto is not None:
        last = max(blocks) + 1
        for n, kind in ((f"{pre}features.0.1", "hardswish"),
                        (f"{pre}features.{last}.1", "hardswish")):
            if n in unknown and n in names:
                out[n] = Inferred(kind, src)
    return out


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
    # a block shaped like one with a shortcut (same numbered leaves) is residual too:
    # identity shortcuts (same width in and out) store no tensor
    residual_shapes = {tuple(sorted(_split(n)[1] for _, n in numbered))
                       for block, numbered in by_block.items()
                       if _split(block)[0] in stages_with_shortcut}
    for block, numbered in by_block.items():
        shape = tuple(sorted(_split(n)[1] for _, n in numbered))
        if len(numbered) < 2 or (_split(block)[0] not in stages_with_shortcut
                                 and shape not in residual_shapes):
            continue
        out[max(numbered)[1]] = "add"
    return out


def _projection(name: str) -> bool:
    """MobileNet / EfficientNet naming: the projection BN closes a linear bottleneck."""
    return bool(_PROJECT.search(name)) and not _SHORTCUT.search(name)


def infer_consumers(reader: Reader, bns: Sequence[BNRef],
                    unknown: set[str]) -> dict[str, Inferred]:
    """Inferred consumers (and producers) for the BN layers named in ``unknown``."""
    out: dict[str, Inferred] = {}
    if not unknown:
        return out
    out.update(_timm_efficientnet([b.name for b in bns], unknown))
    out.update(_torchvision_mnv3([b.name for b in bns], unknown - set(out)))
    unknown = unknown - set(out)
    # names that say "this BN feeds the residual sum" beat the statistics, which
    # cannot see a sum (the next conv reads the activation of the sum)
    for name, kind in _residual([b for b in bns if b.name in unknown]).items():
        out[name] = Inferred(kind, "inferred:residual-block")
    for name in unknown - set(out):
        if _projection(name):
            out[name] = Inferred("linear", "inferred:linear-bottleneck")
    unknown = unknown - set(out)
    modern = any(_SE.search(n) or (_SE_FC.search(n) and len(reader.info(n).shape) == 4)
                 for n in reader.names())
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
            if verdict is not None and (verdict[0] == "linear" or not modern):
                kind = "relu" if verdict[0] == "rectifier" else verdict[0]
                out[bn.name] = Inferred(kind, "inferred:downstream-mean",
                                        producer.get(bn.name), verdict[1])
                continue
        try:
            post = _post_activation(reader, bn)
        except (ValueError, KeyError, IndexError):
            post = False
        if post:
            out[bn.name] = Inferred("other", "inferred:post-activation", producer.get(bn.name),
                                    "running means all >= 0: the BN reads a rectified input")
    return out
