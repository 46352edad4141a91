"""Read a Keras model config (Keras 2 or 3) as a graph: layers, their settings,
and what consumes each layer's output.

Only the config JSON is used; nothing is deserialised into Keras objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from bnexporter.report import CONSUMER_KINDS

# layers whose output is a per-channel monotone image of their input: a BN
# channel that is dead before them is dead after them, so look through them
_PASS_THROUGH = re.compile(
    r"^(Dropout|SpatialDropout\dD|GaussianNoise|GaussianDropout|AlphaDropout|Identity|"
    r"ActivityRegularization|ZeroPadding\dD|Cropping\dD|MaxPooling\dD|MaxPool\dD|"
    r"AveragePooling\dD|AvgPool\dD|Reshape|Flatten|Permute|Concatenate|UpSampling\dD)$")
_LINEAR = re.compile(
    r"^(Conv\dD|Convolution\dD|Conv\dDTranspose|DepthwiseConv\dD|SeparableConv\dD|Dense|"
    r"EinsumDense|GlobalAveragePooling\dD|GlobalAvgPool\dD|GlobalMaxPooling\dD|"
    r"LayerNormalization|BatchNormalization.*|Embedding)$")
_ADD = {"Add", "Subtract", "Average"}
_OTHER_ACT = {"LeakyReLU", "PReLU", "ELU", "ThresholdedReLU", "Softmax"}

CONSUMERS = CONSUMER_KINDS


@dataclass
class LayerSpec:
    name: str
    class_name: str
    config: dict[str, Any]
    scope: str  # name of the enclosing model ("" at top level)
    inputs: list[str] = field(default_factory=list)
    is_model: bool = False
    order: int = 0


def _layer_name(entry: dict[str, Any]) -> str:
    cfg = entry.get("config")
    name = entry.get("name") or (cfg.get("name") if isinstance(cfg, dict) else None)
    return str(name or "")


def _inbound_names(node: Any, out: list[str]) -> None:
    """Collect source layer names from a Keras 2 or Keras 3 inbound node."""
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            hist = (node.get("config") or {}).get("keras_history")
            if isinstance(hist, list) and hist and isinstance(hist[0], str):
                out.append(hist[0])
            return
        for value in node.values():
            _inbound_names(value, out)
    elif isinstance(node, list):
        if (len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int)
                and isinstance(node[2], int)):
            out.append(node[0])
            for rest in node[3:]:
                _inbound_names(rest, out)
            return
        for value in node:
            _inbound_names(value, out)


def _model_layers(config: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    cfg = config.get("config", config)
    if isinstance(cfg, list):  # very old Sequential: config is the layer list
        return "Sequential", cfg
    layers = cfg.get("layers") if isinstance(cfg, dict) else None
    return str(config.get("class_name", "")), layers if isinstance(layers, list) else []


class KerasGraph:
    """All layers of a model config, nested models flattened, with consumers."""

    def __init__(self, model_config: dict[str, Any]):
        self.layers: dict[str, LayerSpec] = {}
        self._consumers: dict[str, list[str]] = {}
        self._scope_outputs: dict[str, set[str]] = {}
        self._walk(model_config, scope="")

    def _walk(self, model_config: dict[str, Any], scope: str) -> None:
        kind, entries = _model_layers(model_config)
        sequential = kind == "Sequential"
        prev: str | None = None
        names: list[str] = []
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            name = _layer_name(entry)
            cls = str(entry.get("class_name", ""))
            raw = entry.get("config")
            cfg: dict[str, Any] = raw if isinstance(raw, dict) else {}
            spec = LayerSpec(name, cls, cfg, scope, order=len(self.layers))
            if sequential:
                spec.inputs = [prev] if prev else []
            else:
                _inbound_names(entry.get("inbound_nodes", []), spec.inputs)
            spec.is_model = isinstance(cfg.get("layers"), list)
            if name and name not in self.layers:
                self.layers[name] = spec
            names.append(name)
            if cls != "InputLayer":
                prev = name
            if spec.is_model:
                self._walk(entry, scope=name)
        for name in names:
            for src in self.layers[name].inputs if name in self.layers else []:
                self._consumers.setdefault(src, []).append(name)
        if names and scope:
            fed = {s for n in names if n in self.layers for s in self.layers[n].inputs}
            self._scope_outputs[scope] = {n for n in names if n not in fed}

    def scope_outputs(self, scope: str) -> set[str]:
        """The layers of nested model ``scope`` whose output leaves it."""
        return self._scope_outputs.get(scope, set())

    def k3_paths(self) -> dict[str, str]:
        """Keras 3's ``layers/<snake_case class>_N`` weight paths -> layer name."""
        out: dict[str, str] = {}
        counters: dict[str, dict[str, int]] = {}
        for spec in self.layers.values():
            scope_path = f"{out[spec.scope]}/" if spec.scope and spec.scope in out else ""
            used = counters.setdefault(scope_path, {})
            base = _snake(spec.class_name)
            n = used.get(base, -1) + 1
            used[base] = n
            out[spec.name] = f"{scope_path}layers/{base if n == 0 else f'{base}_{n}'}"
        return {v: k for k, v in out.items()}

    def consumer(self, name: str, _depth: int = 0) -> str:
        """What kind of operation consumes this layer's output."""
        users = self._consumers.get(name, [])
        spec = self.layers.get(name)
        if not users:
            if spec is not None and spec.scope:
                return "unknown"  # output of a nested model: the outer graph decides
            return "linear"
        kinds = {self._classify(self.layers[u], _depth) if u in self.layers else "unknown"
                 for u in users}
        if len(kinds) == 1:
            return kinds.pop()
        if "unknown" in kinds:
            return "unknown"
        # a MobileNet projection feeds the residual Add and the next block's conv
        return "add" if kinds <= {"add", "linear"} else "other"

    def _classify(self, spec: LayerSpec, depth: int) -> str:
        cls, cfg = spec.class_name, spec.config
        if cls == "ReLU":
            slope = float(cfg.get("negative_slope") or 0.0)
            if slope:
                return "other"
            max_value = cfg.get("max_value")
            return "relu6" if max_value is not None and float(max_value) == 6.0 else "relu"
        if cls == "Activation":
            return _activation_kind(cfg.get("activation"))
        if cls in ("Relu", "relu"):
            return "relu"
        if cls in ("Relu6", "relu6"):
            return "relu6"
        if cls in ("TFOpLambda", "SlicingOpLambda"):
            fn = str(cfg.get("function", ""))
            if fn.endswith("relu6"):
                return "relu6"
            if fn.endswith("relu"):
                return "relu"
            return "add" if fn.endswith("add") or fn.endswith("add_v2") else "other"
        if cls in _ADD:
            return "add"
        if cls in _OTHER_ACT:
            return "other"
        if spec.is_model or (_PASS_THROUGH.match(cls) and depth < 32):
            if spec.is_model:
                return "unknown"
            return self.consumer(spec.name, depth + 1)
        if _LINEAR.match(cls):
            return "linear"
        return "other" if cls else "unknown"


def _activation_kind(activation: Any) -> str:
    if isinstance(activation, dict):  # Keras 3 may serialise built-ins as objects
        activation = activation.get("config") or activation.get("class_name")
        if isinstance(activation, dict):
            activation = activation.get("name")
    name = str(activation or "").lower()
    if name in ("relu", "relu6", "linear", "silu", "hardswish"):
        return name
    if name == "swish":
        return "silu"
    if name in ("hard_swish", "hard_silu"):
        return "hardswish"
    return "other"


def _snake(name: str) -> str:
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()
