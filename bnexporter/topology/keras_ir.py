"""Translate a Keras 2 / Keras 3 model config into the shared graph IR.

Only the config JSON is read (never deserialised into Keras objects). Nested
models are flattened: a sub-model becomes an ``identity`` node that forwards its
output layer, and its ``InputLayer`` an ``identity`` of what the outer model feeds
it, so the IR is one flat graph whose node names are the Keras layer names.

Which checkpoint tensors a layer reads depends on the file layout, so the caller
supplies ``tensors_of(layer_name) -> {role: tensor name}``; :func:`keras_tensors_of`
builds it for the layouts the readers expose (Keras 2 / legacy ``.h5``:
``<layer>/<var>``; Keras 3 ``.keras`` / ``.weights.h5``: ``layers/<path>/vars/<i>``).

Roles: ``kernel``, ``bias``, ``depthwise_kernel``, ``pointwise_kernel`` (separable
conv), ``gamma``, ``beta``, ``mean``, ``var``.

Layers with a fused ``activation`` become two nodes: ``<name>/preact`` (the linear
part) and ``<name>`` (the activation). ``SeparableConv2D`` becomes
``<name>/depthwise`` then the pointwise conv ``<name>``. Layers without a
translation become op ``other`` with ``attrs["name"]`` = their class, so the
census skips what depends on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .graph import Graph, Node

try:  # the module moved into topology/; keep working wherever it lives
    from .keras_graph import KerasGraph, LayerSpec, _inbound_names
except ImportError:  # pragma: no cover - older tree
    from bnexporter.keras_graph import KerasGraph, LayerSpec, _inbound_names  # type: ignore

TensorsOf = Callable[[str], Mapping[str, str]]

_IDENTITY = re.compile(
    r"^(Dropout|SpatialDropout\dD|GaussianNoise|GaussianDropout|AlphaDropout|Identity|"
    r"ActivityRegularization|Masking)$")
_ACT = {
    "relu": "relu", "relu6": "relu6", "swish": "silu", "silu": "silu", "sigmoid": "sigmoid",
    "tanh": "tanh", "linear": "identity", "hard_swish": "hardswish", "hard_silu": "hardswish",
    "hardswish": "hardswish", "gelu": "gelu", "softmax": "softmax",
}
# elementwise activations the census implements under op "activation"
_OTHER_ACTS = {"elu", "selu", "softplus", "softsign", "exponential", "mish", "leaky_relu"}


def _pair(value: Any, rank: int = 2) -> tuple[int, ...]:
    if value is None:
        return (1,) * rank
    if isinstance(value, (list, tuple)):
        vals = tuple(int(v) for v in value)
        return vals if len(vals) == rank else (vals * rank)[:rank]
    return (int(value),) * rank


def _to2d(values: tuple[int, ...]) -> tuple[int, int]:
    """1-D layers run as 2-D with H = 1."""
    return (1, values[0]) if len(values) == 1 else (values[0], values[1])


def _activation_name(activation: Any) -> str:
    if isinstance(activation, dict):  # Keras 3 may serialise built-ins as objects
        activation = activation.get("config") or activation.get("class_name")
        if isinstance(activation, dict):
            activation = activation.get("name")
    return str(activation or "linear").lower()


def _act_node(name: str, act: str, src: str) -> Node:
    op = _ACT.get(act)
    if op is not None:
        attrs: dict[str, Any] = {"axis": -1} if op == "softmax" else {}
        if op == "gelu":
            attrs["approximate"] = False
        return Node(name, op, (src,), attrs=attrs)
    if act in _OTHER_ACTS:
        return Node(name, "activation", (src,), attrs={"name": act})
    return Node(name, "other", (src,), attrs={"name": f"activation:{act}"})


def _conv_padding(cfg: dict[str, Any], kernel: tuple[int, int], dilation: tuple[int, int]
                  ) -> Any:
    pad = str(cfg.get("padding", "valid")).lower()
    if pad == "causal":  # Conv1D: all padding on the left of the time axis
        return (0, 0, (kernel[1] - 1) * dilation[1], 0)
    return pad


def _window(cfg: dict[str, Any], rank: int) -> dict[str, Any]:
    """Stride, dilation and padding of a Keras convolution layer's window."""
    ks = _to2d(_pair(cfg.get("kernel_size"), rank))
    dil = _to2d(_pair(cfg.get("dilation_rate"), rank))
    return {"stride": _to2d(_pair(cfg.get("strides"), rank)), "dilation": dil,
            "padding": _conv_padding(cfg, ks, dil), "rank": rank}


def _depthwise(cfg: dict[str, Any], rank: int) -> dict[str, Any]:
    return {**_window(cfg, rank), "depthwise": True,
            "depth_multiplier": int(cfg.get("depth_multiplier") or 1)}


class _Builder:
    def __init__(self, graph: KerasGraph, tensors_of: TensorsOf):
        self.graph = graph
        self.tensors_of = tensors_of
        self.nodes: list[Node] = []
        self.scope_inputs: dict[str, list[str]] = {}

    def params(self, layer: str, roles: dict[str, str]) -> dict[str, str]:
        """``roles`` maps an IR role to the role name asked from ``tensors_of``."""
        found = dict(self.tensors_of(layer) or {})
        return {ir: found[src] for ir, src in roles.items() if src in found}

    def add(self, node: Node) -> None:
        self.nodes.append(node)

    def other(self, spec: LayerSpec, inputs: tuple[str, ...], why: str | None = None) -> None:
        attrs: dict[str, Any] = {"name": spec.class_name or "unknown"}
        if why:
            attrs["why"] = why
        self.add(Node(spec.name, "other", inputs, attrs=attrs))

    def linear_then_act(self, spec: LayerSpec, op: str, inputs: tuple[str, ...],
                        params: dict[str, str], attrs: dict[str, Any]) -> None:
        act = _activation_name(spec.config.get("activation"))
        if act in ("linear", "none"):
            self.add(Node(spec.name, op, inputs, params, attrs))
            return
        pre = f"{spec.name}/preact"
        self.add(Node(pre, op, inputs, params, attrs))
        self.add(_act_node(spec.name, act, pre))

    # -- one layer -------------------------------------------------------------------
    def layer(self, spec: LayerSpec, inputs: tuple[str, ...]) -> None:
        cls, cfg, name = spec.class_name, spec.config, spec.name
        if str(cfg.get("data_format") or "channels_last") != "channels_last":
            self.other(spec, inputs, "data_format channels_first")
            return
        m = re.match(r"^(Conv|Convolution)([12])D$", cls)
        if m:
            attrs = {**_window(cfg, int(m.group(2))), "groups": int(cfg.get("groups") or 1)}
            roles = {"kernel": "kernel"}
            if cfg.get("use_bias", True):
                roles["bias"] = "bias"
            self.linear_then_act(spec, "conv", inputs, self.params(name, roles), attrs)
            return
        m = re.match(r"^DepthwiseConv([12])D$", cls)
        if m:
            attrs = _depthwise(cfg, int(m.group(1)))
            roles = {"kernel": "depthwise_kernel"}
            if cfg.get("use_bias", True):
                roles["bias"] = "bias"
            found = self.params(name, roles)
            if "kernel" not in found:  # Keras 3 role names
                found.update(self.params(name, {"kernel": "kernel"}))
            self.linear_then_act(spec, "conv", inputs, found, attrs)
            return
        m = re.match(r"^SeparableConv([12])D$", cls)
        if m:
            rank = int(m.group(1))
            dw_attrs = _depthwise(cfg, rank)
            dw = f"{name}/depthwise"
            self.add(Node(dw, "conv", inputs,
                          self.params(name, {"kernel": "depthwise_kernel"}), dw_attrs))
            roles = {"kernel": "pointwise_kernel"}
            if cfg.get("use_bias", True):
                roles["bias"] = "bias"
            pw_attrs = {"stride": (1, 1), "dilation": (1, 1), "padding": "valid", "groups": 1,
                        "rank": rank}
            self.linear_then_act(spec, "conv", (dw,), self.params(name, roles), pw_attrs)
            return
        if cls == "Dense":
            roles = {"kernel": "kernel"}
            if cfg.get("use_bias", True):
                roles["bias"] = "bias"
            self.linear_then_act(spec, "dense", inputs, self.params(name, roles), {})
            return
        if "BatchNormalization" in cls and cls != "LayerNormalization":
            axis = cfg.get("axis", -1)
            if isinstance(axis, list):
                if len(axis) != 1:
                    self.other(spec, inputs, "multi-axis BatchNormalization")
                    return
                axis = axis[0]
            roles = {"mean": "mean", "var": "var"}
            if cfg.get("scale", True):
                roles["gamma"] = "gamma"
            if cfg.get("center", True):
                roles["beta"] = "beta"
            self.add(Node(name, "bn", inputs, self.params(name, roles),
                          {"eps": float(cfg.get("epsilon", 1e-3)), "axis": int(axis)}))
            return
        if cls == "ReLU":
            max_value = cfg.get("max_value")
            slope = float(cfg.get("negative_slope") or 0.0)
            threshold = float(cfg.get("threshold") or 0.0)
            if not slope and not threshold:
                if max_value is None:
                    self.add(Node(name, "relu", inputs))
                    return
                if float(max_value) == 6.0:
                    self.add(Node(name, "relu6", inputs))
                    return
            self.add(Node(name, "activation", inputs, attrs={
                "name": "relu", "max_value": None if max_value is None else float(max_value),
                "negative_slope": slope, "threshold": threshold}))
            return
        if cls == "Activation":
            self.add(_act_node(name, _activation_name(cfg.get("activation")), inputs[0])
                     if len(inputs) == 1 else Node(name, "other", inputs, attrs={"name": cls}))
            return
        if cls == "LeakyReLU":
            alpha = cfg.get("negative_slope", cfg.get("alpha", 0.3))
            self.add(Node(name, "leaky_relu", inputs, attrs={"alpha": float(alpha)}))
            return
        if cls == "ELU":
            self.add(Node(name, "activation", inputs,
                          attrs={"name": "elu", "alpha": float(cfg.get("alpha", 1.0))}))
            return
        if cls == "Softmax":
            axis = cfg.get("axis", -1)
            if isinstance(axis, list):
                axis = axis[0] if len(axis) == 1 else None
            if axis is None:
                self.other(spec, inputs)
                return
            self.add(Node(name, "softmax", inputs, attrs={"axis": int(axis)}))
            return
        if cls == "Add":
            self.add(Node(name, "add", inputs))
            return
        if cls == "Multiply":
            self.add(Node(name, "mul", inputs))
            return
        if cls == "Concatenate":
            self.add(Node(name, "concat", inputs, attrs={"axis": int(cfg.get("axis", -1))}))
            return
        m = re.match(r"^(MaxPooling|MaxPool|AveragePooling|AvgPool)([12])D$", cls)
        if m:
            rank = int(m.group(2))
            pool = _to2d(_pair(cfg.get("pool_size", 2), rank))
            strides = cfg.get("strides")
            stride = pool if strides is None else _to2d(_pair(strides, rank))
            op = "maxpool" if m.group(1).startswith("Max") else "avgpool"
            attrs = {"pool": pool, "stride": stride,
                     "padding": str(cfg.get("padding", "valid")).lower(), "rank": rank}
            if op == "avgpool":
                attrs["count_include_pad"] = False
            self.add(Node(name, op, inputs, attrs=attrs))
            return
        m = re.match(r"^Global(Average|Avg|Max)Pool(ing)?([12])D$", cls)
        if m:
            op = "gmp" if m.group(1) == "Max" else "gap"
            self.add(Node(name, op, inputs, attrs={"keepdims": bool(cfg.get("keepdims", False))}))
            return
        if cls == "Flatten":
            self.add(Node(name, "flatten", inputs))
            return
        if cls == "Reshape":
            target = cfg.get("target_shape")
            if not isinstance(target, (list, tuple)):
                self.other(spec, inputs)
                return
            self.add(Node(name, "reshape", inputs,
                          attrs={"shape": tuple(int(v) for v in target)}))
            return
        m = re.match(r"^(ZeroPadding|Cropping)([12])D$", cls)
        if m:
            rank = int(m.group(2))
            key = "padding" if m.group(1) == "ZeroPadding" else "cropping"
            pads = _pads(cfg.get(key, 1 if key == "padding" else 0), rank)
            if m.group(1) == "Cropping":
                pads = tuple((-a, -b) for a, b in pads)
            self.add(Node(name, "pad", inputs, attrs={"pads": pads, "value": 0.0}))
            return
        if _IDENTITY.match(cls):
            self.add(Node(name, "identity", inputs))
            return
        self.other(spec, inputs)


def _pads(value: Any, rank: int) -> tuple[tuple[int, int], ...]:
    """Keras padding / cropping forms -> ((before, after), ...) per spatial dim."""
    if isinstance(value, int):
        return ((value, value),) * rank
    vals = list(value)
    if rank == 1:
        if len(vals) == 2 and all(isinstance(v, int) for v in vals):
            return ((int(vals[0]), int(vals[1])),)
        return ((int(vals[0]), int(vals[0])),)
    out = []
    for v in vals[:rank]:
        if isinstance(v, (list, tuple)):
            out.append((int(v[0]), int(v[1])))
        else:
            out.append((int(v), int(v)))
    return tuple(out)


def _model_output(entry_cfg: dict[str, Any], inner: list[LayerSpec]) -> str | None:
    outs: list[str] = []
    _inbound_names(entry_cfg.get("output_layers") or [], outs)
    if outs:
        return outs[0]
    body = [s for s in inner if s.class_name != "InputLayer"]
    return body[-1].name if body else None


def _input_shape(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) < 2:
        return None
    dims = shape[1:]
    if any(not isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def keras_graph_ir(model_config: dict[str, Any],
                   tensors_of: TensorsOf | Mapping[str, Mapping[str, str]] | None = None,
                   *, source: str = "config") -> Graph:
    """The IR of a Keras model config (``{"class_name", "config"}``), nested models flattened.

    ``tensors_of`` is a callable or a mapping ``layer name -> {role: tensor name}``;
    without it nodes carry no params (a census would then skip them).
    """
    if tensors_of is None:
        lookup: TensorsOf = lambda _name: {}  # noqa: E731
    elif callable(tensors_of):
        lookup = tensors_of
    else:
        table = tensors_of
        lookup = lambda name: table.get(name, {})  # noqa: E731
    graph = KerasGraph(model_config)
    b = _Builder(graph, lookup)
    specs = list(graph.layers.values())
    by_scope: dict[str, list[LayerSpec]] = {}
    for s in specs:
        by_scope.setdefault(s.scope, []).append(s)
    entries = _model_entries(model_config)
    input_shape: tuple[int, ...] | None = None
    first_input: str | None = None
    scope_input: dict[str, str] = {}
    for s in specs:
        if s.class_name == "InputLayer":
            scope_input.setdefault(s.scope, s.name)

    def feed(spec: LayerSpec) -> tuple[str, ...]:
        """What feeds a layer: its inbound layers, else (Sequential) its scope's
        InputLayer, else what the outer model feeds the scope."""
        inputs = tuple(i for i in spec.inputs if i)
        if inputs:
            return inputs
        own = scope_input.get(spec.scope)
        if own is not None and own != spec.name:
            return (own,)
        if spec.scope and spec.scope in graph.layers:
            return feed(graph.layers[spec.scope])
        return ()

    for spec in specs:
        inputs = feed(spec) if spec.class_name != "InputLayer" else ()
        if spec.is_model:
            out = _model_output(entries.get(spec.name, {}), by_scope.get(spec.name, []))
            if out is None:
                b.other(spec, inputs, "empty sub-model")
            else:
                b.add(Node(spec.name, "identity", (out,), attrs={"model": True}))
            continue
        if spec.class_name == "InputLayer":
            outer = feed(graph.layers[spec.scope]) if spec.scope in graph.layers else ()
            if spec.scope and outer:
                b.add(Node(spec.name, "identity", outer))
            else:
                shape = _input_shape(spec.config)
                b.add(Node(spec.name, "input", attrs={"shape": shape}))
                if first_input is None:
                    first_input, input_shape = spec.name, shape
            continue
        if not inputs:  # a Sequential without InputLayer: synthesise one
            shape = _input_shape(spec.config) or _build_shape(spec.config)
            iname = f"{spec.name}/input"
            b.add(Node(iname, "input", attrs={"shape": shape}))
            if first_input is None:
                first_input, input_shape = iname, shape
            inputs = (iname,)
        b.layer(spec, inputs)
    nodes = _toposort(b.nodes)
    return Graph(tuple(nodes), source=source, layout="nhwc", kernel_layout="hwio",
                 input_shape=input_shape)


def _build_shape(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    build = cfg.get("build_config") if isinstance(cfg.get("build_config"), dict) else None
    if build:
        return _input_shape({"batch_shape": build.get("input_shape")})
    return None


def _model_entries(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> inner ``config`` dict of every nested model (for ``output_layers``)."""
    out: dict[str, dict[str, Any]] = {}

    def walk(cfg: Any) -> None:
        inner = cfg.get("config", cfg) if isinstance(cfg, dict) else None
        layers = inner.get("layers") if isinstance(inner, dict) else None
        if not isinstance(layers, list):
            return
        for entry in layers:
            if not isinstance(entry, dict):
                continue
            ecfg = entry.get("config")
            if isinstance(ecfg, dict) and isinstance(ecfg.get("layers"), list):
                name = entry.get("name") or ecfg.get("name")
                if name:
                    out.setdefault(str(name), ecfg)
                walk(entry)

    walk(config)
    return out


def _toposort(nodes: list[Node]) -> list[Node]:
    """Stable topological order (sub-model identities come after their body)."""
    names = {n.name for n in nodes}
    done: set[str] = set()
    out: list[Node] = []
    pending = list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in done or i not in names for i in n.inputs):
                out.append(n)
                done.add(n.name)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle: keep the config order for the rest
            out.extend(rest)
            break
        pending = rest
    return out


# -- tensor names for the layouts the readers expose -------------------------------------

_K2_ROLES = {"kernel": "kernel", "bias": "bias", "depthwise_kernel": "depthwise_kernel",
             "pointwise_kernel": "pointwise_kernel", "gamma": "gamma", "beta": "beta",
             "moving_mean": "mean", "moving_variance": "var"}
_K3_VARS = re.compile(r"^(.*)/vars/(\d+)$")


def _k3_roles(spec: LayerSpec | None, count: int) -> list[str]:
    if spec is None:
        return [f"var{i}" for i in range(count)]
    cls, cfg = spec.class_name, spec.config
    bias = ["bias"] if cfg.get("use_bias", True) else []
    if "BatchNormalization" in cls:
        return (["gamma"] if cfg.get("scale", True) else []) + \
            (["beta"] if cfg.get("center", True) else []) + ["mean", "var"]
    if cls.startswith("SeparableConv"):
        return ["depthwise_kernel", "pointwise_kernel", *bias]
    if cls.startswith("DepthwiseConv"):
        return ["depthwise_kernel", *bias]
    if re.match(r"^(Conv|Convolution)\dD$", cls) or cls == "Dense":
        return ["kernel", *bias]
    return [f"var{i}" for i in range(count)]


def _k3_path_names(graph: KerasGraph) -> dict[str, str]:
    """Keras 3 weight path -> layer name, from the config's layer order."""
    method = getattr(graph, "k3_paths", None)
    if callable(method):
        return dict(method())
    fn = _first_attr(("bnexporter.detection.discovery", "bnexporter.discovery"), "_k3_paths")
    return dict(fn(graph)) if fn is not None else {}


def _first_attr(modules: tuple[str, ...], attr: str) -> Any:
    """``attr`` of the first of ``modules`` that has it (modules move during refactors)."""
    import importlib

    for mod in modules:
        try:
            value = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
        return value
    return None


def _reader_layer_names(reader: Any) -> dict[str, str]:
    """The ``name`` attribute of each Keras 3 ``vars`` group, as the reader recorded it."""
    names = getattr(getattr(reader, "meta", None), "layer_names", None)
    if not names:
        names = getattr(reader, "k3_layer_names", None)
    return dict(names or {})


def keras_tensors_of(reader: Any, model_config: dict[str, Any] | None = None
                     ) -> Callable[[str], dict[str, str]]:
    """``layer name -> {role: tensor name}`` for a Keras reader (``bnexporter.formats``).

    Keras 2 / legacy ``.h5`` names are ``<layer>/<var>`` (the ``:0`` stripped), Keras 3
    ones ``<path>/vars/<i>``; the layer of a Keras 3 path comes from the ``vars``
    group's ``name`` attribute or, failing that, from the config's layer order.
    """
    config = model_config if model_config is not None else reader.meta.model_config
    graph = KerasGraph(config) if config else None
    aux = set(getattr(reader.meta, "auxiliary", ()) or ())
    table: dict[str, dict[str, str]] = {}
    k3: dict[str, list[tuple[int, str]]] = {}
    for name in reader.names():
        if name in aux or name.startswith(("optimizer/", "optimizer_weights/")):
            continue
        m = _K3_VARS.match(name)
        if m:
            k3.setdefault(m.group(1), []).append((int(m.group(2)), name))
            continue
        parts = name.split("/")
        if len(parts) >= 2:
            role = _K2_ROLES.get(parts[-1].split(":")[0])
            if role is not None:
                table.setdefault(parts[-2], {}).setdefault(role, name)
    if k3:
        paths = {**(_k3_path_names(graph) if graph else {}),
                 **_reader_layer_names(reader)}
        for path, items in k3.items():
            items.sort()
            layer = paths.get(path, path)
            spec = graph.layers.get(layer) if graph else None
            roles = _k3_roles(spec, len(items))
            table.setdefault(layer, {}).update(
                {role: tensor for role, (_, tensor) in zip(roles, items, strict=False)})
    return lambda layer: dict(table.get(layer, {}))


def _open_reader(path: str) -> Any:
    """``bnexporter.formats.open_reader`` (formerly ``bnexporter.formats.detect``)."""
    fn = _first_attr(("bnexporter.formats", "bnexporter.formats.detect",
                      "bnexporter.formats.sniff"), "open_reader")
    if fn is None:
        raise ImportError("no open_reader in bnexporter.formats")
    return fn(path)


def open_keras_ir(path: str) -> tuple[Graph, Any]:
    """Open a Keras checkpoint that carries its config: ``(graph, reader)``.

    The caller closes the reader; ``lambda n: reader.read_array(n)`` is a census
    ``fetch``. Raises ``CheckpointError`` when the file has no model config.
    """
    from bnexporter.errors import CheckpointError

    reader = _open_reader(path)
    try:
        config = reader.meta.model_config
        if not config:
            raise CheckpointError(path, "no model config in the file: the graph is unknown",
                                  "unsupported")
        graph = keras_graph_ir(config, keras_tensors_of(reader, config))
    except Exception:
        reader.close()
        raise
    return graph, reader
