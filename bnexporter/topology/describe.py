"""``bnexporter describe MODULE:FACTORY``: write a graph description once, where torch is
installed, so later scans of the model's state_dicts know every BN's consumer.

This is the one place bnexporter runs model code, and only code the user names on the
command line: the factory is imported and called, the model traced with
``torch.fx.symbolic_trace`` (or, when tracing fails, run once on a zero input with forward
hooks recording which module's output each module reads). The result is written with
:func:`bnexporter.topology.torch_graph.write_graph_json`.
"""

from __future__ import annotations

import argparse
import importlib
import operator
from typing import Any

from bnexporter.topology.graph import Graph, Node
from bnexporter.topology.torch_graph import _Builder, _conv_attrs, write_graph_json


def _load_factory(spec: str) -> Any:
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise SystemExit(f"describe: expected MODULE:FACTORY, got {spec!r}")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _literal(text: str) -> Any:
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _module_node(b: _Builder, torch: Any, path: str, m: Any, ins: tuple[str, ...]) -> str:
    nn = torch.nn
    keys = {k: f"{path}.{k}" for k, v in list(m.named_parameters(recurse=False))
            + list(m.named_buffers(recurse=False)) if v is not None}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        params = {r: keys[a] for r, a in (("gamma", "weight"), ("beta", "bias"),
                                           ("mean", "running_mean"), ("var", "running_var"))
                  if a in keys}
        return b.add(path, "bn", ins, params, {"eps": float(m.eps)})
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        params = {"kernel": keys["weight"], **({"bias": keys["bias"]} if "bias" in keys else {})}
        return b.add(path, "conv", ins, params,
                     _conv_attrs(m.stride, m.padding, m.dilation, m.groups))
    if isinstance(m, nn.Linear):
        params = {"kernel": keys["weight"], **({"bias": keys["bias"]} if "bias" in keys else {})}
        return b.add(path, "dense", ins, params)
    simple = ((nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.SiLU, "silu"),
              (nn.Hardswish, "hardswish"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"),
              (nn.GELU, "gelu"), (nn.Flatten, "flatten"), (nn.Dropout, "identity"),
              (nn.Dropout2d, "identity"), (nn.Identity, "identity"), (nn.MaxPool2d, "maxpool"))
    for cls, op in simple:
        if isinstance(m, cls):
            return b.add(path, op, ins)
    if isinstance(m, nn.Hardtanh) and m.min_val == 0 and m.max_val == 6:
        return b.add(path, "relu6", ins)
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        return b.add(path, "gap", ins, attrs={"keepdims": True})
    return b.add(path, "other", ins, attrs={"name": type(m).__qualname__})


def _from_fx(torch: Any, model: Any) -> Graph:
    from torch import fx
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    b = _Builder()
    env: dict[Any, str] = {}
    fn_ops = {operator.add: "add", operator.iadd: "add", torch.add: "add", torch.cat: "concat",
              torch.flatten: "flatten", torch.relu: "relu", torch.nn.functional.relu: "relu",
              operator.mul: "mul", torch.mul: "mul", torch.nn.functional.silu: "silu",
              torch.nn.functional.relu6: "relu6", torch.nn.functional.hardswish: "hardswish"}
    for n in gm.graph.nodes:
        ins = tuple(env[a] for a in n.all_input_nodes if a in env)
        if n.op == "placeholder":
            env[n] = b.add(n.name, "input", attrs={"shape": None})
        elif n.op == "call_module":
            env[n] = _module_node(b, torch, n.target, mods[n.target], ins)
        elif n.op == "call_function" and n.target in fn_ops:
            attrs = {"axis": n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)} \
                if fn_ops[n.target] == "concat" else {}
            env[n] = b.add(n.name, fn_ops[n.target], ins, attrs=attrs)
        elif n.op == "output":
            b.add("output", "output", ins)
        elif n.op == "get_attr":
            continue
        else:
            name = getattr(n.target, "__name__", str(n.target))
            env[n] = b.add(n.name, "other", ins, attrs={"name": str(name)})
    return Graph(tuple(b.nodes), source="describe:fx", layout="nchw", kernel_layout="oihw")


def _from_hooks(torch: Any, model: Any, shape: tuple[int, ...]) -> Graph:
    """Leaf modules in call order, each fed by the leaf whose output tensor it reads."""
    b = _Builder()
    produced: dict[int, str] = {}
    x = torch.zeros((1, *shape))
    produced[id(x)] = b.add("input", "input", attrs={"shape": list(shape)})
    handles = []

    def hook(path: str):
        def fn(m: Any, args: tuple, out: Any) -> None:
            ins = tuple(produced.get(id(a), "") for a in args if torch.is_tensor(a))
            known = tuple(i for i in ins if i)
            if len(known) != len(ins):  # fed by an op we did not see: unknown dataflow
                known = (b.add(f"{path}/unknown", "other", known, attrs={"name": "unseen op"}),)
            name = _module_node(b, torch, path, m, known)
            if torch.is_tensor(out):
                produced[id(out)] = name
        return fn
    for path, m in model.named_modules():
        if path and not list(m.children()):
            handles.append(m.register_forward_hook(hook(path)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return Graph(tuple(b.nodes), source="describe:hooks", layout="nchw", kernel_layout="oihw",
                 input_shape=tuple(shape))


def describe(factory_spec: str, args: list[str] | None = None,
             input_shape: tuple[int, ...] | None = None, out: str = "model.graph.json"
             ) -> Graph:
    """Build the model from ``factory_spec`` (``MODULE:FACTORY``, called with ``args``
    parsed as Python literals), translate its graph and write it to ``out``."""
    import torch  # only here: describe runs where torch is installed

    factory = _load_factory(factory_spec)
    model = factory(*[_literal(a) for a in (args or [])])
    model.eval()
    shape = tuple(input_shape[1:]) if input_shape and len(input_shape) == 4 else input_shape
    try:
        graph = _from_fx(torch, model)
        if shape:
            graph = Graph(graph.nodes, graph.source, graph.layout, graph.kernel_layout,
                          tuple(shape))
    except Exception:
        graph = _from_hooks(torch, model, tuple(shape or (3, 224, 224)))
    write_graph_json(graph, out)
    return graph


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bnexporter describe")
    p.add_argument("factory", help="MODULE:FACTORY returning an nn.Module")
    p.add_argument("--arg", action="append", default=[], help="factory argument (literal)")
    p.add_argument("--input-shape", default="1,3,224,224")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    shape = tuple(int(v) for v in a.input_shape.split(",") if v)
    g = describe(a.factory, a.arg, shape, a.output)
    print(f"{a.output}: {sum(n.op == 'bn' for n in g.nodes)} BN layers ({g.source})")
    return 0


__all__ = ["Node", "describe", "main"]
