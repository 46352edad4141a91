"""Where each BatchNorm's input comes from: its producing kernel and what feeds it.

The plain estimate sees only a BN's four vectors. The refined one (refine.py)
also needs the conv / dense kernel that computes the BN input and a description
of that kernel's own input: which upstream BN outputs, through which
activations and sums. Keras configs state this exactly; PyTorch state_dicts
only by naming convention, so the torch rules are deliberately narrow and
return None whenever the wiring is not certain. None always means "use the
plain Gaussian estimate", never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from bnexporter.detection.discovery import BNLayer
from bnexporter.detection.wiring import Feed, Link
from bnexporter.formats.base import Reader
from bnexporter.topology import sources
from bnexporter.topology.graph import Graph
from bnexporter.topology.keras_graph import KerasGraph, LayerSpec

_MAX_DEPTH = 24  # feed trees deeper than this (long residual chains) are dropped


def find_links(reader: Reader, layers: list[BNLayer]) -> dict[str, Link]:
    """Links for the BN layers whose producer is certain; others are absent."""
    try:
        if reader.meta.model_config:
            return _keras_links(reader, layers, KerasGraph(reader.meta.model_config))
        found = sources.find(reader.path, reader.meta.framework, [], frozenset(reader.names()))
        if found is not None and found.graph is not None:
            return {**(_torch_links(reader, layers) if reader.meta.framework == "torch"
                       else {}), **graph_links(found.graph, layers, reader)}
        if reader.meta.framework == "torch":
            return _torch_links(reader, layers)
    except (KeyError, ValueError, TypeError, IndexError):
        return {}
    return {}


# -- any graph in the IR (torch.export, TorchScript, describe, TF1 .meta, ...) ---------

def graph_links(graph: Graph, layers: list[BNLayer], reader: Reader) -> dict[str, Link]:
    """Producer kernels and their feeds, read off a graph; only what the graph proves."""
    nodes = graph.by_name()
    by_mean = {layer.mean: layer for layer in layers}
    bn_of_node = {n.name: by_mean[n.params["mean"]].name for n in graph.nodes
                  if n.op == "bn" and n.params.get("mean") in by_mean}
    layout = "torch" if graph.kernel_layout == "oihw" else "keras"
    links: dict[str, Link] = {}

    def feed(name: str, depth: int = 0) -> Feed | None:
        node = nodes.get(name)
        if node is None or depth > _MAX_DEPTH:
            return None
        if node.op == "bn":
            return Feed("bn", bn_of_node[name]) if name in bn_of_node else None
        if node.op in ("identity", "pad"):
            return feed(node.inputs[0], depth + 1) if len(node.inputs) == 1 else None
        if node.op in ("relu", "relu6", "maxpool") and len(node.inputs) == 1:
            inner = feed(node.inputs[0], depth + 1)
            return None if inner is None else Feed(node.op, None, (inner,))
        if node.op == "add" and node.inputs:
            args = [feed(i, depth + 1) for i in node.inputs]
            return None if any(a is None for a in args) else Feed(
                "add", None, tuple(a for a in args if a is not None))
        return None

    for node in graph.nodes:
        if node.name not in bn_of_node or len(node.inputs) != 1:
            continue
        prod = nodes.get(node.inputs[0])
        if prod is None or prod.op != "conv" or "kernel" not in prod.params:
            continue
        kernel = prod.params["kernel"]
        if kernel not in reader.names():
            continue
        groups = int(prod.attrs.get("groups") or 1)
        depthwise = bool(prod.attrs.get("depthwise"))
        kind = layout if layout == "torch" else ("keras_dw" if depthwise else "keras")
        bias = prod.params.get("bias")
        src = feed(prod.inputs[0]) if len(prod.inputs) == 1 else None
        name = bn_of_node[node.name]
        links[name] = Link(name, kernel, kind, groups if src is not None else 0,
                           bias if bias in reader.names() else None, src)
    return links


# -- Keras: follow the config graph ------------------------------------------------

_KERAS_KERNELS = {"Conv1D", "Conv2D", "Conv3D", "Convolution1D", "Convolution2D",
                  "Convolution3D", "Dense", "DepthwiseConv1D", "DepthwiseConv2D"}
# inference-time identities: a channel's values pass unchanged
_KERAS_IDENTITY = re.compile(
    r"^(Dropout|SpatialDropout\dD|GaussianNoise|GaussianDropout|AlphaDropout|Identity|"
    r"ActivityRegularization|ZeroPadding\dD)$")
_KERAS_MAXPOOL = re.compile(r"^(MaxPooling\dD|MaxPool\dD)$")


def _keras_vars(reader: Reader, graph: KerasGraph) -> dict[str, dict[str, str]]:
    """Layer name -> {variable: tensor name} for kernels and biases."""
    names = {name for name in reader.names()
             if name not in reader.meta.auxiliary and not name.startswith("optimizer")}
    out: dict[str, dict[str, str]] = {}
    k3 = {**graph.k3_paths(), **reader.meta.layer_names}
    for name in names:
        m = re.match(r"^(.*)/vars/(\d+)$", name)
        if m and m.group(1) in k3:
            out.setdefault(k3[m.group(1)], {})[f"vars/{m.group(2)}"] = name
            continue
        parts = name.split("/")
        if len(parts) >= 2:
            var = parts[-1].split(":")[0]
            if var in ("kernel", "depthwise_kernel", "bias"):
                out.setdefault(parts[-2], {})[var] = name
    return out


def _keras_links(reader: Reader, layers: list[BNLayer], graph: KerasGraph) -> dict[str, Link]:
    tensors = _keras_vars(reader, graph)
    bn_names = {layer.name for layer in layers}
    links: dict[str, Link] = {}
    for layer in layers:
        spec = graph.layers.get(layer.name)
        if spec is None or len(spec.inputs) != 1:
            continue
        prod = graph.layers.get(spec.inputs[0])
        if prod is None or prod.class_name not in _KERAS_KERNELS:
            continue
        act = prod.config.get("activation", "linear")
        if act not in (None, "linear"):
            continue
        found = tensors.get(prod.name, {})
        depthwise = prod.class_name.startswith("Depthwise")
        kernel = (found.get("depthwise_kernel") if depthwise else None) or found.get("kernel") \
            or found.get("vars/0")
        if kernel is None:
            continue
        shape = reader.info(kernel).shape
        bias = found.get("bias") or (found.get("vars/1")
                                     if prod.config.get("use_bias", True) else None)
        if bias is not None and reader.info(bias).shape != (layer.channels,):
            bias = None
        if prod.config.get("use_bias", True) and bias is None:
            continue  # a bias we cannot find would shift the input unseen
        if depthwise:
            if shape[-2] * shape[-1] != layer.channels:
                continue
            groups, layout = shape[-2], "keras_dw"
        else:
            if shape[-1] != layer.channels:
                continue
            groups, layout = int(prod.config.get("groups", 1) or 1), "keras"
        feed = None
        if len(prod.inputs) == 1:
            feed = _keras_feed(graph, prod.inputs[0], bn_names, 0)
        links[layer.name] = Link(layer.name, kernel, layout, groups, bias, feed)
    return links


def _keras_feed(graph: KerasGraph, name: str, bns: set[str], depth: int) -> Feed | None:
    spec = graph.layers.get(name)
    if spec is None or depth > _MAX_DEPTH:
        return None
    if spec.is_model:
        return _keras_model_output(graph, spec, bns, depth)
    cls = spec.class_name
    if "BatchNormalization" in cls:
        return Feed("bn", name) if name in bns else None
    if len(spec.inputs) == 0:
        return None
    kind = _keras_activation(spec)
    if kind is not None:
        if len(spec.inputs) != 1:
            return None
        inner = _keras_feed(graph, spec.inputs[0], bns, depth + 1)
        if inner is None:
            return None
        return inner if kind == "linear" else Feed(kind, None, (inner,))
    if cls == "Add":
        terms = [_keras_feed(graph, s, bns, depth + 1) for s in spec.inputs]
        if not terms or any(t is None for t in terms):
            return None
        return Feed("add", None, tuple(t for t in terms if t is not None))
    if len(spec.inputs) != 1:
        return None
    if _KERAS_IDENTITY.match(cls):
        return _keras_feed(graph, spec.inputs[0], bns, depth + 1)
    if _KERAS_MAXPOOL.match(cls):
        inner = _keras_feed(graph, spec.inputs[0], bns, depth + 1)
        return None if inner is None else Feed("maxpool", None, (inner,))
    return None


def _keras_activation(spec: LayerSpec) -> str | None:
    """relu / relu6 / linear for the activations the refinement models, else None."""
    cls, cfg = spec.class_name, spec.config
    if cls == "ReLU":
        if float(cfg.get("negative_slope") or 0.0) or float(cfg.get("threshold") or 0.0):
            return None
        mv = cfg.get("max_value")
        if mv is None:
            return "relu"
        return "relu6" if float(mv) == 6.0 else None
    if cls == "Activation":
        act = cfg.get("activation")
        if isinstance(act, dict):
            act = (act.get("config") or {}).get("name") if isinstance(
                act.get("config"), dict) else act.get("class_name")
        act = str(act or "").lower()
        return act if act in ("relu", "relu6", "linear") else None
    return None


def _keras_model_output(graph: KerasGraph, spec: LayerSpec, bns: set[str],
                        depth: int) -> Feed | None:
    outs = graph.scope_outputs(spec.name)
    if len(outs) != 1:
        return None
    return _keras_feed(graph, next(iter(outs)), bns, depth + 1)


# -- PyTorch: torchvision-style module names ----------------------------------------

def _torch_links(reader: Reader, layers: list[BNLayer]) -> dict[str, Link]:
    order = [name for name in reader.names() if name not in reader.meta.auxiliary]
    shapes = _Shapes(reader)
    modules = _module_order(order)
    bn_by_module = {layer.name: layer for layer in layers}
    block_inputs = _resnet_block_inputs(layers)
    links: dict[str, Link] = {}
    for layer in layers:
        conv = _torch_producer(layer.name, shapes)
        if conv is None:
            continue
        kshape = shapes[f"{conv}.weight"]
        if len(kshape) < 3 or kshape[0] != layer.channels:
            continue
        bias = f"{conv}.bias" if f"{conv}.bias" in shapes else None
        if bias is not None and shapes[bias] != (layer.channels,):
            continue
        feed, groups = None, 0
        block = re.sub(r"\.(conv1|downsample\.0)$", "", conv)
        block_input = block_inputs.get(block) if block != conv else None
        if block_input is not None:
            cin = _channels(block_input, bn_by_module)
            if cin == kshape[1]:  # a plain conv reading every channel of the block input
                feed, groups = block_input, 1
        up = _torch_upstream(conv, modules, bn_by_module)
        # only an activated upstream: a linear BN output often also feeds a residual
        # sum that the names do not show
        if feed is None and up is not None and up.consumer in ("relu", "relu6"):
            per_group = kshape[1]
            if up.channels % per_group == 0 and layer.channels % (up.channels // per_group) == 0:
                groups = up.channels // per_group
                feed = Feed(up.consumer, None, (Feed("bn", up.name),))
        if feed is None and kshape[1] != 1:
            groups = 1  # a plain conv; a (C, 1, k, k) kernel may be depthwise: unknown
        links[layer.name] = Link(layer.name, f"{conv}.weight", "torch", groups, bias, feed)
    return links


_RESNET_BLOCK = re.compile(r"^(.*?)layer(\d+)\.(\d+)\.bn1$")


def _resnet_block_inputs(layers: list[BNLayer]) -> dict[str, Feed]:
    """Block prefix -> what the block reads, for torchvision-style ResNets.

    Only when the consumers came from a shipped ResNet preset (the names were
    recognised as torchvision's ``layerL.B`` blocks): a block's output is
    relu(last BN + shortcut), the shortcut being ``downsample.1`` or the block's
    own input. The stem's output may pass a max pool (torchvision) or not: that
    term keeps its range only, which is valid either way.
    """
    by_name = {layer.name: layer for layer in layers}
    sources = {layer.consumer_source for layer in layers}
    family = next((s.split(":", 1)[1] for s in sources
                   if s in ("preset:resnet_basic", "preset:resnet_bottleneck")), None)
    found = [m for m in (_RESNET_BLOCK.match(layer.name) for layer in layers) if m]
    prefixes = {m.group(1) for m in found}
    if family is None or len(prefixes) != 1:
        return {}
    pre = prefixes.pop()  # e.g. Lightning's "model."
    if f"{pre}bn1" not in by_name:
        return {}
    last = "bn3" if family == "resnet_bottleneck" else "bn2"
    blocks = sorted((int(m.group(2)), int(m.group(3))) for m in found)
    out: dict[str, Feed] = {}
    current = Feed("maxpool", None, (Feed("relu", None, (Feed("bn", f"{pre}bn1"),)),))
    for stage, block in blocks:
        prefix = f"{pre}layer{stage}.{block}"
        if f"{prefix}.{last}" not in by_name:
            return out
        out[prefix] = current
        down = f"{prefix}.downsample.1"
        skip = Feed("bn", down) if down in by_name else current
        current = Feed("relu", None, (Feed("add", None, (Feed("bn", f"{prefix}.{last}"), skip)),))
    return out


def _channels(feed: Feed, bns: dict[str, BNLayer]) -> int | None:
    if feed.op == "bn":
        layer = bns.get(feed.bn or "")
        return None if layer is None else layer.channels
    counts = {_channels(a, bns) for a in feed.args}
    return counts.pop() if len(counts) == 1 else None


def _module_order(names: list[str]) -> list[str]:
    """Module paths in state_dict order (registration order: usually forward order)."""
    seen: dict[str, None] = {}
    for name in names:
        if "." in name:
            seen.setdefault(name.rsplit(".", 1)[0], None)
    return list(seen)


# a transposed conv stores (in, out, ...): read as (out, in, ...) its sums would be wrong
_TRANSPOSED = re.compile(r"(deconv|transpose|convt|upconv|upsampl|\bup)", re.IGNORECASE)


class _Shapes(Mapping[str, tuple[int, ...]]):
    """Tensor shapes looked up on demand (a lazy reader opens only what is asked)."""

    def __init__(self, reader: Reader):
        self._reader, self._names = reader, set(reader.names())

    def __getitem__(self, name: str) -> tuple[int, ...]:
        if name not in self._names:
            raise KeyError(name)
        return self._reader.info(name).shape

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _torch_producer(bn: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """``P.bnK`` <- ``P.convK``; ``P.bn`` <- ``P.conv``; ``S.i`` <- ``S.(i-1)``."""
    if _TRANSPOSED.search(bn):
        return None
    parent, _, leaf = bn.rpartition(".")
    pre = f"{parent}." if parent else ""
    cands: list[str] = []
    m = re.fullmatch(r"(bn|norm|batchnorm)(\d*)", leaf)
    if m:
        cands.append(f"{pre}conv{m.group(2)}")
    if leaf.isdigit() and int(leaf) > 0:
        cands.append(f"{pre}{int(leaf) - 1}")
    for cand in cands:
        if f"{cand}.weight" in shapes and f"{cand}.running_mean" not in shapes:
            return cand
    return None


def _torch_upstream(conv: str, modules: list[str], bns: dict[str, BNLayer]) -> BNLayer | None:
    """The BN whose (activated) output ``conv`` reads, when the names make it certain.

    ``P.convK`` reads ``P.bn(K-1)`` (ResNet blocks). The first module ``S.0`` of
    a sequential ``S`` reads the last BN of the sibling container just before
    ``S`` (MobileNet-style ``expand`` -> ``dw``), provided that container ends in
    a BN. Block inputs (residual sums, pooling, the image) are never guessed.
    """
    parent, _, leaf = conv.rpartition(".")
    pre = f"{parent}." if parent else ""
    m = re.fullmatch(r"conv(\d+)", leaf)
    if m and int(m.group(1)) >= 2:
        return bns.get(f"{pre}bn{int(m.group(1)) - 1}")
    if leaf != "0" or not parent:
        return None
    grand, _, own = parent.rpartition(".")
    gpre = f"{grand}." if grand else ""
    siblings: list[str] = []
    for mod in modules:
        if mod == parent or mod.startswith(f"{parent}."):
            break
        if mod.startswith(gpre):
            head = mod[len(gpre):].split(".", 1)[0]
            if head not in siblings:
                siblings.append(head)
    if not siblings or not own:
        return None
    prev = f"{gpre}{siblings[-1]}"
    inside = [mod for mod in modules if mod.startswith(f"{prev}.")]
    if not inside or inside[-1] not in bns:
        return None
    return bns[inside[-1]]
