"""Role-aware tensor anomalies (issue 12): healthy tails pass, every injected kind is found."""

from __future__ import annotations

import numpy as np
import pytest

from bnexporter.detection import extremes as ex
from bnexporter.detection.analysis import TensorScan, Thresholds, scan_chunks

RNG = np.random.default_rng(0)


def verdict(x: np.ndarray, role: str, dtype: str = "float32", out_axis: int | None = None,
            chunk: int = 1000):
    flat = np.ascontiguousarray(x).ravel()
    scan = TensorScan(x.shape, dtype, Thresholds(), out_axis)
    step = max(chunk // scan.align, 1) * scan.align
    st = scan_chunks(x.shape, dtype, ((i, flat[i:i + step]) for i in range(0, flat.size, step)),
                     Thresholds(), out_axis)
    v = ex.judge(st, role, dtype)
    return v[0] if v else None


def healthy_kernel(n: int = 200_000, scale: float = 0.05) -> np.ndarray:
    return RNG.normal(0, scale, size=(n // 288, 32, 3, 3)).astype(np.float32)


def test_healthy_large_kernel_has_tiny_values_but_no_anomaly():
    w = healthy_kernel(2_000_000)
    st = scan_chunks(w.shape, "float32", [(0, w.ravel())], Thresholds(), 0)
    assert st.tiny > 0  # the seed's rule fires on this healthy tensor
    assert ex.judge(st, ex.KERNEL, "float32") is None


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-4, 3e-5])
def test_a_continuous_distribution_of_any_scale_passes(scale):
    assert verdict(healthy_kernel(100_000, scale), ex.KERNEL) is None


def test_band_counts_are_exact_across_chunks():
    x = np.array([0, 1e-40, 1e-30, 1e-20, 3e-6, 2e-5, 5e-4, 0.5, -2e5, np.nan], np.float32)
    st = scan_chunks(x.shape, "float32", [(i, x[i:i + 3]) for i in range(0, 10, 3)])
    assert (st.zero, st.tiny, st.deep, st.band1, st.band2, st.huge, st.nonfinite) == \
        (1, 4, 2, 1, 1, 1, 1)
    assert st.subnormal == 1 and st.negative == 1 and st.min_abs == 0.0


def test_running_variance_is_a_scale():
    var = RNG.lognormal(10, 3, size=256).astype(np.float32)  # up to ~1e8 and beyond
    assert var.max() > 1e5
    assert verdict(var, ex.VAR) is None


def test_decayed_running_stats_of_dead_channels_pass_but_the_seed_pattern_does_not():
    var = RNG.uniform(0.1, 2, size=96).astype(np.float32)
    var[:20] = 10.0 ** RNG.uniform(-21, -8, size=20)  # momentum decay: measured in fixtures
    assert verdict(var, ex.VAR) is None
    var[30] = 1e-37
    assert verdict(var, ex.VAR) == ex.DEAD_INPUT_STATS
    mean = RNG.normal(0, 0.3, size=96).astype(np.float32)
    mean[5] = 1e-37
    assert verdict(mean, ex.MEAN) == ex.DEAD_INPUT_STATS


def test_negative_variance_and_near_overflow():
    var = np.ones(8, np.float32)
    var[2] = -0.5
    assert verdict(var, ex.VAR) == ex.NEGATIVE_VAR
    var[2] = 1e38
    assert verdict(var, ex.VAR) == ex.HUGE
    assert verdict(np.full(8, 1e6, np.float32), ex.VAR) is None


@pytest.mark.parametrize("role", [ex.KERNEL, ex.BIAS, ex.GAMMA, ex.BETA, ex.OTHER, ex.VAR,
                                  ex.MEAN, ex.AUX, ex.INTEGER])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_is_never_missed(role, bad):
    x = RNG.normal(size=500).astype(np.float32)
    x[123] = bad
    assert verdict(x, role) == ex.NONFINITE


def test_seed_collapsed_gamma_and_exploding_kernel():
    g = RNG.uniform(0.5, 1.5, 64).astype(np.float32)
    g[3] = 1e-30
    assert verdict(g, ex.GAMMA) == ex.DEEP_TINY
    w = healthy_kernel()
    w.flat[77] = 1e30
    assert verdict(w, ex.KERNEL, out_axis=0) == ex.HUGE


def test_zeroed_constant_and_zero_filter_kernels():
    w = healthy_kernel(20_000)
    assert verdict(np.zeros_like(w), ex.KERNEL, out_axis=0) == ex.ZEROED
    assert verdict(np.full_like(w, 0.01), ex.KERNEL, out_axis=0) == ex.CONSTANT
    w[4] = 0
    assert verdict(w, ex.KERNEL, out_axis=0) == ex.ZERO_FILTER


def test_constant_non_kernels_are_initialisations():
    # LayerScale 1e-6 * ones, LayerNorm weight 1, zero biases: not anomalies
    assert verdict(np.full(384, 1e-6, np.float32), ex.OTHER) is None
    assert verdict(np.ones(384, np.float32), ex.GAMMA) is None
    assert verdict(np.zeros(384, np.float32), ex.BIAS) is None


def test_subnormal_and_tiny_floods():
    w = healthy_kernel(50_000)
    sel = RNG.random(w.shape) < 0.3
    f = w.copy()
    f[sel] = 1e-40
    assert verdict(f, ex.KERNEL, out_axis=0) == ex.DEEP_TINY
    f = w.copy()
    f[sel] *= 1e-7
    assert verdict(f, ex.KERNEL, out_axis=0) == ex.TINY_EXCESS
    h = w.astype(np.float16)
    h[sel] = np.float16(1e-6)  # fp16 subnormals
    assert verdict(h, ex.KERNEL, "float16", out_axis=0) == ex.TINY_EXCESS
    assert verdict(w.astype(np.float16), ex.KERNEL, "float16", out_axis=0) is None


def test_a_few_decaying_weights_of_dead_channels_are_not_a_tensor_anomaly():
    w = healthy_kernel(20_000)
    w[:, 3] = w[:, 3] * 10.0 ** RNG.uniform(-10, -4, size=w[:, 3].shape)  # 1 of 32 inputs
    assert verdict(w, ex.KERNEL, out_axis=0) is None


def test_roles_from_names():
    bn = {"bn.weight": ex.GAMMA}
    assert ex.role_of("bn.weight", bn, False, False, "float32") == ex.GAMMA
    assert ex.role_of("conv.weight", bn, True, False, "float32") == ex.KERNEL
    assert ex.role_of("attn.in_proj_bias", bn, False, False, "float32") == ex.BIAS
    assert ex.role_of("dense/bias:0", bn, False, False, "float32") == ex.BIAS
    assert ex.role_of("Adam/m/x", bn, True, True, "float32") == ex.AUX
    assert ex.role_of("bn.num_batches_tracked", bn, False, False, "int64") == ex.INTEGER


def test_poisson_tail():
    assert ex.poisson_sf(1, 1e-3) == pytest.approx(1e-3, rel=1e-2)
    assert ex.poisson_sf(5, 0.111) < 1e-6
    assert ex.poisson_sf(3, 5.0) == 1.0


class _Reader:
    def __init__(self, arrays):
        self.arrays = arrays

    def read(self, name):
        return self.arrays[name]


class _Layer:
    def __init__(self, name, gamma=True):
        self.name = name
        self.gamma = f"{name}.g" if gamma else None
        self.beta, self.mean, self.var = f"{name}.b", f"{name}.m", f"{name}.v"


def _arrays(name, trained):
    n = 8
    if trained:
        return {f"{name}.g": RNG.uniform(0.5, 1.5, n), f"{name}.b": RNG.normal(size=n),
                f"{name}.m": RNG.normal(size=n), f"{name}.v": RNG.uniform(0.1, 2, n)}
    return {f"{name}.g": np.ones(n), f"{name}.b": np.zeros(n), f"{name}.m": np.zeros(n),
            f"{name}.v": np.ones(n)}


def test_never_updated_layers():
    arrays = {**_arrays("a", True), **_arrays("b", False)}
    layers = [_Layer("a"), _Layer("b")]
    reader = _Reader(arrays)
    assert ex.never_updated_layers(reader, layers, 100) == {"b"}
    assert ex.never_updated_layers(reader, layers, None) == {"b"}  # the model did train
    assert ex.never_updated_layers(reader, layers, 0) == set()
    fresh = _Reader({**_arrays("a", False), **_arrays("b", False)})
    assert ex.never_updated_layers(fresh, layers, None) == set()  # a fresh init, step unknown
    assert ex.never_updated_layers(fresh, layers, 5) == {"a", "b"}
