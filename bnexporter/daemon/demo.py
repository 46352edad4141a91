"""``bnexporter demo``: a synthetic training run whose channels die, exported live.

The checkpoints are Keras 2 style ``.h5`` files (what ``model.save("x.h5")``
writes: a ``model_config`` with the layer graph plus ``model_weights/``), made
with h5py alone so the demo needs nothing but the package. The model is a few
Conv-BN-ReLU blocks and one BN feeding an ``Add``; over the steps some channels'
gammas shrink and betas go negative, so they pass through near-dead to dead.
Tests reuse ``write_checkpoint`` / ``checkpoint_bytes`` to make real files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from typing import Any

import h5py
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
    config = model_config()
    names = [entry["name"] for entry in config["config"]["layers"]]
    ws = weights(step, seed)
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


def write_checkpoint(path: str, step: int, seed: int = 0) -> None:
    """Write the step's checkpoint in place, as Keras ``ModelCheckpoint`` does."""
    _write(path, step, seed)


def checkpoint_bytes(step: int, seed: int = 0) -> bytes:
    """The same file as bytes (for tests that write slowly, truncate or rename)."""
    buf = io.BytesIO()
    _write(buf, step, seed)
    return buf.getvalue()


class Trainer:
    """Writes ``ckpt-<step>.h5`` every ``interval`` seconds, keeping the last few."""

    def __init__(self, folder: str, interval: float, seed: int = 0):
        self.folder, self.interval, self.seed = folder, interval, seed
        self.stop = threading.Event()
        self.step = 0
        self._thread = threading.Thread(target=self._loop, name="demo-trainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        written: list[str] = []
        while True:
            self.step += STEP
            path = os.path.join(self.folder, f"ckpt-{self.step}.h5")
            write_checkpoint(path, self.step, self.seed)
            written.append(path)
            while len(written) > KEEP:
                with contextlib.suppress(OSError):
                    os.unlink(written.pop(0))
            if self.stop.wait(self.interval):
                return
