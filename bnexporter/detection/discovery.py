"""Group a checkpoint's tensors into BatchNorm layers and learn their context.

For each BN layer: which tensors hold gamma / beta / mean / variance, its
epsilon (and where that number came from), and what consumes its output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from bnexporter.formats.base import Reader
from bnexporter.topology import sources
from bnexporter.topology.consumers import ConsumerRules
from bnexporter.topology.infer import infer_consumers
from bnexporter.topology.keras_graph import KerasGraph
from bnexporter.topology.resolve import bn_contexts

_ROLES = {
    "running_mean": "mean", "running_var": "var", "weight": "gamma", "bias": "beta",
    "moving_mean": "mean", "moving_variance": "var", "gamma": "gamma", "beta": "beta",
}
_SPLIT = re.compile(r"^(.*)[./]([A-Za-z_]+)(?::0)?$")
_K3_VARS = re.compile(r"^(.*)/vars/(\d+)$")

DEFAULT_EPS = {"keras": 1e-3, "tf": 1e-3, "torch": 1e-5}


@dataclass(frozen=True)
class BNLayer:
    name: str
    channels: int
    mean: str
    var: str
    gamma: str | None
    beta: str | None
    eps: float
    eps_source: str
    consumer: str
    consumer_source: str
    # the layer producing this BN's input (a conv / dense), when known, and how
    producer: str | None = None
    producer_source: str = "none"


def discover(reader: Reader, rules: ConsumerRules | None = None,
             eps_override: float | None = None) -> list[BNLayer]:
    meta = reader.meta
    config_source = "config"
    found = None if meta.model_config else sources.find(
        reader.path, meta.framework, meta.notes, frozenset(reader.names()))
    if found is not None and found.keras_config is not None:
        meta.model_config, config_source = found.keras_config, found.source
    graph = KerasGraph(meta.model_config) if meta.model_config else None
    contexts = bn_contexts(found.graph) if found is not None and found.graph else {}
    groups = _k3_groups(reader, graph) if reader.format == "keras3-weights-h5" or (
        reader.format == "keras" and any(_K3_VARS.match(n) for n in reader.names())
    ) else _suffix_groups(reader, graph)
    rules = rules or ConsumerRules()
    preset, prefix = rules.resolve_preset(list(groups)) if meta.framework == "torch" \
        else (None, "")
    layers = []
    for name, roles in groups.items():
        mean, var = roles.get("mean"), roles.get("var")
        if mean is None or var is None:
            continue
        shape = reader.info(mean).shape
        if len(shape) != 1 or reader.info(var).shape != shape:
            continue
        gamma = roles.get("gamma") if _same_shape(reader, roles.get("gamma"), shape) else None
        beta = roles.get("beta") if _same_shape(reader, roles.get("beta"), shape) else None
        spec = graph.layers.get(name) if graph else None
        if eps_override is not None:
            eps, eps_source = eps_override, "override"
        elif spec is not None and "epsilon" in spec.config:
            eps, eps_source = float(spec.config["epsilon"]), "config"
        elif name in meta.bn_eps:
            eps, eps_source = meta.bn_eps[name], "file"
        else:
            fw = meta.framework if meta.framework in DEFAULT_EPS else (
                "torch" if mean.endswith("running_mean") else "keras")
            eps, eps_source = DEFAULT_EPS[fw], f"default:{'pytorch' if fw == 'torch' else fw}"
        producer, producer_source = None, "none"
        consumer, source = rules.lookup(name, None)  # the user's own rules come first
        ctx = contexts.get(mean)
        if consumer is None and graph is not None and spec is not None:
            consumer, source = graph.consumer(name), config_source
        elif consumer is None and ctx is not None and found is not None \
                and ctx.consumer != "unknown":
            consumer, source = ctx.consumer, found.source
        elif consumer is None and ctx is not None and found is not None and ctx.after_activation:
            # the graph shows Conv -> ReLU -> BN; what follows is not named: not a ReLU
            consumer, source = "other", f"{found.source}+inferred:post-activation"
        if ctx is not None and ctx.producer is not None and found is not None:
            producer, producer_source = ctx.producer, found.source
        if consumer is None:
            consumer, source = rules.lookup(name, preset, prefix)
        if consumer is None:
            consumer, source = "unknown", "none"
        layers.append(BNLayer(name, shape[0], mean, var, gamma, beta, eps, eps_source,
                              consumer, source, producer, producer_source))
    return _with_inferred(reader, layers)


def _with_inferred(reader: Reader, layers: list[BNLayer]) -> list[BNLayer]:
    """Fill unknown consumers from the evidence in the weights (topology/infer.py)."""
    unknown = {layer.name for layer in layers if layer.consumer == "unknown"}
    found = infer_consumers(reader, layers, unknown)
    return [replace(layer, consumer=found[layer.name].consumer,
                    consumer_source=found[layer.name].source,
                    producer=layer.producer or found[layer.name].producer,
                    producer_source=layer.producer_source if layer.producer
                    else "inferred:key-order" if found[layer.name].producer else "none")
            if layer.name in found else layer for layer in layers]


def _same_shape(reader: Reader, name: str | None, shape: tuple[int, ...]) -> bool:
    return name is not None and reader.info(name).shape == shape


def _keras_layer(path: str, graph: KerasGraph | None) -> str:
    """The layer a Keras 2 weight belongs to, from ``[model/]group/[scope/]var``.

    The weight's own scope is usually the layer name, but TF name scopes add
    suffixes (``bn1/bn1_1/gamma``: a model built twice in one process, Keras <=
    2.2), so the config's layer names decide when there is a config.
    """
    parts = path.split("/")
    if graph is not None:
        for part in reversed(parts):
            spec = graph.layers.get(part)
            if spec is not None and "BatchNormalization" in spec.class_name:
                return part
    leaf = parts[-1]
    if len(parts) >= 2 and re.fullmatch(re.escape(parts[-2]) + r"_\d+", leaf):
        return parts[-2]
    return leaf


def _suffix_groups(reader: Reader, graph: KerasGraph | None = None
                   ) -> dict[str, dict[str, str]]:
    """Group ``<layer>.running_mean`` / ``<layer>/moving_mean`` style names."""
    groups: dict[str, dict[str, str]] = {}
    for name in reader.names():
        if name in reader.meta.auxiliary:
            continue
        m = _SPLIT.match(name)
        if not m or m.group(2) not in _ROLES:
            continue
        prefix, role = m.group(1), _ROLES[m.group(2)]
        if reader.meta.framework == "keras":
            # Keras weight names are "<layer>/<var>", inside a nested model group too
            prefix = _keras_layer(prefix, graph)
        groups.setdefault(prefix, {})[role] = name
    return groups


def _k3_groups(reader: Reader, graph: KerasGraph | None) -> dict[str, dict[str, str]]:
    """Keras 3 stores a layer's variables as ``<path>/vars/0..n``; name them.

    The layer is identified by the group's ``name`` attribute (Keras >= 3.6) or by
    the config; which index is gamma/beta follows the BN's ``scale``/``center``.
    """
    by_path: dict[str, list[str]] = {}
    for name in reader.names():
        m = _K3_VARS.match(name)
        if m and name not in reader.meta.auxiliary:
            by_path.setdefault(m.group(1), []).append(name)
    names = reader.meta.layer_names
    k3_paths = graph.k3_paths() if graph else {}
    groups: dict[str, dict[str, str]] = {}
    for path, tensors in by_path.items():
        tensors.sort(key=lambda t: int(t.rsplit("/", 1)[1]))
        layer = names.get(path) or k3_paths.get(path) or path
        spec = graph.layers.get(layer) if graph else None
        if spec is not None:
            if "BatchNormalization" not in spec.class_name:
                continue
            scale = bool(spec.config.get("scale", True))
            center = bool(spec.config.get("center", True))
        else:
            # Keras 3 names weight paths after the class: without a config only a
            # batch_normalization path is a BN (a LayerNormalization also holds two
            # vectors of one shape, and a ConvNeXt has dozens)
            base = path.rsplit("/", 1)[-1]
            if not re.match(r"^(sync_)?batch_normalization(_v\d)?(_\d+)?$", base):
                continue
            scale, center = {4: (True, True), 3: (False, True), 2: (False, False)}.get(
                len(tensors), (True, True))
        order = (["gamma"] if scale else []) + (["beta"] if center else []) + ["mean", "var"]
        if len(tensors) < len(order):
            continue
        shapes = {reader.info(t).shape for t in tensors[: len(order)]}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            continue
        groups[layer] = dict(zip(order, tensors, strict=False))
    return groups
