import math

import numpy as np
import pytest

from bnexporter.detection.analysis import (
    TensorScan,
    Thresholds,
    classify_channels,
    extreme_limits,
    normal_cdf,
)


def _bn(n=6):
    return np.ones(n), np.zeros(n), np.zeros(n), np.ones(n)


def test_p_active_follows_phi_of_beta_over_s():
    gamma = np.array([2.0, 1.0, 0.5])
    beta = np.array([-1.0, 0.3, -0.2])
    var = np.array([4.0, 1.0, 0.25])
    eps = 1e-3
    res = classify_channels(gamma, beta, np.zeros(3), var, eps, "relu")
    s = np.abs(gamma) * np.sqrt(var / (var + eps))
    expected = [0.5 * math.erfc(-(b / si) / math.sqrt(2)) for b, si in zip(beta, s)]
    np.testing.assert_allclose(res.p_active, expected, rtol=1e-6)


def test_seed_pattern_collapsed_gamma_with_negative_beta_is_dead():
    g, b, m, v = _bn()
    g[1], b[1] = 1e-35, -1.3
    res = classify_channels(g, b, m, v, 1e-3, "relu")
    assert res.dead == [1]
    assert res.collapsed_gamma == [1]
    assert res.constant == []


def test_seed_pattern_dead_input_is_dead_and_flagged():
    g, b, m, v = _bn()
    g[2], b[2], m[2], v[2] = 1.56, -1.36, 1e-37, 1e-37
    res = classify_channels(g, b, m, v, 1e-3, "relu6")
    assert res.dead == [2]
    assert res.dead_input == [2]
    assert res.collapsed_gamma == []


def test_collapsed_gamma_with_positive_beta_is_constant_not_dead():
    g, b, m, v = _bn()
    g[0], b[0] = 1e-35, 0.7
    res = classify_channels(g, b, m, v, 1e-3, "relu")
    assert res.dead == []
    assert res.constant == [0]
    assert res.p_active[0] == 1.0


def test_add_and_linear_consumers_never_report_dead_relu():
    g, b, m, v = _bn()
    g[:] = 0.0  # zero-initialised residual BN
    for consumer in ("add", "linear", "other"):
        res = classify_channels(g, b, m, v, 1e-5, consumer)
        assert res.dead == [] and res.near_dead == []
        assert res.collapsed_gamma == list(range(6))


def test_near_dead_is_between_thresholds():
    th = Thresholds(dead_p=1e-3, near_dead_p=0.05)
    g, b, m, v = _bn(3)
    b[:] = [-2.0, -3.5, 0.0]  # p = 0.0228 (near), 0.000233 (dead), 0.5 (alive)
    res = classify_channels(g, b, m, v, 1e-9, "relu", th)
    assert res.dead == [1] and res.near_dead == [0]


def test_relu6_saturation():
    g, b, m, v = _bn(2)
    b[:] = [9.0, 3.0]
    g[:] = [0.5, 1.0]
    res = classify_channels(g, b, m, v, 1e-5, "relu6")
    assert res.saturated == [0]
    assert classify_channels(g, b, m, v, 1e-5, "relu").saturated == []


def test_nonfinite_channel_is_not_classified():
    g, b, m, v = _bn(2)
    b[0] = np.nan
    res = classify_channels(g, b, m, v, 1e-3, "relu")
    assert res.dead == [] and np.isnan(res.p_active[0])


def test_normal_cdf_far_tail_does_not_round_to_zero():
    assert 0 < normal_cdf(np.array([-30.0]))[0] < 1e-190


def test_tensor_scan_counts_are_exact_and_keep_zeros_apart():
    x = np.array([0.0, 0.0, 1e6, -1e-7, np.nan, np.inf, 3.0, -2e5], dtype=np.float32)
    scan = TensorScan(x.shape, "float32", Thresholds(extreme=1e5))
    for start in range(0, x.size, 3):
        scan.update(start, x[start:start + 3])
    st = scan.result()
    assert (st.nonfinite, st.huge, st.tiny, st.zero) == (2, 2, 1, 2)
    assert st.max_abs == pytest.approx(1e6)


def test_fp16_limits_are_representable():
    huge, tiny = extreme_limits("float16", 1e5)
    assert huge < 65504 and tiny >= 6.1e-5


@pytest.mark.parametrize("axis", [0, -1])
def test_dead_filters_found_on_the_right_axis_across_chunks(axis):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5, 3, 3)) if axis == 0 else rng.normal(size=(3, 3, 5, 6))
    if axis == 0:
        w[4] = 0.0
    else:
        w[..., 4] = 0.0
    scan = TensorScan(w.shape, "float32", Thresholds(), out_axis=axis)
    flat = w.astype(np.float32).ravel()
    step = scan.align * 2
    for start in range(0, flat.size, step):
        scan.update(start, flat[start:start + step])
    assert scan.result().dead_filters == [4]
