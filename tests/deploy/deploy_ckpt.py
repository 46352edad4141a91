"""Write small Keras-2-style .h5 checkpoints whose BN channels die on demand.

The deployment tests need checkpoints with a known number of dead channels,
NaNs or collapsed layers, without TensorFlow. This writes the layout tf.keras
``model.save('x.h5')`` produces (root attrs, ``model_weights`` group, per-layer
``weight_names`` and ``<layer>/<layer>/<var>:0`` datasets) for a Functional
model ``input -> conv_i -> bn_i -> relu_i`` (repeated) ``-> pool -> dense``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

# y ~ N(beta, gamma^2) after BN: p_active = Phi(beta / |gamma|)
ALIVE = (1.0, 0.1)        # Phi(0.1)  ~ 0.54
NEAR_DEAD = (1.0, -2.0)   # Phi(-2)   ~ 0.023: below 0.05, above 1e-3
DEAD = (0.1, -1.0)        # Phi(-10)  ~ 8e-24


@dataclass
class LayerState:
    """Channel states of one Conv-BN-ReLU block."""

    channels: int = 16
    dead: int = 0
    near_dead: int = 0
    collapsed: bool = False  # every gamma ~ 0 with beta < 0


@dataclass
class ModelState:
    layers: list[LayerState] = field(default_factory=lambda: [LayerState(), LayerState()])
    nan_in_kernel: int = 0   # NaNs written into the first conv kernel

    @property
    def channels(self) -> int:
        return sum(layer.channels for layer in self.layers)

    @property
    def dead(self) -> int:
        return sum(layer.channels if layer.collapsed else layer.dead for layer in self.layers)

    @property
    def near_dead(self) -> int:
        return sum(0 if layer.collapsed else layer.near_dead for layer in self.layers)


def _layer(class_name: str, name: str, inbound: str | None, **config) -> dict:
    return {"class_name": class_name, "name": name,
            "config": {"name": name, "trainable": True, "dtype": "float32", **config},
            "inbound_nodes": [[[inbound, 0, 0, {}]]] if inbound else []}


def model_config(state: ModelState) -> dict:
    layers = [_layer("InputLayer", "input_1", None, batch_input_shape=[None, 8, 8, 3])]
    prev = "input_1"
    for i, layer in enumerate(state.layers, 1):
        layers += [
            _layer("Conv2D", f"conv{i}", prev, filters=layer.channels, kernel_size=[3, 3],
                   padding="same", use_bias=False, activation="linear"),
            _layer("BatchNormalization", f"bn{i}", f"conv{i}", axis=[3], momentum=0.9,
                   epsilon=0.001, center=True, scale=True),
            _layer("ReLU", f"relu{i}", f"bn{i}"),
        ]
        prev = f"relu{i}"
    layers += [_layer("GlobalAveragePooling2D", "pool", prev),
               _layer("Dense", "dense", "pool", units=4, activation="softmax")]
    return {"class_name": "Functional",
            "config": {"name": "model", "layers": layers,
                       "input_layers": [["input_1", 0, 0]],
                       "output_layers": [["dense", 0, 0]]}}


def _bn_vectors(layer: LayerState, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = layer.channels
    gamma = np.full(n, ALIVE[0], np.float32)
    beta = np.full(n, ALIVE[1], np.float32)
    if layer.collapsed:
        gamma[:], beta[:] = 1e-35, -0.5
    else:
        gamma[: layer.dead], beta[: layer.dead] = DEAD
        stop = layer.dead + layer.near_dead
        gamma[layer.dead: stop], beta[layer.dead: stop] = NEAR_DEAD
    return {"gamma": gamma, "beta": beta,
            "moving_mean": rng.normal(0, 0.1, n).astype(np.float32),
            "moving_variance": rng.uniform(0.5, 1.5, n).astype(np.float32)}


def write_checkpoint(path: str | os.PathLike, state: ModelState, seed: int = 0) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    weights: dict[str, dict[str, np.ndarray]] = {"input_1": {}}
    cin = 3
    for i, layer in enumerate(state.layers, 1):
        kernel = rng.normal(0, 0.2, (3, 3, cin, layer.channels)).astype(np.float32)
        if i == 1 and state.nan_in_kernel:
            kernel.reshape(-1)[: state.nan_in_kernel] = np.nan
        weights[f"conv{i}"] = {"kernel": kernel}
        weights[f"bn{i}"] = _bn_vectors(layer, rng)
        weights[f"relu{i}"] = {}
        cin = layer.channels
    weights["pool"] = {}
    weights["dense"] = {"kernel": rng.normal(0, 0.2, (cin, 4)).astype(np.float32),
                        "bias": np.zeros(4, np.float32)}

    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(model_config(state)).encode("utf8")
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = [name.encode("utf8") for name in weights]
        mw.attrs["backend"] = b"tensorflow"
        mw.attrs["keras_version"] = b"2.15.0"
        for name, tensors in weights.items():
            g = mw.create_group(name)
            names = [f"{name}/{var}:0" for var in tensors]
            g.attrs["weight_names"] = [n.encode("utf8") for n in names] if names \
                else np.asarray([])
            for full, array in zip(names, tensors.values(), strict=True):
                g.create_dataset(full, data=array)
    os.replace(tmp, path)
    return path
