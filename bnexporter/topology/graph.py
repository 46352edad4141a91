"""One graph description for every source of topology.

Keras configs, TF graphs, torch module trees, TorchScript / ``torch.export``
archives and ``describe`` JSON files all say the same thing in different words:
which operations exist, in what order, fed by what, reading which checkpoint
tensors. They are translated into this small IR once, so that consumer
inference, producer links and the census engine read one shape of data.

Op vocabulary (``Node.op``):
  conv      attrs: stride (h, w), padding "same"|"valid"|(top, bottom, left, right),
            dilation (h, w), groups; params: kernel, bias?
            kernel layout is in ``Graph.kernel_layout`` ("hwio" Keras / TF, "oihw" torch)
  dense     params: kernel, bias?   (kernel layout "io" Keras, "oi" torch)
  bn        attrs: eps; params: gamma?, beta?, mean, var
  relu, relu6, silu, hardswish, sigmoid, tanh, gelu, leaky_relu, softmax, activation
            elementwise; ``activation`` carries attrs["name"] for anything else
  add, mul, concat (attrs: axis, in the graph's layout), maxpool / avgpool (attrs: pool,
  stride, padding), gap (global average pool), gmp, flatten, reshape, pad (attrs: pads),
  identity (dropout, noise, ...), input, output, other (attrs["name"])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

OPS = frozenset({
    "input", "output", "conv", "dense", "bn", "relu", "relu6", "silu", "hardswish",
    "sigmoid", "tanh", "gelu", "leaky_relu", "softmax", "activation", "add", "mul",
    "concat", "maxpool", "avgpool", "gap", "gmp", "flatten", "reshape", "pad",
    "identity", "other",
})


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...] = ()
    # role -> checkpoint tensor name ("kernel", "bias", "gamma", "beta", "mean", "var")
    params: Mapping[str, str] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Graph:
    """Nodes in a topological order (the model's own order where it has one)."""

    nodes: tuple[Node, ...]
    source: str                 # "config", "graph:savedmodel", "graph:torchscript", ...
    layout: str = "nhwc"        # activation layout: "nhwc" (Keras / TF) or "nchw" (torch)
    kernel_layout: str = "hwio"  # "hwio" (Keras / TF) or "oihw" (torch)
    input_shape: tuple[int, ...] | None = None  # one sample, in ``layout``, when known

    def by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def needed_by(self, names: list[str]) -> list[Node]:
        """The nodes ``names`` depend on (themselves included), in graph order: what a
        forward pass must run to reach them (a classifier head after the last BN is not)."""
        by = self.by_name()
        needed: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in needed or name not in by:
                continue
            needed.add(name)
            todo.extend(by[name].inputs)
        return [n for n in self.nodes if n.name in needed]

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for src in n.inputs:
                out.setdefault(src, []).append(n.name)
        return out
