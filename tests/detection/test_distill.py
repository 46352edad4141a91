"""Input distillation (detection/distill.py): gradients, determinism, evidence.

(a) the hand-written reverse pass against central finite differences on small random
    graphs covering every op it differentiates, in both layouts; (b) against framework
    autodiff (torch, Keras 3, tf_keras) through small committed references made by
    tests/fixtures/gen_distill_ref.py; (c) the optimiser: seeded and reproducible byte
    for byte, warm start, deadline; (d) evidence labels.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from bnexporter.detection.census import run_census
from bnexporter.detection.distill import (
    EVIDENCE_DISTILLED,
    EVIDENCE_ESTIMATE,
    EVIDENCE_SAMPLE,
    Program,
    channel_evidence,
    distill,
    distilled_census,
    layer_evidence,
)
from bnexporter.topology.graph import Graph, Node
from bnexporter.topology.keras_ir import _open_reader, open_keras_ir
from tests.support.graphs import torch_small_graph

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures")
DISTILL = os.path.join(FIXTURES, "distill")
CENSUS = os.path.join(FIXTURES, "census")
KERAS = os.path.join(FIXTURES, "keras")


def fetcher(tensors):
    return lambda name: tensors[name]


def rng_bn(name, src, c, t, rng, eps=1e-3, gamma=True, beta=True):
    params = {"mean": f"{name}/mean", "var": f"{name}/var"}
    t[f"{name}/mean"] = rng.normal(0, 0.5, c).astype(np.float32)
    t[f"{name}/var"] = rng.uniform(0.2, 2.0, c).astype(np.float32)
    if gamma:
        params["gamma"] = f"{name}/gamma"
        t[f"{name}/gamma"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    if beta:
        params["beta"] = f"{name}/beta"
        t[f"{name}/beta"] = rng.normal(0, 0.5, c).astype(np.float32)
    return Node(name, "bn", (src,), params, {"eps": eps})


def rng_conv(name, src, kshape, t, rng, bias=False, **attrs):
    t[f"{name}/kernel"] = (rng.normal(0, 1, kshape) / np.sqrt(np.prod(kshape[:-1]))).astype(
        np.float32)
    params = {"kernel": f"{name}/kernel"}
    if bias:
        params["bias"] = f"{name}/bias"
        t[f"{name}/bias"] = rng.normal(0, 0.1, kshape[-1]).astype(np.float32)
    return Node(name, "conv", (src,), params, attrs)


def nhwc_graph(seed=0):
    """Every op once, Keras layout: strided / depthwise (multiplier 2) / grouped / dilated
    conv with explicit and "same" pads, BN after conv, dense and pools, all activations,
    add (with broadcast), mul, concat, max / avg / global pools, pad with crop, reshape."""
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {}
    nodes = [
        Node("x", "input"),
        rng_conv("c1", "x", (3, 3, 3, 8), t, rng, True, stride=(1, 1), padding="same"),
        rng_bn("b1", "c1", 8, t, rng),
        Node("a1", "relu", ("b1",)),
        rng_conv("dw", "a1", (3, 3, 8, 2), t, rng, False, stride=(2, 2), padding="same",
                 depthwise=True),
        rng_bn("b2", "dw", 16, t, rng, gamma=False),
        Node("a2", "relu6", ("b2",)),
        rng_conv("gc", "a2", (3, 2, 4, 8), t, rng, True, stride=(1, 1), padding=(1, 1, 0, 1),
                 groups=4, dilation=(1, 2)),
        rng_bn("b3", "gc", 8, t, rng, beta=False),
        Node("a3", "silu", ("b3",)),
        Node("a3b", "hardswish", ("b3",)),
        Node("cat", "concat", ("a3", "a3b"), attrs={"axis": -1}),
        Node("mp", "maxpool", ("cat",), attrs={"pool": (2, 2), "stride": (2, 2),
                                               "padding": "same"}),
        Node("ap", "avgpool", ("cat",), attrs={"pool": (3, 3), "stride": (2, 2),
                                               "padding": "same"}),
        Node("s", "add", ("mp", "ap")),
        rng_bn("b4", "s", 16, t, rng),
        Node("a4", "tanh", ("b4",)),
        Node("a4b", "sigmoid", ("b4",)),
        Node("m", "mul", ("a4", "a4b")),
        Node("p", "pad", ("m",), attrs={"pads": ((1, 0), (-1, 2))}),
        rng_conv("c2", "p", (2, 2, 16, 12), t, rng, False, stride=(1, 2), padding="valid"),
        rng_bn("b5", "c2", 12, t, rng),
        Node("a5", "leaky_relu", ("b5",), attrs={"alpha": 0.1}),
        Node("a5b", "gelu", ("a5",), attrs={"approximate": "tanh"}),
        Node("a5c", "activation", ("a5b",), attrs={"name": "elu"}),
        Node("id", "identity", ("a5c",)),
        Node("gp", "gmp", ("id",), attrs={"keepdims": True}),
        Node("bc", "add", ("id", "gp")),          # broadcast (N,1,1,C) + (N,H,W,C)
        rng_bn("b6", "bc", 12, t, rng),
        Node("a6", "activation", ("b6",), attrs={"name": "relu", "max_value": 2.0,
                                                  "negative_slope": 0.1}),
        Node("g", "gap", ("a6",)),
        Node("fl", "flatten", ("a6",)),
        Node("d1", "dense", ("fl",), {"kernel": "d1/kernel", "bias": "d1/bias"}),
        rng_bn("b7", "d1", 6, t, rng),
        Node("sm", "softmax", ("b7",)),
        Node("rs", "reshape", ("sm",), attrs={"shape": (2, 3)}),
        Node("fl2", "flatten", ("rs",)),
        Node("cat2", "concat", ("fl2", "g"), attrs={"axis": -1}),
        rng_bn("b8", "cat2", 18, t, rng),
    ]
    t["d1/kernel"] = (rng.normal(0, 1, (12 * 2 * 1, 6)) / 4).astype(np.float32)
    t["d1/bias"] = rng.normal(0, 0.1, 6).astype(np.float32)
    return Graph(tuple(nodes), source="test", input_shape=(8, 8, 3)), t


def nchw_graph(seed=1):
    """Torch layout: OIHW kernels, reflect / replicate padding, dilated grouped conv,
    ceil-mode pools with count_include_pad, concat on axis 1, flatten -> Linear -> BN1d."""
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {}

    def conv(name, src, oihw, bias, **attrs):
        t[f"{name}.weight"] = (rng.normal(0, 1, oihw) / np.sqrt(np.prod(oihw[1:]))).astype(
            np.float32)
        params = {"kernel": f"{name}.weight"}
        if bias:
            params["bias"] = f"{name}.bias"
            t[f"{name}.bias"] = rng.normal(0, 0.1, oihw[0]).astype(np.float32)
        return Node(name, "conv", (src,), params, attrs)

    nodes = [
        Node("x", "input"),
        conv("stem", "x", (8, 3, 3, 3), False, stride=(2, 2), padding=(1, 1), groups=1,
             padding_mode="reflect"),
        rng_bn("stem_bn", "stem", 8, t, rng, eps=1e-5),
        Node("r0", "relu", ("stem_bn",)),
        conv("dw", "r0", (16, 1, 3, 3), True, stride=(1, 1), padding=(2, 2), dilation=(2, 2),
             groups=8, padding_mode="replicate"),
        rng_bn("dw_bn", "dw", 16, t, rng, eps=1e-5),
        Node("d", "relu6", ("dw_bn",)),
        conv("gconv", "d", (16, 4, 3, 3), False, stride=(1, 1), padding=(1, 1), groups=4,
             padding_mode="circular"),
        rng_bn("g_bn", "gconv", 16, t, rng),
        Node("s", "add", ("g_bn", "d")),
        Node("g", "relu", ("s",)),
        Node("mp", "maxpool", ("g",), attrs={"pool": (3, 3), "stride": (2, 2),
                                             "padding": (1, 1), "ceil_mode": True}),
        Node("ap", "avgpool", ("g",), attrs={"pool": (3, 3), "stride": (2, 2),
                                             "padding": (1, 1), "ceil_mode": True,
                                             "count_include_pad": True}),
        Node("c", "concat", ("mp", "ap"), attrs={"axis": 1}),
        conv("pw", "c", (8, 32, 1, 1), True, stride=(1, 1), padding=(0, 0), groups=1),
        rng_bn("pw_bn", "pw", 8, t, rng, eps=1e-5),
        Node("p", "hardswish", ("pw_bn",)),
        Node("flat", "flatten", ("p",)),
        Node("fc", "dense", ("flat",), {"kernel": "fc.weight", "bias": "fc.bias"}),
        rng_bn("fc_bn", "fc", 10, t, rng, eps=1e-5),
    ]
    t["fc.weight"] = (rng.normal(0, 1, (10, 8 * 4 * 4)) / 11).astype(np.float32)
    t["fc.bias"] = rng.normal(0, 0.1, 10).astype(np.float32)
    return Graph(tuple(nodes), source="test", layout="nchw", kernel_layout="oihw",
                 input_shape=(3, 14, 14)), t


def directional_check(prog, x, rng, directions=4, h=1e-2):
    """max |<grad, v> - central difference along v| / |grad| over unit directions v:
    the gradient's own direction, then random ones."""
    _, g, _ = prog.loss_and_grad(x)
    assert not prog.skipped, prog.skipped
    norm = float(np.linalg.norm(g))
    assert norm > 0
    worst = 0.0
    for k in range(directions):
        v = g.copy() if k == 0 else rng.standard_normal(x.shape).astype(np.float32)
        v /= np.linalg.norm(v)
        lp, _, _ = prog.loss_and_grad(x + h * v, grad=False)
        lm, _, _ = prog.loss_and_grad(x - h * v, grad=False)
        fd = (lp - lm) / (2 * h)
        an = float(np.sum(g.astype(np.float64) * v))
        worst = max(worst, abs(fd - an) / norm)
    return worst


@pytest.mark.parametrize("make", [nhwc_graph, nchw_graph])
@pytest.mark.parametrize("normalize,bn_mode,smooth", [
    ("channel", "eval", 0.0), ("zeroq", "eval", 0.0), ("channel", "train", 0.0),
    ("channel", "train", 0.5)])
def test_gradient_matches_finite_differences(make, normalize, bn_mode, smooth):
    graph, t = make()
    prog = Program(graph, fetcher(t), normalize=normalize, bn_mode=bn_mode, smooth=smooth)
    assert not prog.skipped, prog.skipped
    assert len(prog.bns) == sum(n.op == "bn" for n in graph.nodes)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, *graph.input_shape)).astype(np.float32)
    # max-pool winners and ReLU kinks switch inside a wide step: the torch graph (two
    # overlapping max pools) needs a small one, and so does training mode, whose batch
    # statistics amplify a switch; float32 noise bounds it from below
    h = 1e-2 if graph.layout == "nhwc" and bn_mode == "eval" else 1e-3
    assert directional_check(prog, x, rng, h=h) < 2.5e-3
    # each BN's own term alone: no other layer's gradient can hide an error
    for b in prog.bns:
        alone = Program(graph, fetcher(t), normalize=normalize, layers=[b], bn_mode=bn_mode,
                        smooth=smooth)
        assert directional_check(alone, x, rng, directions=2, h=h) < 2.5e-3, b


@pytest.mark.parametrize("op", ["conv_s2", "depthwise", "grouped", "maxpool", "avgpool",
                                "pad", "dense", "concat", "add", "relu", "relu6", "bn_train"])
def test_gradient_per_op(op):
    """Each op alone between two BNs, so a wrong derivative cannot hide behind others."""
    rng = np.random.default_rng(11)
    t: dict[str, np.ndarray] = {}
    nodes = [Node("x", "input"), rng_bn("b0", "x", 4, t, rng)]
    src, c = "b0", 4
    if op == "conv_s2":
        nodes.append(rng_conv("o", src, (3, 3, 4, 6), t, rng, True, stride=(2, 2),
                              padding="same"))
        c = 6
    elif op == "depthwise":
        nodes.append(rng_conv("o", src, (3, 3, 4, 1), t, rng, False, stride=(2, 1),
                              padding="same", depthwise=True))
    elif op == "grouped":
        nodes.append(rng_conv("o", src, (1, 3, 2, 6), t, rng, False, stride=(1, 2),
                              padding="valid", groups=2))
        c = 6
    elif op in ("maxpool", "avgpool"):
        nodes.append(Node("o", op, (src,), attrs={"pool": (3, 3), "stride": (2, 2),
                                                  "padding": "same"}))
    elif op == "pad":
        nodes.append(Node("o", "pad", (src,), attrs={"pads": (2, 1, 0, 3), "mode": "reflect"}))
    elif op == "dense":
        t["w"] = rng.normal(0, 0.5, (4, 5)).astype(np.float32)
        nodes.append(Node("o", "dense", (src,), {"kernel": "w"}))
        c = 5
    elif op == "concat":
        nodes.append(Node("o", "concat", (src, "x"), attrs={"axis": -1}))
        c = 8
    elif op == "add":
        nodes.append(Node("o", "add", (src, "x", src)))
    elif op == "bn_train":  # b0 in training mode, then a ReLU so its output matters
        nodes.append(Node("o", "relu", (src,)))
    else:
        nodes.append(Node("o", op, (src,)))
    nodes.append(rng_bn("b1", "o", c, t, rng))
    graph = Graph(tuple(nodes), source="test", input_shape=(7, 9, 4))
    prog = Program(graph, fetcher(t), bn_mode="train" if op == "bn_train" else "eval")
    assert not prog.skipped
    x = (rng.standard_normal((3, 7, 9, 4)) * 2).astype(np.float32)
    assert directional_check(prog, x, rng, directions=4) < 1e-3


def test_forward_is_the_census_forward():
    """The BN outputs of the distillation pass are the census engine's, bit for bit."""
    graph, t = nhwc_graph()
    x = np.random.default_rng(5).standard_normal((3, 8, 8, 3)).astype(np.float32)
    res = run_census(graph, fetcher(t), x, batch=3)
    dc = distilled_census(graph, fetcher(t), init=x, iters=0, batch=3)
    for name, act in res.layers.items():
        np.testing.assert_array_equal(act.positive_count, dc.census[name].positive_count)
        np.testing.assert_array_equal(act.minimum, dc.census[name].minimum)


# -- framework autodiff references ------------------------------------------------------

def _ref(name):
    path = os.path.join(DISTILL, f"{name}.npz")
    assert os.path.exists(path), f"missing reference {path} (tests/fixtures/gen_distill_ref.py)"
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("tail", ["", ".train"])
@pytest.mark.parametrize("fixture", ["k3_small.keras", "k2_resnet_s400.h5"])
def test_keras_gradient_matches_framework_autodiff(fixture, tail):
    ref = _ref(fixture + tail)
    graph, reader = open_keras_ir(os.path.join(KERAS, fixture))
    try:
        prog = Program(graph, reader.read_array, normalize=str(ref["normalize"]),
                       bn_mode=str(ref["bn_mode"]))
        loss, g, _ = prog.loss_and_grad(ref["x"])
    finally:
        reader.close()
    assert not prog.skipped
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-5)
    cos = float(np.sum(g * ref["grad"]) / (np.linalg.norm(g) * np.linalg.norm(ref["grad"])))
    assert cos > 0.99999
    np.testing.assert_allclose(g, ref["grad"], rtol=0, atol=1e-5 * np.abs(ref["grad"]).max())


@pytest.mark.parametrize("tail", ["", ".train"])
def test_torch_gradient_matches_framework_autodiff(tail):
    ref = _ref("torch_small.pt" + tail)
    reader = _open_reader(os.path.join(CENSUS, "torch_small.pt"))
    try:
        prog = Program(torch_small_graph(), reader.read_array,
                       normalize=str(ref["normalize"]), bn_mode=str(ref["bn_mode"]))
        loss, g, _ = prog.loss_and_grad(ref["x"])
    finally:
        reader.close()
    assert not prog.skipped
    assert loss == pytest.approx(float(ref["loss"]), rel=1e-5)
    cos = float(np.sum(g * ref["grad"]) / (np.linalg.norm(g) * np.linalg.norm(ref["grad"])))
    assert cos > 0.99999
    np.testing.assert_allclose(g, ref["grad"], rtol=0, atol=1e-5 * np.abs(ref["grad"]).max())


# -- the optimiser ------------------------------------------------------------------------

def test_same_seed_same_bytes_and_loss_falls():
    graph, t = nhwc_graph()
    a = distill(graph, fetcher(t), n=6, iters=25, lr=0.1, seed=4)
    b = distill(graph, fetcher(t), n=6, iters=25, lr=0.1, seed=4)
    c = distill(graph, fetcher(t), n=6, iters=25, lr=0.1, seed=5)
    assert a.inputs.tobytes() == b.inputs.tobytes()
    assert a.losses == b.losses
    assert a.inputs.tobytes() != c.inputs.tobytes()
    assert a.inputs.shape == (6, 8, 8, 3) and a.inputs.dtype == np.float32
    assert a.iterations == 25 and len(a.losses) == 26
    assert a.loss < 0.9 * a.losses[0]
    assert set(a.mismatch) == {n.name for n in graph.nodes if n.op == "bn"}


def test_warm_start_continues_and_deadline_stops():
    graph, t = nhwc_graph()
    cold = distill(graph, fetcher(t), n=6, iters=40, seed=0)
    warm = distill(graph, fetcher(t), init=cold.inputs, iters=5)
    assert warm.warm and warm.iterations == 5
    assert warm.losses[0] == pytest.approx(cold.loss, rel=1e-6)
    assert warm.loss <= cold.loss * 1.05
    fresh = distill(graph, fetcher(t), n=6, iters=5, seed=0)
    assert warm.loss < fresh.loss
    past = distill(graph, fetcher(t), n=6, iters=50, deadline=time.monotonic() - 1)
    assert past.timed_out and past.iterations == 0
    with pytest.raises(ValueError):
        distill(graph, fetcher(t), init=cold.inputs, input_shape=(4, 4, 3))


def test_reduced_resolution_and_unknown_shape():
    graph, t = nhwc_graph()
    small = distilled_census(graph, fetcher(t), n=4, iters=3, input_shape=(6, 6, 3))
    assert small.distilled.inputs.shape == (4, 6, 6, 3)
    assert small.census.inputs == 4
    g2 = Graph(graph.nodes, source="test")
    with pytest.raises(ValueError, match="input shape is unknown"):
        distill(g2, fetcher(t), iters=1)


def test_unsupported_node_leaves_other_bns_in_the_loss():
    graph, t = nhwc_graph()
    nodes = list(graph.nodes)
    i = next(k for k, n in enumerate(nodes) if n.name == "a4")
    nodes[i] = Node("a4", "other", ("b4",), attrs={"name": "Weird"})
    g = Graph(tuple(nodes), source="test", input_shape=(8, 8, 3))
    prog = Program(g, fetcher(t))
    assert "a4" in prog.skipped and "b5" in prog.skipped
    assert {"b1", "b2", "b3", "b4"} <= set(prog.bns)
    d = distill(g, fetcher(t), n=4, iters=3)
    assert set(d.mismatch) == set(prog.bns)


def test_evidence_labels():
    graph, t = nhwc_graph()
    bns = [n.name for n in graph.nodes if n.op == "bn"]
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
    sample = run_census(graph, fetcher(t), x)
    dc = distilled_census(graph, fetcher(t), n=4, iters=2)
    assert dc.evidence == EVIDENCE_DISTILLED
    ev = layer_evidence([*bns, "nope"], sample=None, distilled=dc.census)
    assert ev["b1"] == EVIDENCE_DISTILLED and ev["nope"] == EVIDENCE_ESTIMATE
    ev = layer_evidence(bns, sample=sample, distilled=dc.census)
    assert set(ev.values()) == {EVIDENCE_SAMPLE}
    # a channel never positive on the distilled inputs only is labelled so
    t2 = dict(t)
    t2["b1/beta"] = t["b1/beta"].copy()
    t2["b1/beta"][0] = -50.0
    d_only = distilled_census(graph, fetcher(t2), n=4, iters=2)
    s_alive = run_census(graph, fetcher(t), x)
    ch = channel_evidence(["b1"], distilled=d_only.census)
    assert ch["b1"].evidence == EVIDENCE_DISTILLED and ch["b1"].dead[0] == EVIDENCE_DISTILLED
    assert 0 in ch["b1"].distilled_only
    both = channel_evidence(["b1"], sample=s_alive, distilled=d_only.census)
    assert both["b1"].evidence == EVIDENCE_SAMPLE and 0 not in both["b1"].dead
    assert 0 in both["b1"].distilled_only


def test_fixture_dead_sets_match_truth_small():
    """A short distillation already finds the dead ReLU channels of the small ResNet."""
    path = os.path.join(KERAS, "k2_nested.h5")
    with open(path + ".truth.json") as fh:
        truth = json.load(fh)
    graph, reader = open_keras_ir(path)
    try:
        dc = distilled_census(graph, reader.read_array, n=16, iters=60, seed=0)
    finally:
        reader.close()
    for layer in truth["layers"]:
        if layer["consumer"] not in ("relu", "relu6"):
            continue
        dead = np.array(layer["active_fraction"]) == 0
        got = dc.census[layer["name"]].positive_count == 0
        np.testing.assert_array_equal(got, dead, err_msg=layer["name"])


def test_clip_keeps_inputs_in_range():
    graph, t = nhwc_graph()
    d = distill(graph, fetcher(t), n=4, iters=5, lr=0.5, clip=(-1.0, 1.0))
    assert d.inputs.min() >= -1.0 and d.inputs.max() <= 1.0


@pytest.mark.parametrize("make", [nhwc_graph, nchw_graph])
def test_smoothness_prior_is_the_mean_squared_neighbour_difference(make):
    """The prior alone (no BN in the loss) against its closed form, on the spatial axes of
    the graph's layout only (never across channels or images)."""
    graph, t = make()
    x = np.random.default_rng(2).standard_normal((2, *graph.input_shape)).astype(np.float32)
    with_prior = Program(graph, fetcher(t), layers=[], smooth=0.3)
    loss, _, _ = with_prior.loss_and_grad(x)
    spatial = (1, 2) if graph.layout == "nhwc" else (2, 3)
    x64 = x.astype(np.float64)
    want = 0.3 * np.mean([np.mean(np.diff(x64, axis=a) ** 2) for a in spatial]) / x64.var()
    assert loss == pytest.approx(want, rel=1e-5)
    # an offset or a scale leaves it as it is: 0..255 pixels are judged as -1..1 ones
    for other in (x + np.float32(1.5), x * np.float32(255)):
        assert with_prior.loss_and_grad(other, grad=False)[0] == pytest.approx(want, rel=1e-4)
    assert directional_check(with_prior, x, np.random.default_rng(4), directions=3,
                             h=1e-2) < 1e-4


def test_smoothness_prior_gives_smoother_inputs():
    graph, t = nhwc_graph()
    rough = distill(graph, fetcher(t), n=4, iters=60, seed=3, bn_mode="train")
    smooth = distill(graph, fetcher(t), n=4, iters=60, seed=3, bn_mode="train", smooth=1.0)

    def tv(x):
        return float(np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=2) ** 2)) \
            / float(x.var())

    assert tv(smooth.inputs) < 0.5 * tv(rough.inputs)
