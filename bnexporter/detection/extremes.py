"""Role-aware anomaly rule for weight tensors (issue 12), and the BN-never-updated check.

The seed's rule (any ``|w| > T`` or ``0 < |w| < 1/T``) fires on nearly every healthy
model: a large tensor always has a few weights that happen to be tiny, and running
variances of 1e5 and more are legitimate scales. Here every tensor gets a *role*
(kernel, bias, gamma, beta, running_mean, running_var, other, auxiliary, integer)
and the one-pass statistics of :class:`~bnexporter.detection.analysis.TensorStats`
(plain counts of ``|w|`` in magnitude bands, exact zeros, subnormals, NaN/Inf,
max and min ``|w|``, negatives) are judged by what the role means. The rule, its
thresholds and the measurements behind them are in docs/extremes.md.

No I/O here except :func:`never_updated_layers`, which reads four small BN vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from bnexporter.detection.analysis import DEEP_LIMIT, TensorStats
from bnexporter.formats import dtypes

# roles
KERNEL, BIAS, OTHER, AUX, INTEGER = "kernel", "bias", "other", "auxiliary", "integer"
GAMMA, BETA, MEAN, VAR = "gamma", "beta", "running_mean", "running_var"
BN_ROLES = {"gamma": GAMMA, "beta": BETA, "mean": MEAN, "var": VAR}

# anomaly kinds (TensorReport.anomaly)
NONFINITE = "nonfinite"          # NaN / Inf anywhere
HUGE = "huge"                    # |w| above the role's huge limit
DEEP_TINY = "deep_tiny"          # 0 < |w| < deep limit: no training dynamics go there
TINY_EXCESS = "tiny_excess"      # far more values near 0 than the distribution predicts
ZEROED = "zeroed"                # a kernel that is all zeros
CONSTANT = "constant"            # a kernel that is all one (non-zero) value
ZERO_FILTER = "zero_filter"      # a kernel output filter that is ~all zero
NEGATIVE_VAR = "negative_var"    # a running variance below zero
DEAD_INPUT_STATS = "dead_input_stats"  # running mean / var at the seed's ~1e-37 pattern
KINDS = (NONFINITE, HUGE, DEEP_TINY, TINY_EXCESS, ZEROED, CONSTANT, ZERO_FILTER,
         NEGATIVE_VAR, DEAD_INPUT_STATS)


def role_of(name: str, bn_roles: Mapping[str, str], is_kernel: bool, auxiliary: bool,
            dtype: str) -> str:
    if auxiliary:
        return AUX
    if not dtypes.is_float(dtype):
        return INTEGER
    if name in bn_roles:
        return bn_roles[name]
    if is_kernel:
        return KERNEL
    low = name.lower()
    tail = low.rsplit("/", 1)[-1].rsplit(".", 1)[-1].split(":")[0]
    if tail.endswith(("bias", "biases")) or tail == "b":
        return BIAS
    return OTHER


def bn_role_map(layers: Iterable[object]) -> dict[str, str]:
    """{tensor name: role} for the four vectors of every discovered BN layer."""
    out: dict[str, str] = {}
    for layer in layers:
        for attr, role in BN_ROLES.items():
            name = getattr(layer, attr, None)
            if name:
                out[name] = role
    return out


def poisson_sf(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam), summed upward from k (used only for k > lam)."""
    if k <= 0:
        return 1.0
    if lam <= 0:
        return 0.0
    if k <= lam:
        return 1.0
    term = math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1))
    total, i = 0.0, k
    while term > total * 1e-12 and i < k + 100_000:
        total += term
        i += 1
        term *= lam / i
    return min(total, 1.0)


def expected_tiny(b1: int, b2: int) -> float:
    """Values expected in (0, L) from the density the tensor shows just above L.

    A continuous density that is smooth near 0 puts density(0) x L values in
    (0, L) (|w| folds both signs): [L, 10L) holds ~9x that, [10L, 100L) ~90x. The
    larger of the two estimates is used (the conservative one), with one pseudo-count.
    """
    return max((b1 + 1) / 9.0, (b2 + 1) / 90.0)


@dataclass(frozen=True)
class ExtremeThresholds:
    """The rule's thresholds (reasoning in docs/extremes.md)."""
    deep: float = DEEP_LIMIT     # 0 < |w| below this: no healthy tail value goes there
    alpha: float = 1e-7          # Poisson tail probability of "far above expectation"
    slack: float = 4.0           # allowed density(0) / band-estimate factor
    tiny_fraction: float = 0.25  # ... and at least this share of the non-zero values


_DEFAULT = ExtremeThresholds()


def judge(st: TensorStats, role: str, dtype: str, th: ExtremeThresholds = _DEFAULT
          ) -> tuple[str, str] | None:
    """(kind, detail) of the first anomaly found in one tensor's stats, or None.

    ``st`` comes from :class:`~bnexporter.detection.analysis.TensorScan`; the
    thresholds are :class:`ExtremeThresholds` (the scan's band edges come from
    ``Thresholds.extreme`` and the dtype).
    """
    size = st.size
    nonfinite = st.nonfinite
    if nonfinite:
        return NONFINITE, f"{nonfinite} NaN/Inf of {size} values"
    if role in (AUX, INTEGER) or size == 0 or not dtypes.is_float(dtype):
        return None
    max_abs = st.max_abs
    deep = st.deep
    zero = st.zero
    neg = st.negative
    if role in (MEAN, VAR):
        overflow = dtypes.finfo_limits(dtype)[0] / 8.0
        if max_abs > overflow:
            return HUGE, f"max |value| {max_abs:.3g} near the {dtype} overflow"
        if role == VAR and neg:
            return NEGATIVE_VAR, f"{neg} negative variances"
        # exact zeros count for a variance unless the whole tensor is 0 (then it is not a
        # running variance: a zero-initialised offset mistaken for one)
        var_zero = zero if role == VAR and zero < size else 0
        if deep or var_zero:
            n = deep + var_zero
            return DEAD_INPUT_STATS, (f"{n} values below {th.deep:g}: input never varies "
                                      "(seed dead-input pattern)")
        return None
    huge = st.huge
    if huge:
        return HUGE, f"{huge} values above the huge limit, max |w| {max_abs:.3g}"
    if deep:
        return DEEP_TINY, f"{deep} values with 0 < |w| < {th.deep:g}"
    min_abs = st.min_abs
    constant = size > 1 and min_abs == max_abs and neg in (0, size)
    if role == KERNEL:
        if zero == size:
            return ZEROED, f"all {size} values are 0"
        if constant:
            return CONSTANT, f"all {size} values equal {max_abs:.3g} in magnitude"
        dead = st.dead_filters
        if dead:
            return ZERO_FILTER, f"{len(dead)} output filter(s) ~zero, first {dead[0]}"
    if role in (KERNEL, OTHER) and not constant:
        # both: far more values in (0, L) than the density just above L predicts, and
        # a meaningful share of the tensor (a few weights of dying channels decaying
        # towards 0 under weight decay are a channel finding, not a tensor anomaly)
        k = st.tiny - st.deep
        e = expected_tiny(st.band1, st.band2)
        lam = th.slack * e
        if k > lam and k >= th.tiny_fraction * (size - zero) and \
                poisson_sf(k, lam) < th.alpha:
            return TINY_EXCESS, (f"{k} of {size} values in (0, 1/T), about {e:.3g} expected "
                                 "from the density above 1/T")
    return None


# ---------------------------------------------------------------- BN never updated

def at_initial_values(gamma: np.ndarray | None, beta: np.ndarray | None, mean: np.ndarray,
                      var: np.ndarray) -> bool:
    """True when a BN layer is exactly at its framework initialisation."""
    def exactly(a: np.ndarray | None, value: float) -> bool:
        return a is None or bool(np.all(np.asarray(a, dtype=np.float64) == value))
    mean = np.asarray(mean)
    if mean.size == 0:
        return False
    return exactly(gamma, 1.0) and exactly(beta, 0.0) and exactly(mean, 0.0) and \
        exactly(var, 1.0)


def never_updated_layers(reader: object, layers: Iterable[object], step: int | None
                         ) -> set[str]:
    """Names of BN layers still exactly at (gamma 1, beta 0, mean 0, var 1).

    Reported when the checkpoint is past step 0, or when the step is unknown and
    some other BN layer of the same model has moved (so the model was trained).
    At step 0, or with no step and every layer at init, nothing is reported: a
    freshly initialised model looks exactly like this.
    """
    if step == 0:
        return set()
    read = reader.read  # type: ignore[attr-defined]
    at_init: set[str] = set()
    moved = False
    for layer in layers:
        try:
            g = None if layer.gamma is None else read(layer.gamma)  # type: ignore[attr-defined]
            b = None if layer.beta is None else read(layer.beta)  # type: ignore[attr-defined]
            init = at_initial_values(g, b, read(layer.mean), read(layer.var))  # type: ignore[attr-defined]
        except (KeyError, ValueError, TypeError):
            continue
        if init:
            at_init.add(layer.name)  # type: ignore[attr-defined]
        else:
            moved = True
    if step is None and not moved:
        return set()
    return at_init
