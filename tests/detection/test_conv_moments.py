"""The one-pass products of a plain kernel (conv_moments) against refine.conv_input,
in both kernel layouts, and the file-backed rows against the kernel read whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bnexporter import scan
from bnexporter.detection import conv_moments, refine
from bnexporter.detection.refine import Dist, KernelStats
from bnexporter.scan import ScanOptions, analyse_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIELDS = ("mean", "lo", "hi", "var_ind", "var_full", "k3_ind", "k3_full")


def _feed(rng: np.random.Generator, cin: int) -> Dist:
    mean = rng.normal(size=cin)
    d = Dist(mean, rng.uniform(0.1, 2.0, cin), mean - 3.0, mean + rng.uniform(0, 4, cin),
             True, rng.normal(size=cin))
    return d


@pytest.mark.parametrize("layout", ["torch", "keras"])
@pytest.mark.parametrize("kshape", [(37, 19, 1, 1), (23, 11, 3, 3), (300, 260, 1, 1),
                                    (70, 40, 3, 3)])
def test_one_pass_products_equal_conv_input(layout, kshape):
    rng = np.random.default_rng(sum(kshape))
    out, cin = kshape[:2]
    k = rng.normal(size=kshape).astype(np.float32)
    k[0, 0] = 0.0
    if layout == "keras":
        k = np.ascontiguousarray(k.transpose(2, 3, 1, 0))  # (kh, kw, in, out)
    w = refine.kernel_matrix(k, layout)
    inf, train = _feed(rng, cin), _feed(rng, cin)
    bias = rng.normal(size=out)
    ci, ct = conv_moments.conv_inputs(w, inf, train, bias)
    ri, rt = refine.conv_inputs(KernelStats.of(w), 1, inf, train, bias)
    for f in FIELDS:
        np.testing.assert_allclose(getattr(ci, f), getattr(ri, f), rtol=2e-5, atol=1e-4,
                                   err_msg=f)
    for f in ("mean", "var_ind", "var_full"):
        np.testing.assert_allclose(getattr(ct, f), getattr(rt, f), rtol=2e-5, atol=1e-4,
                                   err_msg=f)
    assert ci.moments == inf.moments and ct.moments == train.moments


def test_a_kernel_that_does_not_fit_its_input_is_refused():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 9)).astype(np.float32)
    with pytest.raises(ValueError):
        conv_moments.conv_inputs(w, _feed(rng, 5), _feed(rng, 5), None)


@pytest.mark.parametrize("name", ["keras/k3_small.keras", "keras/k2_resnet_s400.h5",
                                  "torch/mobilenet_ddp.pt"])
def test_rows_read_from_the_file_give_the_verdicts_of_the_kernel_read_whole(name,
                                                                             monkeypatch):
    path = str(FIXTURES / name)
    used: list[str] = []
    real = scan._LazyProducer._file_rows

    def spy(self):  # type: ignore[no-untyped-def]
        got = real(self)
        if got is not None:
            used.append(self.link.kernel)
        return got

    monkeypatch.setattr(scan._LazyProducer, "_file_rows", spy)
    streamed = analyse_path(path, ScanOptions(bn_only=True))
    monkeypatch.setattr(scan._LazyProducer, "_file_rows", lambda self: None)
    whole = analyse_path(path, ScanOptions(bn_only=True))
    assert streamed.error is None and used
    assert [(r.name, r.classes) for r in streamed.bn_layers] == \
        [(r.name, r.classes) for r in whole.bn_layers]
    for a, b in zip(streamed.bn_layers, whole.bn_layers, strict=True):
        assert (a.min_p_active is None) == (b.min_p_active is None)
        if a.min_p_active is not None:
            assert a.min_p_active == pytest.approx(b.min_p_active, rel=1e-6, abs=1e-12)
