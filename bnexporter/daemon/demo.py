"""``bnexporter demo``: a synthetic training run whose channels die, exported live.

The checkpoints are Keras 2 style ``.h5`` files (what ``model.save("x.h5")``
writes: a ``model_config`` with the layer graph plus ``model_weights/``), made
with h5py alone so the demo needs nothing but the package.

The demo run (``Trainer``, ``write_story_checkpoint``) is a MobileNetV2 (width 0.35,
52 BN layers with Keras' own layer names) whose channels die the ways real runs do,
over 150 checkpoints (step 200 to 30,000; 7.5 minutes at the default 3 s):

- slow drift: depthwise channels of blocks 1-6 and of the head ``Conv_1_bn`` slide
  through near-dead to dead over thousands of steps; a few come back;
- a learning-rate spike at step 9,000 kills a share of the expand channels of blocks
  7-12 within a few hundred steps (a vertical front in the heatmap);
- collapsed gamma: weight decay shrinks gammas in the expand layers of blocks 13-16
  from step 12,000 (dead where beta < 0, constant where beta > 0) and in some
  projection BNs that feed a residual ``Add`` (tied, never dead);
- dead input: at step 15,000 three filters of ``block_3_expand`` become zero, so
  their BN channels see no input.

The toy model (``model_config``, ``weights``, ``write_checkpoint``,
``checkpoint_bytes``: a few Conv-BN-ReLU blocks and one BN feeding an ``Add``) is
what the tests use to make real files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from typing import Any

import numpy as np

# (conv, bn, activation, in channels, out channels, share of channels that die)
BLOCKS = (
    ("conv1", "bn1", "relu1", 3, 16, 0.15),
    ("conv2", "bn2", "relu2", 16, 32, 0.40),
    ("conv3", "bn3", "relu3", 32, 32, 0.55),
    ("conv4", "bn4", None, 32, 32, 0.50),  # bn4 feeds an Add: its "dying" is not ReLU death
)
DEATH_STEPS = (600, 4000)   # a dying channel is dead from a step drawn from this range ...
WINDOW = 1000               # ... after fading (through near-dead) for this many steps
STEP = 100                  # steps between demo checkpoints
KEEP = 5                    # checkpoints kept on disk, like a CheckpointManager
NUM_CLASSES = 10


def _layer(cls: str, name: str, inputs: list[str], **config: Any) -> dict[str, Any]:
    return {"class_name": cls, "name": name, "config": {"name": name, **config},
            "inbound_nodes": [[[src, 0, 0, {}] for src in inputs]] if inputs else []}


def model_config() -> dict[str, Any]:
    """A Keras 2 functional model config: conv-bn-relu x3, conv-bn -> add -> relu."""
    layers = [_layer("InputLayer", "input_1", [], batch_input_shape=[None, 32, 32, 3])]
    prev = "input_1"
    for conv, bn, act, _, cout, _ in BLOCKS:
        layers.append(_layer("Conv2D", conv, [prev], filters=cout, kernel_size=[3, 3],
                             padding="same", use_bias=False, activation="linear"))
        layers.append(_layer("BatchNormalization", bn, [conv], axis=-1, epsilon=1e-3,
                             momentum=0.99, center=True, scale=True))
        if act:
            layers.append(_layer("ReLU", act, [bn]))
            prev = act
    layers.append(_layer("Add", "add", ["bn4", "relu3"]))
    layers.append(_layer("ReLU", "relu4", ["add"]))
    layers.append(_layer("GlobalAveragePooling2D", "gap", ["relu4"]))
    layers.append(_layer("Dense", "dense", ["gap"], units=NUM_CLASSES, activation="softmax"))
    return {"class_name": "Functional", "config": {
        "name": "demo_net", "layers": layers, "input_layers": [["input_1", 0, 0]],
        "output_layers": [["dense", 0, 0]]}}


def _fade(step: int, death: np.ndarray) -> np.ndarray:
    """0 = healthy, 1 = dead, per channel at ``step``."""
    return np.clip((step - (death - WINDOW)) / WINDOW, 0.0, 1.0)


def weights(step: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """layer -> weight name -> array, for the checkpoint at ``step``."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, np.ndarray]] = {}
    for conv, bn, _, cin, cout, share in BLOCKS:
        kernel = rng.normal(0, (2.0 / (9 * cin)) ** 0.5, (3, 3, cin, cout))
        kernel = np.copysign(np.maximum(np.abs(kernel), 1e-3), kernel)  # no "tiny" weights
        dying = rng.random(cout) < share
        death = np.where(dying, rng.uniform(*DEATH_STEPS, cout), np.inf)
        q = _fade(step, death)
        gamma = rng.uniform(0.8, 1.2, cout) * (1 - 0.9 * q)
        # beta / gamma (the BN output's z-score at 0) slides from ~0.1 to -6
        z = rng.uniform(0.0, 0.2, cout) * (1 - q) - 6.0 * q
        beta = z * gamma
        mean = rng.normal(0, 0.1, cout)
        var = rng.uniform(0.5, 1.5, cout)
        out[conv] = {"kernel:0": kernel}
        out[bn] = {"gamma:0": gamma, "beta:0": beta, "moving_mean:0": mean,
                   "moving_variance:0": var}
    out["dense"] = {"kernel:0": rng.normal(0, 0.2, (32, NUM_CLASSES)),
                    "bias:0": np.zeros(NUM_CLASSES)}
    return {layer: {k: np.asarray(v, np.float32) for k, v in ws.items()}
            for layer, ws in out.items()}


def _write(target: Any, step: int, seed: int) -> None:
    _write_model(target, model_config(), weights(step, seed))


def write_checkpoint(path: str, step: int, seed: int = 0) -> None:
    """Write the step's checkpoint in place, as Keras ``ModelCheckpoint`` does."""
    _write(path, step, seed)


def checkpoint_bytes(step: int, seed: int = 0) -> bytes:
    """The same file as bytes (for tests that write slowly, truncate or rename)."""
    buf = io.BytesIO()
    _write(buf, step, seed)
    return buf.getvalue()


# -- the story: a MobileNetV2 whose channels die the ways real runs do -------------------
STORY_STEP = 200             # steps between checkpoints of the story
STORY_END = 30_000           # the story's last interesting step
SPIKE = 9_000                # the learning-rate spike
# (expansion t, output channels c, repeats n, first stride s): MobileNetV2's table
_MNV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
         (6, 160, 3, 2), (6, 320, 1, 1))
ALPHA = 0.35


def _divisible(v: float, d: int = 8) -> int:
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def _story_layers() -> list[dict[str, Any]]:
    """(kind, name, in, out, extra) per weighted layer plus the graph, in model order."""
    out: list[dict[str, Any]] = []
    first = _divisible(32 * ALPHA)
    out.append({"kind": "conv", "name": "Conv1", "bn": "bn_Conv1", "act": "Conv1_relu",
                "cin": 3, "cout": first, "k": 3})
    cin, block = first, 0
    for t, c, n, stride in _MNV2:
        cout = _divisible(c * ALPHA)
        for i in range(n):
            prefix = "expanded_conv_" if block == 0 else f"block_{block}_"
            width = cin * t
            out.append({"kind": "block", "prefix": prefix, "block": block, "cin": cin,
                        "width": width, "cout": cout, "expand": t != 1,
                        "stride": stride if i == 0 else 1,
                        "residual": cin == cout and (stride if i == 0 else 1) == 1})
            cin, block = cout, block + 1
    out.append({"kind": "conv", "name": "Conv_1", "bn": "Conv_1_bn", "act": "out_relu",
                "cin": cin, "cout": 1280, "k": 1})
    return out


def story_config() -> dict[str, Any]:
    """The Keras 2 functional config of the demo's MobileNetV2 (Keras' layer names)."""
    layers = [_layer("InputLayer", "input_1", [], batch_input_shape=[None, 96, 96, 3])]
    prev = "input_1"

    def conv(name: str, src: str, filters: int, k: int, stride: int = 1) -> str:
        layers.append(_layer("Conv2D", name, [src], filters=filters, kernel_size=[k, k],
                             strides=[stride, stride], padding="same", use_bias=False,
                             activation="linear"))
        return name

    def bn(name: str, src: str) -> str:
        layers.append(_layer("BatchNormalization", name, [src], axis=-1, epsilon=1e-3,
                             momentum=0.999, center=True, scale=True))
        return name

    def relu6(name: str, src: str) -> str:
        layers.append(_layer("ReLU", name, [src], max_value=6.0, negative_slope=0.0,
                             threshold=0.0))
        return name

    for spec in _story_layers():
        if spec["kind"] == "conv":
            stride = 2 if spec["name"] == "Conv1" else 1
            prev = relu6(spec["act"], bn(spec["bn"], conv(spec["name"], prev, spec["cout"],
                                                           spec["k"], stride)))
            continue
        p, src = spec["prefix"], prev
        x = prev
        if spec["expand"]:
            x = relu6(p + "expand_relu", bn(p + "expand_BN", conv(p + "expand", x,
                                                                    spec["width"], 1)))
        if spec["stride"] == 2:
            layers.append(_layer("ZeroPadding2D", p + "pad", [x], padding=[[0, 1], [0, 1]]))
            x = p + "pad"
        layers.append(_layer("DepthwiseConv2D", p + "depthwise", [x], kernel_size=[3, 3],
                             strides=[spec["stride"]] * 2, depth_multiplier=1,
                             padding="same" if spec["stride"] == 1 else "valid",
                             use_bias=False, activation="linear"))
        x = relu6(p + "depthwise_relu", bn(p + "depthwise_BN", p + "depthwise"))
        x = bn(p + "project_BN", conv(p + "project", x, spec["cout"], 1))
        if spec["residual"]:
            layers.append(_layer("Add", p + "add", [src, x]))
            x = p + "add"
        prev = x
    layers.append(_layer("GlobalAveragePooling2D", "global_average_pooling2d", [prev]))
    layers.append(_layer("Dense", "predictions", ["global_average_pooling2d"],
                         units=NUM_CLASSES, activation="softmax"))
    return {"class_name": "Functional", "config": {
        "name": "mobilenetv2_0.35_96", "layers": layers, "input_layers": [["input_1", 0, 0]],
        "output_layers": [["predictions", 0, 0]]}}


def _ramp(step: int, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    return np.clip((step - start) / np.maximum(length, 1.0), 0.0, 1.0)


def _bn_story(rng: np.random.Generator, name: str, block: int, n: int,
              step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gamma, z = beta / (gamma * std) (the BN output's z-score at 0) at ``step``, and
    the channels whose producing filter is zero."""
    gamma = rng.uniform(0.7, 1.3, n)
    z = rng.uniform(0.3, 1.2, n)          # healthy channels fire most of the time
    zero_filters = np.zeros(n, bool)
    u, a, b, c = rng.random(n), rng.random(n), rng.random(n), rng.random(n)
    drift = np.zeros(n)
    if ("depthwise" in name and 1 <= block <= 6) or name == "Conv_1_bn":
        head = name == "Conv_1_bn"
        dying = u < (0.45 if head else 0.15 + 0.03 * block)
        early = 12_000 if head else 2_000
        start = early + a * (22_000 - early)
        drift = np.where(dying, _ramp(step, start, 3_000 + 5_000 * b), 0.0)
        back = dying & (c < 0.15)  # the learning-rate drop at 21,000 revives a few
        if step > 21_000:
            drift = np.where(back, drift * (1 - _ramp(step, np.full(n, 21_000.0),
                                                      np.full(n, 2_500.0))), drift)
    if "expand" in name and 7 <= block <= 12:
        dying = u < 0.40 + 0.05 * (block - 7)
        drift = np.maximum(drift, np.where(dying, _ramp(step, SPIKE - 300 + 600 * a,
                                                        150 + 450 * b), 0.0))
    z = z * (1 - drift) - 7.0 * drift
    if ("expand" in name and block >= 13) or ("project" in name and 2 <= block <= 5):
        collapsing = u < (0.20 + 0.05 * (block - 13) if block >= 13 else 0.12)
        decay = _ramp(step, 12_000 + 12_000 * a, 4_000 + 6_000 * b)
        gamma = np.where(collapsing, gamma * np.power(1e-7, decay), gamma)
        # beta stays put while gamma vanishes: most went negative (dead), some not (constant)
        beta = np.where(c < 0.7, -0.5, 0.5)
        z = np.where(collapsing & (decay > 0.6), beta / np.maximum(gamma, 1e-12), z)
    if name == "block_3_expand_BN" and step >= 15_000:
        zero_filters[:3] = True
        gamma = np.where(zero_filters, 0.8, gamma)
    return gamma, z, zero_filters


_GRID = np.linspace(-3.5, 3.5, 57)
_GRID_W = np.exp(-0.5 * _GRID ** 2)
_GRID_W /= _GRID_W.sum()


def _relu6_moments(beta: np.ndarray, s: np.ndarray, relu: bool) -> tuple[np.ndarray,
                                                                         np.ndarray]:
    """Mean and variance of relu6(N(beta, s^2)) (or of N(beta, s^2) when not ``relu``)."""
    if not relu:
        return beta, s ** 2
    y = np.clip(beta[:, None] + s[:, None] * _GRID[None, :], 0.0, 6.0)
    m = y @ _GRID_W
    return m, np.maximum((y - m[:, None]) ** 2 @ _GRID_W, 0.0)


def story_weights(step: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """layer -> weight name -> array for the demo MobileNetV2 at ``step``.

    Running statistics are what the kernels make of the upstream activations (moments
    propagated layer by layer, channels independent), so the refined estimate, which
    reads the producer kernels, agrees with the story."""
    out: dict[str, dict[str, np.ndarray]] = {}
    index = 0

    def unit(conv: str, bn: str, block: int, shape: tuple[int, ...], x: tuple[np.ndarray,
             np.ndarray], relu: bool, depthwise: bool = False) -> tuple[np.ndarray,
                                                                        np.ndarray]:
        nonlocal index
        index += 1
        rng = np.random.default_rng([seed, index])
        fan_in = shape[0] * shape[1] * (1 if depthwise else shape[2])
        k = rng.normal(0, (2.0 / fan_in) ** 0.5, shape)
        k = np.copysign(np.maximum(np.abs(k), 1e-3), k)
        n = shape[2] if depthwise else shape[3]
        gamma, z, zero = _bn_story(rng, bn, block, n, step)
        if zero.any():
            k[..., zero] = 0.0
        m_in, v_in = x
        w1, w2 = k.sum(axis=(0, 1)), (k ** 2).sum(axis=(0, 1))
        if depthwise:
            mean, var = m_in * w1[:, 0], v_in * w2[:, 0]
        else:
            mean, var = m_in @ w1, v_in @ w2
        var = np.where(zero, 1e-12, var + 1e-4 * (~zero))
        mean = np.where(zero, 0.0, mean)
        std = np.sqrt(var / (var + 1e-3))
        s = np.abs(gamma) * std
        beta = z * s
        beta = np.where(zero, np.where(np.arange(n) < 2, -0.3, 0.4), beta)
        out[conv] = {("depthwise_kernel:0" if depthwise else "kernel:0"): k}
        out[bn] = {"gamma:0": gamma, "beta:0": beta, "moving_mean:0": mean,
                   "moving_variance:0": var}
        return _relu6_moments(beta, s, relu)

    x = (np.full(3, 0.0), np.full(3, 1.0))  # normalised images
    for spec in _story_layers():
        if spec["kind"] == "conv":
            k = spec["k"]
            x = unit(spec["name"], spec["bn"], 99 if spec["name"] == "Conv_1" else 0,
                     (k, k, spec["cin"], spec["cout"]), x, relu=True)
            continue
        p, blk, w = spec["prefix"], spec["block"], spec["width"]
        skip = x
        if spec["expand"]:
            x = unit(p + "expand", p + "expand_BN", blk, (1, 1, spec["cin"], w), x, True)
        x = unit(p + "depthwise", p + "depthwise_BN", blk, (3, 3, w, 1), x, True, True)
        x = unit(p + "project", p + "project_BN", blk, (1, 1, w, spec["cout"]), x, False)
        if spec["residual"]:
            x = (x[0] + skip[0], x[1] + skip[1])
    rng = np.random.default_rng([seed, 0])
    out["predictions"] = {"kernel:0": rng.normal(0, 0.05, (1280, NUM_CLASSES)),
                          "bias:0": np.zeros(NUM_CLASSES)}
    return {layer: {k: np.asarray(v, np.float32) for k, v in ws.items()}
            for layer, ws in out.items()}


def _write_model(target: Any, config: dict[str, Any],
                 ws: dict[str, dict[str, np.ndarray]]) -> None:
    import h5py  # here: `bnexporter scan` of other formats never loads it

    names = [entry["name"] for entry in config["config"]["layers"]]
    with h5py.File(target, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode("utf-8")
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [n.encode("utf-8") for n in names]
        g.attrs["backend"] = "tensorflow"
        g.attrs["keras_version"] = "2.15.0"
        for name in names:
            lg = g.create_group(name)
            layer_ws = ws.get(name, {})
            lg.attrs["weight_names"] = ([f"{name}/{w}".encode() for w in layer_ws]
                                        if layer_ws else np.asarray([]))
            for w, arr in layer_ws.items():
                lg.create_dataset(f"{name}/{w}", data=arr)


def write_story_checkpoint(path: str, step: int, seed: int = 0) -> None:
    """The demo MobileNetV2's checkpoint at ``step``, written in place."""
    _write_model(path, story_config(), story_weights(step, seed))


class Trainer:
    """Writes ``ckpt-<step>.h5`` every ``interval`` seconds, keeping the last few.

    ``story=True`` (the demo) writes the dying MobileNetV2; False the toy model."""

    def __init__(self, folder: str, interval: float, seed: int = 0, story: bool = True):
        self.folder, self.interval, self.seed, self.story = folder, interval, seed, story
        self.stop = threading.Event()
        self.step = 0
        self._thread = threading.Thread(target=self._loop, name="demo-trainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop and wait for the write in progress: a thread left inside h5py while the
        interpreter shuts down (or while its folder is removed) can crash the process."""
        self.stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        written: list[str] = []
        while True:
            self.step += STORY_STEP if self.story else STEP
            path = os.path.join(self.folder, f"ckpt-{self.step}.h5")
            tmp = os.path.join(self.folder, f".ckpt-{self.step}.h5.tmp")
            (write_story_checkpoint if self.story else write_checkpoint)(tmp, self.step,
                                                                          self.seed)
            os.replace(tmp, path)
            written.append(path)
            while len(written) > KEEP:
                with contextlib.suppress(OSError):
                    os.unlink(written.pop(0))
            if self.stop.wait(self.interval):
                return
