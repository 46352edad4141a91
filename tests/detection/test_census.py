"""The census engine (detection/census.py), its Keras IR source and sample loading.

(a) every op against a straightforward numpy reference written with loops, in both
    layouts; (b) the committed real fixtures against stored reference activity measured
    by the real frameworks (tests/fixtures/gen_census_ref.py: Keras 3, tf_keras, torch).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest

from bnexporter.detection.census import NEAR_ZERO, forward, run_census
from bnexporter.detection.sample import load_sample
from bnexporter.errors import CheckpointError
from bnexporter.topology.graph import Graph, Node
from bnexporter.topology.keras_ir import _open_reader, keras_graph_ir, open_keras_ir
from tests.support.graphs import torch_small_graph

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures")
CENSUS = os.path.join(FIXTURES, "census")

RNG = np.random.default_rng(7)


# -- naive references (NCHW / OIHW, explicit loops) ----------------------------------------

def same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def naive_conv(x, w, b, stride, dilation, pads, groups, mode="constant"):
    """x (N, C, H, W), w (O, C/groups, kh, kw) torch semantics; pads (t, b, l, r)."""
    n = x.shape[0]
    o, cig, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), pads[:2], pads[2:]), mode=mode)
    ho = (xp.shape[2] - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    wo = (xp.shape[3] - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    y = np.zeros((n, o, ho, wo), np.float64)
    og = o // groups
    for oc in range(o):
        g = oc // og
        for i in range(ho):
            for j in range(wo):
                acc = np.zeros(n)
                for ci in range(cig):
                    for a in range(kh):
                        for bb in range(kw):
                            acc += xp[:, g * cig + ci, i * stride[0] + a * dilation[0],
                                      j * stride[1] + bb * dilation[1]] * w[oc, ci, a, bb]
                y[:, oc, i, j] = acc + (0 if b is None else b[oc])
    return y


def naive_pool(x, k, s, pads, kind, include_pad=False, ceil=False):
    """x (N, C, H, W); torch / Keras pooling by explicit windows."""
    n, c, h, w = x.shape
    outs = []
    for ax, size in ((0, h), (1, w)):
        span = size + pads[2 * ax] + pads[2 * ax + 1] - k[ax]
        out = (-(-span // s[ax]) if ceil else span // s[ax]) + 1
        if ceil and (out - 1) * s[ax] >= size + pads[2 * ax]:
            out -= 1
        outs.append(out)
    y = np.zeros((n, c, outs[0], outs[1]))
    for i in range(outs[0]):
        for j in range(outs[1]):
            h0, w0 = i * s[0] - pads[0], j * s[1] - pads[2]
            h1, w1 = h0 + k[0], w0 + k[1]
            hs, ws = max(h0, 0), max(w0, 0)
            he, we = min(h1, h), min(w1, w)
            win = x[:, :, hs:he, ws:we]
            if kind == "max":
                y[:, :, i, j] = win.max(axis=(2, 3))
            else:
                if include_pad:  # torch: the window clipped to the padded input
                    cnt = (min(h1, h + pads[1]) - h0) * (min(w1, w + pads[3]) - w0)
                else:
                    cnt = (he - hs) * (we - ws)
                y[:, :, i, j] = win.sum(axis=(2, 3)) / cnt
    return y


def to_nhwc(x):
    return np.moveaxis(x, 1, -1)


def to_nchw(x):
    return np.moveaxis(x, -1, 1)


def fetcher(tensors):
    return lambda name: tensors[name]


def bn_node(name, src, c, tensors, eps=1e-3, gamma=True, beta=True):
    tensors[f"{name}.mean"] = RNG.normal(0, 0.3, c).astype(np.float32)
    tensors[f"{name}.var"] = RNG.uniform(0.5, 2.0, c).astype(np.float32)
    params = {"mean": f"{name}.mean", "var": f"{name}.var"}
    if gamma:
        tensors[f"{name}.gamma"] = RNG.uniform(0.5, 1.5, c).astype(np.float32)
        params["gamma"] = f"{name}.gamma"
    if beta:
        tensors[f"{name}.beta"] = RNG.normal(0, 0.5, c).astype(np.float32)
        params["beta"] = f"{name}.beta"
    return Node(name, "bn", (src,), params, {"eps": eps})


def naive_bn(x_last, tensors, name, eps=1e-3):
    """Channels on the last axis."""
    g = tensors.get(f"{name}.gamma", 1.0)
    b = tensors.get(f"{name}.beta", 0.0)
    return (x_last - tensors[f"{name}.mean"]) / np.sqrt(
        tensors[f"{name}.var"].astype(np.float64) + eps) * g + b


# -- (a) ops against the references ----------------------------------------------------------

CONV_CASES = [
    # (C, O, k, stride, dilation, padding, groups, bias, kind)
    (3, 5, (3, 3), (1, 1), (1, 1), "same", 1, True, "keras"),
    (3, 4, (3, 3), (2, 2), (1, 1), "same", 1, False, "keras"),      # TF asymmetric pad
    (4, 6, (3, 2), (2, 1), (1, 1), "valid", 1, True, "keras"),
    (4, 4, (3, 3), (1, 1), (2, 2), "same", 1, True, "keras"),       # dilated
    (4, 6, (3, 3), (1, 1), (1, 1), "same", 2, True, "keras"),       # grouped
    (4, 4, (3, 3), (2, 2), (1, 1), "same", "dw", True, "keras"),    # depthwise m=1
    (3, 6, (3, 3), (1, 1), (2, 2), "same", "dw", False, "keras"),   # depthwise m=2 dilated
    (4, 8, (5, 5), (2, 2), (1, 1), "same", "dw", False, "keras"),   # even H/stride
    (4, 6, (1, 1), (1, 1), (1, 1), "valid", 1, True, "keras"),      # pointwise
    (3, 5, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 1, True, "torch"),
    (4, 8, (3, 3), (1, 1), (2, 2), (2, 2, 2, 2), 4, True, "torch"),  # depthwise m=2
    (6, 6, (3, 3), (1, 2), (1, 1), (1, 1, 0, 2), 3, False, "torch"),  # grouped, odd pads
    (4, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, False, "torch-reflect"),
    (4, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, False, "torch-replicate"),
    (4, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, True, "torch-circular"),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("hw", [(7, 7), (8, 6)])
def test_conv_matches_naive(case, hw):
    c, o, k, s, d, padding, groups, bias, kind = case
    n = 2
    x = RNG.normal(size=(n, c, *hw)).astype(np.float32)
    tensors = {}
    torch = kind.startswith("torch")
    depthwise = groups == "dw"
    g = c if depthwise else groups
    w_oihw = RNG.normal(size=(o, c // g, *k)).astype(np.float32)
    b = RNG.normal(size=o).astype(np.float32) if bias else None
    if torch:
        tensors["w"] = w_oihw
    elif depthwise:  # Keras (kh, kw, C, m), output channel c*m + j
        tensors["w"] = w_oihw.transpose(2, 3, 1, 0).reshape(*k, c, o // c)
    else:
        tensors["w"] = w_oihw.transpose(2, 3, 1, 0)
    params = {"kernel": "w"}
    if b is not None:
        tensors["b"] = b
        params["bias"] = "b"
    attrs = {"stride": s, "dilation": d, "padding": padding}
    if depthwise:
        attrs["depthwise"] = True
    else:
        attrs["groups"] = g
    if kind.startswith("torch-"):
        attrs["padding_mode"] = kind.split("-")[1]
    graph = Graph((Node("in", "input"), Node("conv", "conv", ("in",), params, attrs),
                   bn_node("bn", "conv", o, tensors)),
                  source="test", layout="nchw" if torch else "nhwc",
                  kernel_layout="oihw" if torch else "hwio")
    if padding == "same":
        pads = (*same_pads(hw[0], k[0], s[0], d[0]), *same_pads(hw[1], k[1], s[1], d[1]))
    elif padding == "valid":
        pads = (0, 0, 0, 0)
    else:
        pads = padding
    mode = {"torch-reflect": "reflect", "torch-replicate": "edge",
            "torch-circular": "wrap"}.get(kind, "constant")
    ref = naive_conv(x.astype(np.float64), w_oihw, b, s, d, pads, g, mode)
    xin = x if torch else to_nhwc(x)
    got = forward(graph, fetcher(tensors), xin, ["conv", "bn"])
    conv = got["conv"] if torch else to_nchw(got["conv"])
    np.testing.assert_allclose(conv, ref, rtol=1e-4, atol=1e-4)
    # the census counts what the BN output does
    y = naive_bn(to_nhwc(ref), tensors, "bn")
    res = run_census(graph, fetcher(tensors), xin, batch=1)
    act = res["bn"]
    assert act.positions == n * ref.shape[2] * ref.shape[3]
    flat = y.reshape(-1, o)
    ambiguous = (np.abs(flat) <= 1e-4).sum(axis=0)
    assert (np.abs(act.positive_count - (flat > 0).sum(axis=0)) <= ambiguous).all()
    np.testing.assert_allclose(act.minimum, flat.min(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(act.maximum, flat.max(axis=0), rtol=1e-4, atol=1e-4)


def test_conv1d_keras_causal_and_torch():
    x = RNG.normal(size=(2, 9, 3)).astype(np.float32)  # (N, W, C)
    w = RNG.normal(size=(3, 3, 4)).astype(np.float32)  # Keras (k, in, out)
    graph = Graph((Node("in", "input"),
                   Node("c", "conv", ("in",), {"kernel": "w"},
                        {"stride": (1, 2), "dilation": (1, 2), "padding": (0, 0, 4, 0),
                         "groups": 1, "rank": 1})), source="test")
    got = forward(graph, fetcher({"w": w}), x, ["c"])["c"]
    ref = naive_conv(to_nchw(x)[:, :, None].astype(np.float64),
                     w.transpose(2, 1, 0)[:, :, None], None, (1, 2), (1, 2), (0, 0, 4, 0), 1)
    np.testing.assert_allclose(got, to_nhwc(ref[:, :, 0]), rtol=1e-4, atol=1e-4)
    # torch Conv1d: (N, C, L) input, (O, I, K) kernel, symmetric int padding
    wt = RNG.normal(size=(4, 3, 3)).astype(np.float32)
    gt = Graph((Node("in", "input"),
                Node("c", "conv", ("in",), {"kernel": "w"},
                     {"stride": (2,), "dilation": (1,), "padding": (1,), "groups": 1})),
               source="test", layout="nchw", kernel_layout="oihw")
    xt = to_nchw(x)
    got = forward(gt, fetcher({"w": wt}), xt, ["c"])["c"]
    ref = naive_conv(xt[:, :, None].astype(np.float64), wt[:, :, None], None, (1, 2), (1, 1),
                     (0, 0, 1, 1), 1)
    np.testing.assert_allclose(got, ref[:, :, 0], rtol=1e-4, atol=1e-4)


POOL_CASES = [
    # (kind, k, s, padding, include_pad, ceil, layout)
    ("max", (2, 2), (2, 2), "valid", False, False, "nhwc"),
    ("max", (3, 3), (2, 2), "same", False, False, "nhwc"),
    ("avg", (3, 3), (2, 2), "same", False, False, "nhwc"),   # Keras: pads not counted
    ("avg", (2, 3), (1, 2), "valid", False, False, "nhwc"),
    ("avg", (3, 3), (2, 2), (1, 1, 1, 1), True, False, "nchw"),  # torch default
    ("avg", (3, 3), (2, 2), (1, 1, 1, 1), False, False, "nchw"),
    ("avg", (3, 3), (2, 2), (1, 1, 1, 1), True, True, "nchw"),   # ceil_mode overhang
    ("max", (3, 3), (2, 2), (1, 1, 1, 1), False, True, "nchw"),
    ("max", (2, 2), (2, 2), (0, 0, 0, 0), False, True, "nchw"),
]


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("hw", [(7, 7), (8, 6)])
def test_pool_matches_naive(case, hw):
    kind, k, s, padding, include_pad, ceil, layout = case
    x = RNG.normal(size=(2, 3, *hw)).astype(np.float32)
    attrs = {"pool": k, "stride": s, "padding": padding, "count_include_pad": include_pad,
             "ceil_mode": ceil}
    graph = Graph((Node("in", "input"), Node("p", f"{kind}pool", ("in",), attrs=attrs)),
                  source="test", layout=layout)
    if padding == "same":
        pads = (*same_pads(hw[0], k[0], s[0], 1), *same_pads(hw[1], k[1], s[1], 1))
    elif padding == "valid":
        pads = (0, 0, 0, 0)
    else:
        pads = padding
    ref = naive_pool(x.astype(np.float64), k, s, pads, kind, include_pad, ceil)
    nchw = layout == "nchw"
    got = forward(graph, fetcher({}), x if nchw else to_nhwc(x), ["p"])["p"]
    np.testing.assert_allclose(got if nchw else to_nchw(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_dense_flatten_concat_add_mul_pad_gap(layout):
    """A small graph through every structural op; torch flatten order checked in NCHW."""
    nchw = layout == "nchw"
    x = RNG.normal(size=(3, 4, 5, 6)).astype(np.float32)  # NCHW
    t = {}
    a = bn_node("bn_a", "in", 4, t)
    pad = Node("pad", "pad", ("bn_a",), attrs={"pads": ((1, 0), (0, 2))})
    crop = Node("crop", "pad", ("pad",), attrs={"pads": ((-1, 0), (0, -2))})
    add = Node("add", "add", ("crop", "in", "bn_a"))
    mul = Node("mul", "mul", ("add", "bn_a"))
    cat = Node("cat", "concat", ("mul", "add"), attrs={"axis": 1 if nchw else -1})
    relu = Node("relu", "relu", ("cat",))
    flat = Node("flat", "flatten", ("relu",))
    w = RNG.normal(size=(8 * 5 * 6, 7)).astype(np.float32)  # (in, out), in = NCHW / NHWC order
    t["w"] = w.T.copy() if nchw else w
    t["b"] = RNG.normal(size=7).astype(np.float32)
    dense = Node("fc", "dense", ("flat",), {"kernel": "w", "bias": "b"})
    fbn = bn_node("fc_bn", "fc", 7, t)
    gap = Node("gap", "gap", ("relu",), attrs={"keepdims": False})
    gmp = Node("gmp", "gmp", ("relu",))
    rs = Node("rs", "reshape", ("relu",), attrs={"shape": (8, 30) if nchw else (30, 8)})
    graph = Graph((Node("in", "input"), a, pad, crop, add, mul, cat, relu, flat, dense, fbn,
                   gap, gmp, rs), source="test", layout=layout,
                  kernel_layout="oihw" if nchw else "hwio")
    xin = x if nchw else to_nhwc(x)
    got = forward(graph, fetcher(t), xin, ["cat", "fc", "fc_bn", "gap", "gmp", "rs"])
    # reference in NCHW
    bn_a = to_nchw(naive_bn(to_nhwc(x), t, "bn_a"))
    s = bn_a + x + bn_a
    m = s * bn_a
    c = np.concatenate([m, s], axis=1)
    r = np.maximum(c, 0)
    if nchw:
        fc = r.reshape(3, -1) @ w + t["b"]
        rs_ref = r.reshape(3, 8, 30)
    else:
        fc = to_nhwc(r).reshape(3, -1) @ w + t["b"]
        rs_ref = to_nhwc(r).reshape(3, 30, 8)
    np.testing.assert_allclose(got["cat"], c if nchw else to_nhwc(c), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["fc"], fc, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["fc_bn"], naive_bn(fc, t, "fc_bn"), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["gap"], r.mean(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["gmp"], r.max(axis=(2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["rs"], rs_ref, rtol=1e-5, atol=1e-5)
    res = run_census(graph, fetcher(t), xin, batch=2)
    assert set(res.layers) == {"bn_a", "fc_bn"} and not res.skipped
    assert res["fc_bn"].positions == 3 and res["bn_a"].positions == 3 * 5 * 6
    ref_pos = (naive_bn(fc, t, "fc_bn") > 0).sum(axis=0)
    np.testing.assert_array_equal(res["fc_bn"].positive_count, ref_pos)


def test_activations_match_formulas():
    x = np.linspace(-8, 8, 161, dtype=np.float32).reshape(1, -1)
    sig = 1 / (1 + np.exp(-x.astype(np.float64)))
    erf = np.vectorize(math.erf)
    cases = {
        "relu": (Node("y", "relu", ("in",)), np.maximum(x, 0)),
        "relu6": (Node("y", "relu6", ("in",)), np.clip(x, 0, 6)),
        "silu": (Node("y", "silu", ("in",)), x * sig),
        "sigmoid": (Node("y", "sigmoid", ("in",)), sig),
        "tanh": (Node("y", "tanh", ("in",)), np.tanh(x)),
        "hardswish": (Node("y", "hardswish", ("in",)), x * np.clip(x + 3, 0, 6) / 6),
        "gelu": (Node("y", "gelu", ("in",)), 0.5 * x * (1 + erf(x / np.sqrt(2)))),
        "leaky": (Node("y", "leaky_relu", ("in",), attrs={"alpha": 0.1}),
                  np.where(x >= 0, x, 0.1 * x)),
        "keras_relu": (Node("y", "activation", ("in",), attrs={
            "name": "relu", "max_value": 4.0, "negative_slope": 0.2, "threshold": 1.0}),
            np.where(x >= 4, 4, np.where(x >= 1, x, 0.2 * (x - 1)))),
        "elu": (Node("y", "activation", ("in",), attrs={"name": "elu", "alpha": 1.0}),
                np.where(x > 0, x, np.expm1(x))),
        "softplus": (Node("y", "activation", ("in",), attrs={"name": "softplus"}),
                     np.log1p(np.exp(x.astype(np.float64)))),
        "softmax": (Node("y", "softmax", ("in",), attrs={"axis": -1}),
                    np.exp(x) / np.exp(x.astype(np.float64)).sum()),
    }
    for label, (node, ref) in cases.items():
        graph = Graph((Node("in", "input"), node), source="test")
        got = forward(graph, fetcher({}), x, ["y"])["y"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=label)


def test_bn_defaults_and_saturation():
    """No gamma / beta (scale=False, center=False); ReLU6 consumers get saturation."""
    t = {}
    x = (RNG.normal(size=(4, 6, 6, 3)) * 8).astype(np.float32)
    b1 = bn_node("b1", "in", 3, t, gamma=False)
    b2 = bn_node("b2", "in", 3, t, beta=False, eps=1e-5)
    graph = Graph((Node("in", "input"), b1, b2, Node("r6", "relu6", ("b1",)),
                   Node("d", "identity", ("b2",)), Node("r", "relu", ("d",))), source="test")
    res = run_census(graph, fetcher(t), x)
    y1 = naive_bn(x, t, "b1").reshape(-1, 3)
    y2 = naive_bn(x, t, "b2", 1e-5).reshape(-1, 3)
    np.testing.assert_array_equal(res["b1"].positive_count, (y1 > 0).sum(axis=0))
    np.testing.assert_array_equal(res["b2"].positive_count, (y2 > 0).sum(axis=0))
    np.testing.assert_allclose(res["b1"].saturated, (y1 >= 6).mean(axis=0))
    assert res["b2"].saturated is None
    assert res["b1"].active.dtype == np.float64


# -- failures stay local ---------------------------------------------------------------------

def _two_branch(t):
    """in -> conv -> bn_ok ; in -> other:Lambda -> conv2 -> bn_bad."""
    t["w"] = RNG.normal(size=(3, 3, 3, 4)).astype(np.float32)
    t["w2"] = RNG.normal(size=(1, 1, 3, 4)).astype(np.float32)
    nodes = (Node("in", "input"),
             Node("conv", "conv", ("in",), {"kernel": "w"}, {"padding": "same"}),
             bn_node("bn_ok", "conv", 4, t),
             Node("lam", "other", ("in",), attrs={"name": "Lambda"}),
             Node("conv2", "conv", ("lam",), {"kernel": "w2"}, {"padding": "same"}),
             bn_node("bn_bad", "conv2", 4, t),
             Node("sum", "add", ("bn_ok", "bn_bad")),
             bn_node("bn_after", "sum", 4, t))
    return Graph(nodes, source="test")


def test_unsupported_op_skips_its_dependents_only():
    t = {}
    graph = _two_branch(t)
    res = run_census(graph, fetcher(t), RNG.normal(size=(5, 8, 8, 3)).astype(np.float32))
    assert set(res.layers) == {"bn_ok"}
    assert res.skipped["lam"] == "unsupported op 'other:Lambda'"
    assert res.skipped["bn_bad"] == "depends on skipped node lam"
    assert res.skipped["bn_after"] == "depends on skipped node lam"
    assert res.inputs == 5


def test_missing_tensor_and_bad_shape_are_skips():
    t = {"w": RNG.normal(size=(3, 3, 5, 4)).astype(np.float32)}  # expects 5 channels
    graph = Graph((Node("in", "input"),
                   Node("conv", "conv", ("in",), {"kernel": "w"}, {"padding": "same"}),
                   bn_node("bn1", "conv", 4, t),
                   Node("conv_b", "conv", ("in",), {"kernel": "nope"}, {"padding": "same"}),
                   bn_node("bn2", "conv_b", 4, t),
                   bn_node("bn3", "in", 3, t)), source="test")
    res = run_census(graph, fetcher(t), RNG.normal(size=(2, 6, 6, 3)).astype(np.float32))
    assert set(res.layers) == {"bn3"}
    assert "does not fit input with 3 channels" in res.skipped["conv"]
    assert res.skipped["bn1"] == "depends on skipped node conv"
    assert "cannot read tensor 'nope'" in res.skipped["conv_b"]


def test_deadline_and_batch_invariance():
    t = {}
    graph = _two_branch(t)
    x = RNG.normal(size=(23, 8, 8, 3)).astype(np.float32)
    res = run_census(graph, fetcher(t), x, deadline=time.monotonic() - 1)
    assert res.timed_out and not res.layers and res.skipped["bn_ok"] == "time budget"
    a = run_census(graph, fetcher(t), x, batch=1)
    b = run_census(graph, fetcher(t), x, batch=16)
    np.testing.assert_array_equal(a["bn_ok"].positive_count, b["bn_ok"].positive_count)
    assert a["bn_ok"].positions == b["bn_ok"].positions == 23 * 64


def test_sample_shape_is_checked():
    t = {}
    graph = Graph(_two_branch(t).nodes, source="test", input_shape=(8, 8, 3))
    with pytest.raises(ValueError, match="does not match the model input"):
        run_census(graph, fetcher(t), np.zeros((2, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        run_census(graph, fetcher(t), np.full((2, 8, 8, 3), np.nan, np.float32))


def test_activations_are_freed(monkeypatch):
    """Reference counting: a long chain keeps O(1) activations alive, not O(depth)."""
    import bnexporter.detection.census as census

    t = {}
    nodes = [Node("in", "input")]
    prev = "in"
    for i in range(12):
        nodes.append(bn_node(f"bn{i}", prev, 3, t))
        nodes.append(Node(f"r{i}", "relu", (f"bn{i}",)))
        prev = f"r{i}"
    graph = Graph(tuple(nodes), source="test")
    peak = []
    orig = census._Stats.add

    def spy(self, y):
        import gc

        live = sum(1 for o in gc.get_objects() if isinstance(o, np.ndarray)
                   and o.shape == (4, 5, 5, 3))
        peak.append(live)
        orig(self, y)

    monkeypatch.setattr(census._Stats, "add", spy)
    run_census(graph, fetcher(t), RNG.normal(size=(4, 5, 5, 3)).astype(np.float32))
    assert max(peak) <= 4


# -- Keras config -> IR ----------------------------------------------------------------------

def _layer(cls, name, inbound, **cfg):
    return {"class_name": cls, "name": name, "config": {"name": name, **cfg},
            "inbound_nodes": [[[src, 0, 0, {}] for src in inbound]] if inbound else []}


def test_keras_ir_translates_layers():
    layers = [
        _layer("InputLayer", "img", [], batch_input_shape=[None, 12, 12, 3]),
        _layer("ZeroPadding2D", "zp", ["img"], padding=[[0, 1], [0, 1]]),
        _layer("SeparableConv2D", "sep", ["zp"], kernel_size=[3, 3], strides=[2, 2],
               padding="valid", depth_multiplier=2, activation="relu", use_bias=True),
        _layer("BatchNormalization", "bn", ["sep"], axis=[3], epsilon=1e-3, scale=False),
        _layer("Activation", "act", ["bn"], activation="swish"),
        _layer("Conv2D", "c2", ["act"], filters=4, kernel_size=[1, 1], padding="same",
               use_bias=False, activation="linear", groups=1),
        _layer("Concatenate", "cat", ["c2", "act"], axis=-1),
        _layer("MaxPooling2D", "mp", ["cat"], pool_size=[2, 2], strides=None, padding="same"),
        _layer("Dropout", "drop", ["mp"], rate=0.5),
        _layer("Lambda", "lam", ["drop"]),
        _layer("Flatten", "flat", ["drop"]),
        _layer("Dense", "fc", ["flat"], units=3, activation="softmax", use_bias=True),
    ]
    cfg = {"class_name": "Functional", "config": {"name": "m", "layers": layers,
                                                  "output_layers": [["fc", 0, 0]]}}
    table = {"sep": {"depthwise_kernel": "sep/dk", "pointwise_kernel": "sep/pk",
                     "bias": "sep/b"},
             "bn": {"beta": "bn.beta", "mean": "bn.mean", "var": "bn.var"},
             "c2": {"kernel": "c2/k"}, "fc": {"kernel": "fc/k", "bias": "fc/b"}}
    g = keras_graph_ir(cfg, table)
    by = g.by_name()
    assert g.input_shape == (12, 12, 3)
    assert by["zp"].op == "pad" and by["zp"].attrs["pads"] == ((0, 1), (0, 1))
    assert by["sep/depthwise"].attrs["depthwise"] and by["sep/depthwise"].inputs == ("zp",)
    assert by["sep/preact"].params == {"kernel": "sep/pk", "bias": "sep/b"}
    assert by["sep"].op == "relu" and by["sep"].inputs == ("sep/preact",)
    assert by["bn"].op == "bn" and "gamma" not in by["bn"].params
    assert by["act"].op == "silu" and by["cat"].op == "concat"
    assert by["mp"].attrs["stride"] == (2, 2) and by["drop"].op == "identity"
    assert by["lam"].op == "other" and by["lam"].attrs["name"] == "Lambda"
    assert by["fc"].op == "softmax" and by["fc/preact"].op == "dense"
    names = [n.name for n in g.nodes]
    assert names.index("sep/depthwise") < names.index("sep/preact") < names.index("sep")
    # the census runs it end to end: numbers from a naive computation
    t = {"sep/dk": RNG.normal(size=(3, 3, 3, 2)).astype(np.float32),
         "sep/pk": RNG.normal(size=(1, 1, 6, 5)).astype(np.float32),
         "sep/b": RNG.normal(size=5).astype(np.float32),
         "bn.beta": RNG.normal(size=5).astype(np.float32),
         "bn.mean": RNG.normal(size=5).astype(np.float32),
         "bn.var": RNG.uniform(0.5, 2, 5).astype(np.float32),
         "c2/k": RNG.normal(size=(1, 1, 5, 4)).astype(np.float32)}
    x = RNG.normal(size=(2, 12, 12, 3)).astype(np.float32)
    res = run_census(g, fetcher(t), x)
    assert not res.skipped  # the Lambda feeds no BN: not even run
    xp = np.pad(to_nchw(x), ((0, 0), (0, 0), (0, 1), (0, 1))).astype(np.float64)
    dw = naive_conv(xp, t["sep/dk"].reshape(3, 3, 1, 6).transpose(3, 2, 0, 1), None,
                    (2, 2), (1, 1), (0, 0, 0, 0), 3)
    pw = naive_conv(dw, t["sep/pk"].transpose(3, 2, 0, 1), t["sep/b"], (1, 1), (1, 1),
                    (0, 0, 0, 0), 1)
    y = naive_bn(to_nhwc(np.maximum(pw, 0)), t, "bn").reshape(-1, 5)
    ambiguous = (np.abs(y) <= 1e-4).sum(axis=0)
    assert (np.abs(res["bn"].positive_count - (y > 0).sum(axis=0)) <= ambiguous).all()


def test_keras_ir_sequential_without_input_layer():
    cfg = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Conv2D", "config": {"name": "c", "filters": 2, "kernel_size": [3, 3],
                                            "batch_input_shape": [None, 5, 5, 1],
                                            "padding": "valid", "use_bias": False}},
        {"class_name": "BatchNormalization", "config": {"name": "b", "epsilon": 0.01}},
        {"class_name": "ReLU", "config": {"name": "r", "max_value": 6.0}},
    ]}}
    g = keras_graph_ir(cfg)
    assert [n.op for n in g.nodes] == ["input", "conv", "bn", "relu6"]
    assert g.input_shape == (5, 5, 1) and g.nodes[1].inputs == (g.nodes[0].name,)
    assert g.nodes[2].attrs["eps"] == 0.01
    res = run_census(g, fetcher({}), np.zeros((1, 5, 5, 1), np.float32))
    assert res.skipped["c"] == "no checkpoint tensor for 'kernel'"


# -- sample files ----------------------------------------------------------------------------

def test_load_sample_formats_and_validation(tmp_path):
    x = RNG.normal(size=(3, 8, 8, 3)).astype(np.float16)
    np.save(tmp_path / "a.npy", x)
    got = load_sample(tmp_path / "a.npy", expect_shape=(8, 8, 3))
    assert got.dtype == np.float32 and got.shape == (3, 8, 8, 3)
    # NCHW given to an NHWC model: transposed; and the reverse
    np.save(tmp_path / "b.npy", to_nchw(x))
    np.testing.assert_array_equal(load_sample(tmp_path / "b.npy", expect_shape=(8, 8, 3)),
                                  x.astype(np.float32))
    np.testing.assert_array_equal(load_sample(tmp_path / "a.npy", expect_shape=(3, 8, 8)),
                                  to_nchw(x).astype(np.float32))
    # one input without a batch axis; uint8 kept as is
    np.save(tmp_path / "one.npy", np.full((8, 8, 3), 200, np.uint8))
    one = load_sample(tmp_path / "one.npy", expect_shape=(8, 8, 3))
    assert one.shape == (1, 8, 8, 3) and one.max() == 200.0
    np.savez(tmp_path / "c.npz", labels=np.zeros(3), inputs=x)
    assert load_sample(tmp_path / "c.npz").shape == (3, 8, 8, 3)
    np.savez(tmp_path / "d.npz", x)
    assert load_sample(tmp_path / "d.npz", expect_shape=(None, None, 3)).shape == (3, 8, 8, 3)

    def fails(name, match, **kw):
        with pytest.raises(CheckpointError, match=match) as err:
            load_sample(tmp_path / name, **kw)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)

    fails("a.npy", r"does not match the model input \(N, 16, 16, 3\)", expect_shape=(16, 16, 3))
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]], np.float32))
    fails("nan.npy", "1 NaN or Inf")
    np.save(tmp_path / "big.npy", np.array([[1e300]], np.float64))
    fails("big.npy", "NaN or Inf")  # overflows float32
    np.save(tmp_path / "int.npy", np.zeros((2, 3), np.int64))
    fails("int.npy", "dtype int64 is not supported")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    fails("obj.npy", "pickle")
    fails("a.npy", "exceeds", max_bytes=100)
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), np.float32))
    fails("empty.npy", r"N = 0")
    np.save(tmp_path / "flat.npy", np.zeros(3, np.float32))
    fails("flat.npy", "batch axis")
    (tmp_path / "junk.npy").write_bytes(b"hello world")
    fails("junk.npy", "neither a .npy nor a .npz")
    fails("missing.npy", "cannot open sample")
    cube = RNG.normal(size=(2, 4, 4, 4, 4)).astype(np.float32)  # both readings fit: refused
    np.save(tmp_path / "cube.npy", cube)
    fails("cube.npy", "does not match", expect_shape=(4, 4, 4, 5))


# -- (b) real fixtures against the frameworks --------------------------------------------------

KERAS_REFS = ["k3_small.keras", "k2_resnet_s400.h5", "k2_nested.h5", "k3_nested.keras",
              "mnv2_s150.h5", "mnv2_s450_inj.keras"]


def _compare(ref, res):
    """Per channel, counts may differ only by outputs within 1e-4 of 0 (a summation-order
    sign flip): |engine - framework| <= near-zero count of either side. Returns the max
    absolute activity difference."""
    worst = 0.0
    assert set(res.layers) == {layer["name"] for layer in ref["layers"]}
    for layer in ref["layers"]:
        got = res[layer["name"]]
        assert got.positions == layer["positions"], layer["name"]
        want = np.asarray(layer["positive_count"])
        slack = np.maximum(np.asarray(layer["near_zero_count"]), got.near_zero_count)
        diff = np.abs(got.positive_count - want)
        assert (diff <= slack).all(), (layer["name"], np.flatnonzero(diff > slack))
        worst = max(worst, float((diff / layer["positions"]).max()))
        if got.saturated is not None:
            sat = np.asarray(layer["saturated_count"]) / layer["positions"]
            np.testing.assert_allclose(got.saturated, sat, atol=2 / layer["positions"])
    return worst


def _inputs(ref):
    return np.load(os.path.join(CENSUS, ref["inputs"])).astype(np.float32)


@pytest.mark.parametrize("fixture", KERAS_REFS)
def test_keras_fixture_matches_framework(fixture):
    with open(os.path.join(CENSUS, f"{fixture}.ref.json")) as fh:
        ref = json.load(fh)
    graph, reader = open_keras_ir(os.path.join(FIXTURES, "keras", fixture))
    try:
        res = run_census(graph, reader.read_array, _inputs(ref), batch=3)
        # the mean output too: the engine computes the same numbers, not just signs
        got_mean = {n: _bn_means(graph, reader, _inputs(ref), n)
                    for n in [layer["name"] for layer in ref["layers"]][:4]}
    finally:
        reader.close()
    assert not res.skipped and res.inputs == len(_inputs(ref))
    worst = _compare(ref, res)
    assert worst <= 2e-3, worst
    for layer in ref["layers"][:4]:
        np.testing.assert_allclose(got_mean[layer["name"]], layer["mean"], rtol=2e-3, atol=2e-4)


def _bn_means(graph, reader, x, name):
    y = forward(graph, reader.read_array, x, [name])[name]
    if graph.layout == "nchw" and y.ndim > 2:
        y = to_nhwc(y)
    return y.reshape(-1, y.shape[-1]).mean(axis=0)


def test_torch_fixture_matches_framework():
    with open(os.path.join(CENSUS, "torch_small.pt.ref.json")) as fh:
        ref = json.load(fh)
    reader = _open_reader(os.path.join(CENSUS, "torch_small.pt"))
    try:
        sample = load_sample(os.path.join(CENSUS, ref["inputs"]), expect_shape=(3, 16, 16))
        res = run_census(torch_small_graph(), reader.read_array, sample, batch=5)
        means = {layer["name"]: _bn_means(torch_small_graph(), reader, sample, layer["name"])
                 for layer in ref["layers"]}
    finally:
        reader.close()
    assert not res.skipped
    assert _compare(ref, res) <= 2e-3
    for layer in ref["layers"]:
        np.testing.assert_allclose(means[layer["name"]], layer["mean"], rtol=2e-3, atol=2e-4)
    dead = [n for n, a in res.layers.items() if (a.active == 0).any()]
    assert dead  # beta = -3 channels: the fixture does exercise dead channels


def test_near_zero_constant_is_the_reference_one():
    assert NEAR_ZERO == 1e-4
