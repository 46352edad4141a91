"""What to do about dead structures after training: a prune plan per BN layer.

- **remove** (dead channels of a BN that feeds a ReLU / ReLU6): the channel's output
  is always 0, so the producing conv / dense filter, the BN channel and the next
  layer's input slice for that channel can go without changing the network's output;
- **fold** (constant channels, ReLU-fed or linear): the output is a constant ``c``
  whatever the input, so the channel can go once ``c x`` the next layer's input
  slice is added to that layer's bias (with padding this is exact only away from the
  borders);
- **tied**: dead or constant channels of a BN whose output feeds an ``Add`` (a
  residual sum): the channel index is shared by every member of the residual group,
  so it can only go if it is removable in all of them; listed, never counted as saved.

Parameters saved count the producer filter (kernel slice + bias), the BN channel
(gamma, beta, running mean and variance: 4) and the next layers' input slices. The
next layer comes from the producer links of the graph when the checkpoint has one
(``source: graph``), else from the file's tensor order and shapes (``order``: the
first kernel after the BN that reads as many channels), else it is unknown and the
plan says so. FLOPs need the spatial size of every layer, which a checkpoint does
not store: they are not estimated.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bnexporter.detection.discovery import discover
from bnexporter.detection.links import find_links
from bnexporter.detection.wiring import Feed, Link
from bnexporter.formats.base import Reader
from bnexporter.report import RELU_LIKE, CheckpointReport, LayerReport
from bnexporter.topology.consumers import ConsumerRules

BN_PARAMS = 4  # gamma, beta, running mean, running variance


@dataclass(frozen=True)
class Kernel:
    name: str
    shape: tuple[int, ...]
    layout: str  # keras (..., in, out), keras_dw (kh, kw, in, mult), torch (out, in/g, ...)
    groups: int = 1

    @property
    def out_channels(self) -> int:
        if self.layout == "keras_dw":
            return self.shape[-2] * self.shape[-1]
        return self.shape[-1] if self.layout == "keras" else self.shape[0]

    @property
    def in_channels(self) -> int:
        if self.layout == "keras_dw":
            return self.shape[-2]
        if self.layout == "keras":
            return self.shape[-2] if len(self.shape) >= 2 else 0
        return self.shape[1] * max(1, self.groups) if len(self.shape) >= 2 else 0

    @property
    def depthwise(self) -> bool:
        return self.layout == "keras_dw" or (self.layout == "torch" and self.groups > 1
                                              and self.shape[1] == 1)

    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def per_out(self) -> int:
        return self.size() // self.out_channels if self.out_channels else 0

    def per_in(self) -> int:
        if self.depthwise:
            return self.per_out()  # the channel's own filter
        return self.size() // self.in_channels if self.in_channels else 0


@dataclass(frozen=True)
class LayerPlan:
    layer: str
    consumer: str
    remove: list[int] = field(default_factory=list)
    fold: list[int] = field(default_factory=list)
    tied: list[int] = field(default_factory=list)
    producer: str | None = None
    next_layers: list[str] = field(default_factory=list)
    next_source: str = "none"  # graph, order or none
    params_saved: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PrunePlan:
    layers: list[LayerPlan] = field(default_factory=list)
    params_saved: int = 0
    channels_removable: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"params_saved": self.params_saved,
                "channels_removable": self.channels_removable,
                "flops_saved": None, "notes": list(self.notes),
                "layers": [asdict(p) for p in self.layers if p.remove or p.fold or p.tied]}


def _layout(framework_keras: bool, shape: Sequence[int]) -> str:
    if framework_keras:
        return "keras_dw" if len(shape) == 4 and shape[-1] == 1 else "keras"
    return "torch"


def _reads(feed: Feed | None, through_add: bool = False) -> dict[str, str]:
    """Every BN ``feed`` reads: 'add' when a residual sum is on the way, else 'direct'
    (one walk per link, instead of one per link and layer)."""
    out: dict[str, str] = {}
    if feed is None:
        return out
    if feed.op == "bn" and feed.bn is not None:
        return {feed.bn: "add" if through_add else "direct"}
    for arg in feed.args:
        for bn, how in _reads(arg, through_add or feed.op == "add").items():
            out[bn] = "add" if how == "add" or out.get(bn) == "add" else how
    return out


class _Model:
    """Shapes, tensor order and links of one checkpoint: producers and next layers."""

    def __init__(self, report: CheckpointReport, links: Mapping[str, Link] | None,
                 shapes: Mapping[str, Sequence[int]] | None):
        fmt = report.format or ""
        self.keras = fmt.startswith("keras") or fmt == "tf_bundle"
        self.links = links or {}
        self.order = [t.name for t in report.tensors]
        self.shapes: dict[str, tuple[int, ...]] = {t.name: tuple(t.shape)
                                                   for t in report.tensors}
        self.shapes.update({k: tuple(v) for k, v in (shapes or {}).items()})
        self.kernels = {t.name for t in report.tensors if t.role == "kernel"}
        self.kernels |= {link.kernel for link in self.links.values()}
        # indexes built once: a plan is linear in the model, not layers x tensors
        self.pos = {n: i for i, n in enumerate(self.order)}
        self.kernel_pos = sorted(self.pos[k] for k in self.kernels if k in self.pos)
        self.readers: dict[str, list[tuple[Link, str]]] = {}
        for link in self.links.values():
            for bn, how in _reads(link.feed).items():
                self.readers.setdefault(bn, []).append((link, how))

    def kernel(self, name: str | None, link: Link | None = None) -> Kernel | None:
        if name is None or name not in self.shapes:
            return None
        shape = self.shapes[name]
        if link is not None:
            return Kernel(name, shape, link.layout, link.groups or 1)
        return Kernel(name, shape, _layout(self.keras, shape))

    @staticmethod
    def mine(name: str, layer: LayerReport) -> bool:
        return any(name.startswith(layer.name + sep) for sep in "/.") \
            or f"/{layer.name}/" in name

    def bn_first(self, layer: LayerReport) -> int | None:
        if layer.mean_tensor in self.pos:  # a BN's vectors sit together: back to the first
            i = self.pos[layer.mean_tensor]
            while i > 0 and self.mine(self.order[i - 1], layer):
                i -= 1
            return i
        return next((i for i, n in enumerate(self.order) if self.mine(n, layer)), None)

    def producer(self, layer: LayerReport) -> Kernel | None:
        if layer.name in self.links:
            return self.kernel(self.links[layer.name].kernel, self.links[layer.name])
        if layer.producer in self.shapes:
            return self.kernel(layer.producer)
        first = self.bn_first(layer)
        if first is None:
            return None
        at = bisect.bisect_left(self.kernel_pos, first)
        if at == 0:
            return None
        k = self.kernel(self.order[self.kernel_pos[at - 1]])
        return k if k is not None and k.out_channels == layer.channels else None

    def next_layers(self, layer: LayerReport) -> tuple[list[Kernel], str, bool]:
        nxt, tied = [], False
        for link, how in self.readers.get(layer.name, []):
            tied = tied or how == "add"
            k = self.kernel(link.kernel, link) if how == "direct" else None
            if k is not None:
                nxt.append(k)
        if nxt or tied:
            return nxt, "graph", tied
        first = self.bn_first(layer)
        after = None
        if first is not None:
            for i in self.kernel_pos[bisect.bisect_left(self.kernel_pos, first):]:
                if not self.mine(self.order[i], layer):
                    after = self.order[i]
                    break
        k = self.kernel(after) if after else None
        if k is not None and k.in_channels == layer.channels:
            return [k], "order", False
        return [], "none", False

    def bias_of(self, k: Kernel) -> bool:
        base = k.name.rsplit("/", 1)[0] + "/bias" if "/" in k.name \
            else k.name.rsplit(".", 1)[0] + ".bias"
        return base in self.shapes


_TIED_ADD = ("feeds an Add: the channel is shared by the residual group; remove it only "
             "where every member of the group can lose it")
_TIED_REACH = "its output reaches an Add: the channel is tied across the residual group"


def _layer_plan(model: _Model, layer: LayerReport) -> LayerPlan | None:
    relu = layer.consumer in RELU_LIKE
    dead = list(layer.dead) if relu else []
    const = [i for i in layer.constant if i not in set(dead)] \
        if layer.consumer in (*RELU_LIKE, "linear") else []
    if layer.consumer == "add":
        tied = sorted({*layer.constant, *layer.would_be_dead, *layer.collapsed_gamma})
        return LayerPlan(layer.name, layer.consumer, tied=tied, notes=[_TIED_ADD]) \
            if tied else None
    if not dead and not const:
        return None
    prod = model.producer(layer)
    nxt, source, tied_res = model.next_layers(layer)
    names = [k.name for k in nxt]
    if tied_res:
        return LayerPlan(layer.name, layer.consumer, tied=sorted({*dead, *const}),
                         producer=prod.name if prod else None, next_layers=names,
                         next_source=source, notes=[_TIED_REACH])
    notes: list[str] = []
    per = BN_PARAMS
    if prod is not None:
        per += prod.per_out() + (1 if model.bias_of(prod) else 0)
    else:
        notes.append("producer not known: its filters are not counted")
    per += sum(k.per_in() for k in nxt)
    if any(k.depthwise for k in nxt):
        notes.append("next is a depthwise conv: its channel (and that BN's) goes too")
    if not nxt:
        notes.append("next layer not known: its input slice is not counted")
    return LayerPlan(layer.name, layer.consumer, dead, const, [],
                     prod.name if prod else None, names, source,
                     per * (len(dead) + len(const)), notes)


def plan(report: CheckpointReport, links: Mapping[str, Link] | None = None,
         shapes: Mapping[str, Sequence[int]] | None = None) -> PrunePlan:
    """The prune plan of one analysed checkpoint.

    ``links`` (``detection.links.find_links``) and ``shapes`` (tensor name -> shape)
    come from the reader when there is one; without them the report's own tensors
    (a full scan) give the shapes and the tensor order gives the next layers."""
    model = _Model(report, links, shapes)
    out = [p for layer in report.bn_layers if (p := _layer_plan(model, layer)) is not None]
    total = sum(p.params_saved for p in out)
    removable = sum(len(p.remove) + len(p.fold) for p in out)
    notes = ["parameters saved assume each listed channel is removed from its producer, "
             "its BN and its next layers; FLOPs are not estimated (a checkpoint stores no "
             "spatial sizes)"]
    if not links:
        notes.append("no graph links: next layers inferred from the tensor order and shapes")
    return PrunePlan(out, total, removable, notes)


def from_reader(report: CheckpointReport, reader: Reader, rules: ConsumerRules | None = None,
                eps: float | None = None) -> PrunePlan:
    """The plan with the graph's producer links and every tensor's shape (a second,
    metadata-only pass over the open checkpoint)."""
    try:
        layers = discover(reader, rules, eps)
        links = find_links(reader, layers)
    except (KeyError, ValueError, TypeError, IndexError):
        links = {}
    shapes = {name: reader.info(name).shape for name in reader.names()}
    if not report.tensors:  # a BN-only scan: the order comes from the file
        from bnexporter.report import TensorReport
        kernels = {link.kernel for link in links.values()}
        tensors = [TensorReport(n, list(shapes[n]), "", 0, 0, 0, 0, 0.0,
                                role="kernel" if n in kernels else "other")
                   for n in reader.names()]
        from dataclasses import replace
        report = replace(report, tensors=tensors)
    return plan(report, links, shapes)


def for_path(report: CheckpointReport, rules: ConsumerRules | None = None,
             eps: float | None = None) -> PrunePlan | None:
    """``from_reader`` on the checkpoint ``report`` describes; None if it is unreadable."""
    from bnexporter.errors import CheckpointError
    from bnexporter.formats.sniff import open_reader
    if not report.ok:
        return None
    try:
        with open_reader(report.path) as reader:
            return from_reader(report, reader, rules, eps)
    except (CheckpointError, OSError, MemoryError, RecursionError):
        return plan(report)
