"""The refined estimate: kernel layouts, moments, ranges, graph links, and its effect."""

import json
import os

import numpy as np
import pytest

from bnexporter.detection import refine
from bnexporter.detection.analysis import Thresholds, classify_channels
from bnexporter.detection.discovery import BNLayer, discover
from bnexporter.detection.links import find_links
from bnexporter.detection.wiring import Feed
from bnexporter.formats.base import Reader, TensorInfo
from bnexporter.scan import ScanOptions, _analyse, analyse_path, refine_layers
from tests.support.paths import FIXTURES


class DictReader(Reader):
    """In-memory reader: lets a test state the exact tensors and config of a model."""

    format = "test"

    def __init__(self, arrays, framework="keras", config=None):
        super().__init__("<memory>")
        self.arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
        self._infos = {k: TensorInfo(k, v.shape, "float32") for k, v in self.arrays.items()}
        self.meta.framework = framework
        self.meta.model_config = config

    def _read_flat(self, info, start, stop):
        return self.arrays[info.name].reshape(-1)[start:stop]


# -- primitives ---------------------------------------------------------------------

def test_kernel_layouts_agree_on_one_conv():
    rng = np.random.default_rng(0)
    torch_k = rng.normal(size=(5, 3, 2, 2))             # (out, in, kh, kw)
    keras_k = torch_k.transpose(2, 3, 1, 0)              # (kh, kw, in, out)
    a = refine.kernel_matrix(torch_k, "torch")
    b = refine.kernel_matrix(keras_k, "keras")
    assert a.shape == b.shape == (5, 3, 4)
    np.testing.assert_array_equal(a, b)
    dense = rng.normal(size=(3, 5))                       # Keras Dense (in, out)
    np.testing.assert_array_equal(refine.kernel_matrix(dense, "keras")[:, :, 0],
                                  dense.T.astype(np.float32))


def test_keras_depthwise_layout_maps_output_to_its_input_channel():
    k = np.zeros((3, 3, 4, 2))                            # (kh, kw, in, multiplier)
    k[1, 1, 2, 1] = 7.0                                   # input 2, multiplier 1
    w = refine.kernel_matrix(k, "keras_dw")
    assert w.shape == (8, 1, 9)
    assert w[2 * 2 + 1, 0, 4] == 7.0 and np.count_nonzero(w) == 1


@pytest.mark.parametrize("top", [None, 6.0])
def test_clipped_moments_match_sampling(top):
    rng = np.random.default_rng(1)
    mean = np.array([-1.0, 0.3, 2.0, 5.5, -8.0])
    std = np.array([1.0, 2.0, 0.5, 1.5, 1.0])
    d = refine.clip(refine.gaussian(mean, std), top)
    x = rng.normal(mean, std, size=(400_000, 5))
    y = np.clip(x, 0, np.inf if top is None else top)
    np.testing.assert_allclose(d.mean, y.mean(0), atol=0.01)
    np.testing.assert_allclose(d.var, y.var(0), atol=0.02)
    assert (d.lo >= 0).all() and (top is None or (d.hi <= top).all())


def test_conv_input_range_contains_every_input_and_is_attained():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 3, 9))
    lo, hi = np.array([0.0, 0.0, -1.0]), np.array([6.0, 2.0, 1.5])
    feed = refine.Dist((lo + hi) / 2, np.ones(3), lo, hi)
    ci = refine.conv_input(refine.KernelStats.of(w), 1, feed, np.array([0.5, 0, 0, 0]))
    a = rng.uniform(lo[None, :, None], hi[None, :, None], size=(2000, 3, 9))
    x = np.einsum("oit,nit->no", w, a) + np.array([0.5, 0, 0, 0])
    assert (x <= ci.hi + 1e-9).all() and (x >= ci.lo - 1e-9).all()
    corner = np.where(w > 0, hi[None, :, None], lo[None, :, None])  # best input per tap
    np.testing.assert_allclose((w * corner).sum((1, 2)) + np.array([0.5, 0, 0, 0]), ci.hi)


def test_conv_input_rejects_a_kernel_that_does_not_fit():
    feed = refine.gaussian(np.zeros(6), np.ones(6))
    with pytest.raises(ValueError):
        refine.conv_input(refine.KernelStats.of(np.ones((4, 4, 1))), 1, feed, None)


# -- the network refinement ---------------------------------------------------------

def _dw_network(up_beta, dw_kernel, dw_beta=-0.2, dw_mean=0.0, dw_var=1.0):
    """Expand BN (4 ch) -> ReLU6 -> depthwise 3x3 -> BN: params and the producer."""
    up = refine.BNParams.of(np.ones(4), np.asarray(up_beta, float), np.zeros(4), np.ones(4),
                            1e-3)
    dw = refine.BNParams.of(np.ones(4), np.full(4, dw_beta), np.full(4, dw_mean),
                            np.full(4, dw_var), 1e-3)
    from bnexporter.detection.links import Link
    link = Link("dw_bn", "dw/kernel", "keras_dw", 4, None,
                Feed("relu6", None, (Feed("bn", "up_bn"),)))
    w = refine.kernel_matrix(dw_kernel, "keras_dw")
    return {"up_bn": up, "dw_bn": dw}, {"dw_bn": refine.Producer.of(link, w, None)}


def test_dead_upstream_makes_the_depthwise_channel_constant():
    # channel 0 of the expand BN is hopeless (beta -10 sd): its ReLU6 emits 0, so the
    # depthwise channel reads only zeros and outputs the constant beta - mean / sd
    kernel = np.full((3, 3, 4, 1), 0.2)
    params, prods = _dw_network([-10.0, 0.5, 0.5, 0.5], kernel, dw_beta=-0.2)
    ref = refine.refine_network(params, prods)["dw_bn"]
    assert ref.p_active[0] == 0.0
    assert ref.y_hi[0] == pytest.approx(-0.2 / 1.0, rel=1e-3)
    plain = classify_channels(np.ones(4), np.full(4, -0.2), np.zeros(4), np.ones(4), 1e-3,
                              "relu6")
    assert plain.p_active[0] > 0.4 and 0 not in plain.dead      # what the plain model says
    res = refine.apply(plain, ref, "relu6", Thresholds())
    assert 0 in res.dead and all(c not in res.dead for c in (1, 2, 3))


def test_constant_positive_channel_is_reported_constant_not_dead():
    kernel = np.full((3, 3, 4, 1), 0.2)
    params, prods = _dw_network([-10.0, 0.5, 0.5, 0.5], kernel, dw_beta=0.4)
    ref = refine.refine_network(params, prods)["dw_bn"]
    plain = classify_channels(np.ones(4), np.full(4, 0.4), np.zeros(4), np.ones(4), 1e-3,
                              "relu6")
    res = refine.apply(plain, ref, "relu6", Thresholds())
    assert 0 in res.constant and 0 not in res.dead and 1 not in res.constant


def test_negative_filter_on_nonnegative_input_is_dead_only_when_bounded():
    # all-negative depthwise filter on ReLU6 input: x <= 0, the threshold sits at
    # mean + 0.5 sd > 0 -> dead although the Gaussian gives Phi(-0.5) = 31 %
    kernel = np.full((3, 3, 4, 1), -0.1)
    kernel[..., 3, 0] = 0.1  # channel 3 can reach x = 5.4: not provably dead
    params, prods = _dw_network([0.5] * 4, kernel, dw_beta=-0.5, dw_mean=-0.4, dw_var=0.64)
    ref = refine.refine_network(params, prods)["dw_bn"]
    assert (ref.p_active[:3] == 0).all()
    assert ref.p_active[3] > 0.01


def test_a_non_finite_weight_spoils_only_its_own_channel():
    kernel = np.full((3, 3, 4, 1), 0.2)
    kernel[1, 1, 2, 0] = np.nan
    params, prods = _dw_network([-10.0, 0.5, 0.5, 0.5], kernel, dw_beta=-0.2)
    ref = refine.refine_network(params, prods)["dw_bn"]
    assert ref.p_active[0] == 0.0 and np.isnan(ref.p_active[2])
    plain = classify_channels(np.ones(4), np.full(4, -0.2), np.zeros(4), np.ones(4), 1e-3,
                              "relu6")
    res = refine.apply(plain, ref, "relu6", Thresholds())
    assert res.dead == [0] and 2 not in res.near_dead
    assert res.p_active[2] == pytest.approx(plain.p_active[2])


def test_missing_feed_or_bad_numbers_leave_the_plain_estimate():
    params, prods = _dw_network([0.5] * 4, np.full((3, 3, 4, 1), 0.1))
    del params["up_bn"]
    assert refine.refine_network(params, prods) == {}
    params, prods = _dw_network([np.nan, 0.5, 0.5, 0.5], np.full((3, 3, 4, 1), 0.1))
    assert refine.refine_network(params, prods) == {}


# -- links ----------------------------------------------------------------------------

def _k2(name, cls, inputs, **cfg):
    nodes = [[[src, 0, 0, {}] for src in inputs]] if inputs else []
    return {"class_name": cls, "name": name, "config": {"name": name, **cfg},
            "inbound_nodes": nodes}


def _keras_model(up_beta, dw_kernel, dw_beta):
    layers = [
        _k2("in", "InputLayer", []),
        _k2("expand", "Conv2D", ["in"], use_bias=False),
        _k2("expand_bn", "BatchNormalization", ["expand"], epsilon=1e-3),
        _k2("expand_relu", "ReLU", ["expand_bn"], max_value=6.0),
        _k2("pad", "ZeroPadding2D", ["expand_relu"]),
        _k2("dw", "DepthwiseConv2D", ["pad"], use_bias=False),
        _k2("dw_bn", "BatchNormalization", ["dw"], epsilon=1e-3),
        _k2("dw_relu", "ReLU", ["dw_bn"], max_value=6.0),
    ]
    config = {"class_name": "Functional", "config": {"layers": layers}}
    n = len(up_beta)
    arrays = {"expand/kernel": np.ones((1, 1, 3, n)),
              "expand_bn/gamma": np.ones(n), "expand_bn/beta": up_beta,
              "expand_bn/moving_mean": np.zeros(n), "expand_bn/moving_variance": np.ones(n),
              "dw/depthwise_kernel": dw_kernel,
              "dw_bn/gamma": np.ones(n), "dw_bn/beta": np.full(n, dw_beta),
              "dw_bn/moving_mean": np.zeros(n), "dw_bn/moving_variance": np.ones(n)}
    return DictReader(arrays, "keras", config)


def test_keras_links_follow_the_config_through_padding():
    reader = _keras_model(np.array([-10.0, 0.5, 0.5]), np.full((3, 3, 3, 1), 0.2), -0.2)
    links = find_links(reader, discover(reader))
    assert links["dw_bn"].kernel == "dw/depthwise_kernel"
    assert links["dw_bn"].layout == "keras_dw" and links["dw_bn"].groups == 3
    assert links["dw_bn"].feed == Feed("relu6", None, (Feed("bn", "expand_bn"),))
    assert links["expand_bn"].feed is None  # the image: nothing to model


def test_scan_reports_refined_dead_and_keeps_the_schema():
    reader = _keras_model(np.array([-10.0, 0.5, 0.5]), np.full((3, 3, 3, 1), 0.2), -0.2)
    report = _analyse(reader, ScanOptions(bn_only=True), None)
    dw = next(layer for layer in report.bn_layers if layer.name == "dw_bn")
    assert dw.dead == [0] and dw.min_p_active == 0.0
    plain = _analyse(reader, ScanOptions(thresholds=Thresholds(refine=False), bn_only=True),
                     None)
    dw_plain = next(layer for layer in plain.bn_layers if layer.name == "dw_bn")
    assert dw_plain.dead == [] and dw_plain.min_p_active > 0.4
    assert sorted(vars(dw)) == sorted(vars(dw_plain))


def test_kernel_size_cap_keeps_the_plain_estimate():
    reader = _keras_model(np.array([-10.0, 0.5, 0.5]), np.full((3, 3, 3, 1), 0.2), -0.2)
    assert "dw_bn" in refine_layers(reader, discover(reader))
    assert refine_layers(reader, discover(reader), kernel_max=10) == {}


def _torch_reader(names_shapes, consumers):
    arrays = {n: np.ones(s) for n, s in names_shapes}
    reader = DictReader(arrays, "torch")
    layers = []
    for bn, cons in consumers.items():
        c = arrays[f"{bn}.running_mean"].shape[0]
        layers.append(BNLayer(bn, c, f"{bn}.running_mean", f"{bn}.running_var", f"{bn}.weight",
                              f"{bn}.bias", 1e-5, "default", cons, "test"))
    return reader, layers


def _bn(name, c):
    return [(f"{name}.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var")]


def test_torch_links_use_only_certain_names():
    names = [("conv1.weight", (8, 3, 3, 3)), *_bn("bn1", 8),
             ("layer1.0.conv1.weight", (8, 8, 3, 3)), *_bn("layer1.0.bn1", 8),
             ("layer1.0.conv2.weight", (8, 8, 3, 3)), *_bn("layer1.0.bn2", 8),
             ("layer1.0.downsample.0.weight", (8, 8, 1, 1)), *_bn("layer1.0.downsample.1", 8),
             ("blocks.1.expand.0.weight", (16, 8, 1, 1)), *_bn("blocks.1.expand.1", 16),
             ("blocks.1.dw.0.weight", (16, 1, 3, 3)), *_bn("blocks.1.dw.1", 16),
             ("blocks.2.dw.0.weight", (16, 1, 3, 3)), *_bn("blocks.2.dw.1", 16)]
    consumers = {"bn1": "relu", "layer1.0.bn1": "relu", "layer1.0.bn2": "add",
                 "layer1.0.downsample.1": "add", "blocks.1.expand.1": "relu6",
                 "blocks.1.dw.1": "relu6", "blocks.2.dw.1": "relu6"}
    reader, layers = _torch_reader(names, consumers)
    links = find_links(reader, layers)
    assert links["layer1.0.bn2"].feed == Feed("relu", None, (Feed("bn", "layer1.0.bn1"),))
    assert links["layer1.0.bn1"].feed is None          # block input: a residual sum
    assert links["layer1.0.downsample.1"].feed is None  # reads the block input, not bn2
    assert links["bn1"].feed is None
    dw = links["blocks.1.dw.1"]
    assert dw.kernel == "blocks.1.dw.0.weight" and dw.groups == 16
    assert dw.feed == Feed("relu6", None, (Feed("bn", "blocks.1.expand.1"),))
    assert links["blocks.2.dw.1"].feed is None          # first module of its block


def test_torch_upstream_with_unknown_activation_is_not_modelled():
    names = [("blocks.1.expand.0.weight", (16, 8, 1, 1)), *_bn("blocks.1.expand.1", 16),
             ("blocks.1.dw.0.weight", (16, 1, 3, 3)), *_bn("blocks.1.dw.1", 16)]
    reader, layers = _torch_reader(names, {"blocks.1.expand.1": "unknown",
                                           "blocks.1.dw.1": "unknown"})
    assert find_links(reader, layers)["blocks.1.dw.1"].feed is None


# -- real checkpoints ------------------------------------------------------------------

def _score(path, refine_on):
    with open(path + ".truth.json") as fh:
        truth = {t["name"]: t for t in json.load(fh)["layers"]}
    report = analyse_path(path, ScanOptions(thresholds=Thresholds(refine=refine_on),
                                            bn_only=True))
    tp = fp = fn = 0
    for layer in report.bn_layers:
        t = truth.get(layer.name)
        if t is None or t["consumer"] not in ("relu", "relu6"):
            continue
        dead = {i for i, f in enumerate(t["active_fraction"]) if f == 0}
        tp += len(dead & set(layer.dead))
        fp += len(set(layer.dead) - dead)
        fn += len(dead - set(layer.dead))
    return tp, fp, fn


def test_refinement_finds_more_truly_dead_channels_early_in_training():
    path = os.path.join(FIXTURES, "keras", "mnv2_s150.h5")
    if not os.path.exists(path + ".truth.json"):
        pytest.fail("committed fixture missing: " + path)
    tp0, _, fn0 = _score(path, False)
    tp1, fp1, fn1 = _score(path, True)
    assert tp0 + fn0 == tp1 + fn1 > 100
    assert tp1 / (tp1 + fn1) >= tp0 / (tp0 + fn0) + 0.05   # recall gain
    assert tp1 / (tp1 + fp1) >= 0.95                        # precision kept


# -- skewed tails and correlated taps ------------------------------------------------------

@pytest.mark.parametrize("skew", [0.8, -0.8, -2.5, 1e-5])
def test_shifted_gamma_tail_matches_sampling(skew):
    rng = np.random.default_rng(3)
    k = 4.0 / max(skew * skew, 1e-8)
    g = rng.gamma(min(k, 1e6), 1.0, 1_000_000)
    u = np.sign(skew) * (g - min(k, 1e6)) / np.sqrt(min(k, 1e6))
    for z in (-1.0, 0.5, 2.0):
        assert refine.pearson3_sf(np.array(z), np.array(skew)) == pytest.approx(
            (u > z).mean(), abs=3e-3)


def test_negative_skew_bounds_the_tail():
    # a shifted gamma with skewness -1 cannot exceed 2 / |skew| = 2 standard deviations
    assert refine.pearson3_sf(np.array(2.01), np.array(-1.0)) == 0.0
    assert refine.pearson3_sf(np.array(1.9), np.array(-1.0)) > 0.0


@pytest.mark.parametrize("rho", [0.0, 1.0, 0.5])
def test_correlated_tap_moments_match_a_one_factor_simulation(rho):
    rng = np.random.default_rng(4)
    w = rng.normal(size=(2, 1, 9))
    n = 400_000
    base = np.maximum(rng.normal(-0.3, 1.0, size=(n, 1)), 0)      # shared by all taps
    own = np.maximum(rng.normal(-0.3, 1.0, size=(n, 9)), 0)       # per tap
    a = np.sqrt(rho) * base + np.sqrt(1 - rho) * own             # one-factor taps
    x = a @ w[:, 0, :].T
    feed = refine.clip(refine.gaussian(np.array([-0.3]), np.array([1.0])), None)
    # the factor model scales one ReLU'd normal: match its cumulants per tap
    feed = refine.Dist(feed.mean * (np.sqrt(rho) + np.sqrt(1 - rho)), feed.var, feed.lo,
                       feed.hi, True, feed.k3)
    ci = refine.conv_input(refine.KernelStats.of(w), 1, feed, None)
    np.testing.assert_allclose(ci.var(rho), x.var(0), rtol=0.03)
    central3 = ((x - x.mean(0)) ** 3).mean(0)
    np.testing.assert_allclose(ci.k3(rho), central3, rtol=0.1, atol=0.02)
    assert ci.rho(x.var(0)) == pytest.approx([rho, rho], abs=0.05)


def test_dead_comes_from_the_bound_near_dead_may_come_from_the_model():
    plain = classify_channels(np.ones(3), np.full(3, -0.5), np.zeros(3), np.ones(3), 1e-3,
                              "relu")
    ref = refine.Refined(p_active=np.array([1e-6, 1e-6, 0.3]),
                         y_lo=np.array([-5.0, -5.0, -5.0]), y_hi=np.array([-0.1, 2.0, 2.0]),
                         x_mean=np.zeros(3), x_var=np.ones(3))
    res = refine.apply(plain, ref, "relu", Thresholds())
    assert res.dead == [0]            # only the bound proves death
    assert res.near_dead == [1]       # the tail model warns
    assert res.p_active[1] == pytest.approx(plain.p_active[1])


def test_torch_resnet_block_inputs_from_the_preset():
    names = [("conv1.weight", (8, 3, 3, 3)), *_bn("bn1", 8)]
    for blk, cin, cout, down in (("layer1.0", 8, 8, False), ("layer1.1", 8, 8, False),
                                 ("layer2.0", 8, 16, True), ("layer2.1", 16, 16, False)):
        names += [(f"{blk}.conv1.weight", (cout, cin, 3, 3)), *_bn(f"{blk}.bn1", cout),
                  (f"{blk}.conv2.weight", (cout, cout, 3, 3)), *_bn(f"{blk}.bn2", cout)]
        if down:
            names += [(f"{blk}.downsample.0.weight", (cout, cin, 1, 1)),
                      *_bn(f"{blk}.downsample.1", cout)]
    arrays = {n: np.ones(s) for n, s in names}
    reader = DictReader(arrays, "torch")
    layers = discover(reader)
    assert {layer.consumer_source for layer in layers} == {"preset:resnet_basic"}
    links = find_links(reader, layers)
    stem = Feed("maxpool", None, (Feed("relu", None, (Feed("bn", "bn1"),)),))
    out10 = Feed("relu", None, (Feed("add", None, (Feed("bn", "layer1.0.bn2"), stem)),))
    out11 = Feed("relu", None, (Feed("add", None, (Feed("bn", "layer1.1.bn2"), out10)),))
    out20 = Feed("relu", None, (Feed("add", None, (Feed("bn", "layer2.0.bn2"),
                                                   Feed("bn", "layer2.0.downsample.1"))),))
    assert links["layer1.0.bn1"].feed == stem
    assert links["layer1.1.bn1"].feed == out10
    assert links["layer2.0.bn1"].feed == out11
    assert links["layer2.0.downsample.1"].feed == out11
    assert links["layer2.1.bn1"].feed == out20
    assert links["layer2.1.bn1"].groups == 1
