"""The kernel's column-minimum path (kernel._column_low) against the whole-tensor
reference of test_kernel: sparse values below 1/T (the path's common case), tails that
do not fill a row, the dense fallback, NaN payloads, -0.0, subnormals, every dtype,
and pieces split anywhere, with every count on and with the lazy first pass."""

from __future__ import annotations

import numpy as np
import pytest

from bnexporter.detection import kernel
from bnexporter.detection.analysis import TensorScan
from tests.detection.test_kernel import TH, _store, decode, reference, scan

DTYPES = ["float32", "float16", "bfloat16", "float64"]


@pytest.fixture(params=[(4, 2, 4096), (32, 256, kernel.PIECE_BYTES), (7, 3, 1000)])
def columns(request, monkeypatch):
    rows, width, piece = request.param
    monkeypatch.setattr(kernel, "ROWS", rows)
    monkeypatch.setattr(kernel, "MIN_COLUMNS", width)
    monkeypatch.setattr(kernel, "PIECE_BYTES", piece)
    return request.param


def _sparse(dtype: str, n: int, seed: int, scale: float = 0.05) -> np.ndarray:
    """Healthy weights with a few planted values in every band and the specials."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n) * scale
    k = max(n // 5000, 3)
    at = rng.choice(n, size=8 * k, replace=False)
    w[at[:k]] = 0.0
    w[at[k:2 * k]] = -0.0
    w[at[2 * k:3 * k]] = 3e-6 * rng.choice([-1, 1], k)   # below L
    w[at[3 * k:4 * k]] = 5e-5                              # 10 L band
    w[at[4 * k:5 * k]] = -5e-4                             # 100 L band
    w[at[5 * k:6 * k]] = 1e-30                             # deep (fp32 / fp64)
    w[at[6 * k:7 * k]] = -1e-40 if dtype != "float64" else 1e-310  # subnormal
    w[at[7 * k:]] = 2e5 * rng.choice([-1, 1], k)           # huge
    return _store(dtype, w)


def _check(dtype: str, raw: np.ndarray, shape=None, out_axis=None, steps=(None, 977, 4097)):
    shape = shape or (raw.size,)
    ref = reference(dtype, decode(dtype, raw), shape, out_axis)
    for step in steps:
        assert scan(dtype, raw, shape, out_axis, step) == ref, (dtype, step)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [50_000, 65_536 + 13, 300_001])
def test_sparse_low_values(dtype, n, columns):
    _check(dtype, _sparse(dtype, n, n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_value_below_the_cut(dtype, columns):
    rng = np.random.default_rng(8)
    w = (0.5 + rng.random(40_000)) * rng.choice([-1, 1], 40_000)
    _check(dtype, _store(dtype, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_near_zero_falls_back(dtype, columns):
    rng = np.random.default_rng(9)
    w = rng.standard_normal(30_000) * 1e-6   # most values below L
    w[::3] = 0.0
    _check(dtype, _store(dtype, w))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nan_payloads_and_infinities(dtype, columns):
    raw = _sparse(dtype, 40_000, 10)
    if dtype == "float32":
        specials = np.array([0x7FC00001, 0xFFC00000, 0x7F800001, 0xFFBFFFFF, 0x7F800000,
                             0xFF800000, 0x80000000, 0x00000001, 0x807FFFFF], np.uint32)
    else:
        specials = np.array([0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001,
                             0x7FF0000000000000, 0xFFF0000000000000, 0x8000000000000000,
                             0x0000000000000001], np.uint64)
    raw[[5, 17, 20_000, 39_999, 777, 4096, 2047, 2048, 123][: specials.size]] = specials
    _check(dtype, raw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_negative_zeros_and_subnormals(dtype, columns):
    w = np.full(20_000, -0.0)
    w[1::2] = -1e-40 if dtype != "float64" else -1e-310
    _check(dtype, _store(dtype, w))


@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_with_dead_filters(dtype, axis, columns):
    shape = (96, 3, 3, 64) if axis == 0 else (3, 3, 64, 96)
    raw = _sparse(dtype, int(np.prod(shape)), 11)
    w = decode(dtype, raw).reshape(shape)
    dead = (0, 5, 95)
    for d in dead:
        w[(d, ...) if axis == 0 else (..., d)] = 0.0
    raw = _store(dtype, np.where(np.abs(w) > 1e4, 0.1, w).ravel())
    _check(dtype, raw, shape, axis, steps=(None, 1001))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lazy_first_pass_matches_on_the_counted_fields(dtype, columns):
    raw = _sparse(dtype, 70_000, 12)
    full = TensorScan((raw.size,), dtype, TH)
    lazy = TensorScan((raw.size,), dtype, TH, bands=False, negative=False)
    for s in (full, lazy):
        for lo in range(0, raw.size, 5003):
            s.update(lo, raw[lo: lo + 5003])
    a, b = full.result(), lazy.result()
    assert (b.band1, b.band2, b.negative) == (-1, -1, -1)
    for f in ("nonfinite", "huge", "tiny", "zero", "deep", "subnormal", "max_abs", "min_abs"):
        assert getattr(a, f) == getattr(b, f), f


def test_integers_and_bool_are_untouched_by_the_float_path(columns):
    for dt in (np.int8, np.int32, np.int64, np.uint8):
        v = np.arange(-50, 50_000, dtype=np.int64).astype(dt)
        s = TensorScan((v.size,), np.dtype(dt).name, TH)
        s.update(0, v)
        st = s.result()
        a = np.abs(v.astype(np.float64))
        assert st.zero == int((v == 0).sum()) and st.max_abs == float(a.max())
        assert st.min_abs == float(a.min())
