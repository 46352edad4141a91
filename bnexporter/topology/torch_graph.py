"""Graphs that PyTorch files carry, translated into the shared IR without torch.

Sources (each returns a :class:`~bnexporter.topology.graph.Graph`, or ``None`` when the
file is not of that kind):

* :func:`graph_from_export`: ``torch.export.save`` archives (``.pt2``): the serialized
  ``ExportedProgram`` JSON (``<root>/models/*.json``); placeholders map to state_dict keys
  through the graph signature's parameter / buffer input specs.
* :func:`graph_from_torchscript`: ``torch.jit.save`` archives. The ``code/`` files are
  parsed with :mod:`ast` and interpreted symbolically (never executed, never imported):
  ``self.<attr>`` is followed through the classes' attribute types, child forwards are
  inlined, tensor ops become IR nodes, unknown calls become ``other``.
* :func:`graph_from_module_tree`: full-module pickles (``torch.save(model)``): the module
  tree from the restricted unpickler. Only dataflow that is certain is emitted
  (``nn.Sequential`` order, known library blocks); every other BN's consumer is unknown.
* :func:`graph_from_json` / :func:`write_graph_json`: the versioned graph description
  file (``docs/graph-description.md``).

Node names of conv / bn / dense nodes are module paths (``layer1.0.bn1``); their
``params`` are state_dict keys (``layer1.0.bn1.running_mean``).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from bnexporter.errors import CheckpointError
from bnexporter.formats.torch_export import MAX_PROGRAM
from bnexporter.topology.graph import OPS, Graph, Node

MAX_MEMBER = 64 << 20
MAX_NODES = 200_000
MAX_DEPTH = 64


# -- zip access ---------------------------------------------------------------------------

def _zip_members(path: str) -> tuple[Any, dict[str, Any]] | None:
    from bnexporter.formats import zipmember
    from bnexporter.formats.base import RangeFile

    f = RangeFile(path)
    try:
        head = f.read(0, min(4, f.size))
        if head != b"PK\x03\x04":
            f.close()
            return None
        return f, zipmember.read_directory(f)
    except Exception:
        f.close()
        raise


def _read(f: Any, entry: Any, limit: int = MAX_MEMBER) -> bytes:
    from bnexporter.formats import zipmember
    return zipmember.read_member(f, entry, limit)


# -- builder shared by the sources ---------------------------------------------------------

class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.names: set[str] = set()
        self.counts: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        base = base or "node"
        if base not in self.names:
            return base
        n = self.counts.get(base, 0)
        while True:
            n += 1
            cand = f"{base}_{n}"
            if cand not in self.names:
                self.counts[base] = n
                return cand

    def add(self, base: str, op: str, inputs: tuple[str, ...] = (),
            params: dict[str, str] | None = None, attrs: dict[str, Any] | None = None) -> str:
        if len(self.nodes) >= MAX_NODES:
            raise _TooBig()
        name = self.fresh(base)
        self.names.add(name)
        self.nodes.append(Node(name, op, tuple(inputs), dict(params or {}), dict(attrs or {})))
        return name


class _TooBig(Exception):
    pass


def _param_module(params: dict[str, str]) -> str:
    for role in ("mean", "gamma", "kernel", "var", "beta", "bias"):
        if role in params:
            return params[role].rsplit(".", 1)[0]
    return ""


def _pair(v: Any, default: int = 1) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        vals = [int(x) for x in v if isinstance(x, (int, float))]
        if len(vals) == 1:
            return (vals[0], vals[0])
        if len(vals) >= 2:
            return (vals[0], vals[1])
        return (default, default)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (int(v), int(v))
    return (default, default)


def _conv_attrs(stride: Any, padding: Any, dilation: Any, groups: Any) -> dict[str, Any]:
    if isinstance(padding, str):
        pad: Any = padding
    else:
        ph, pw = _pair(padding, 0)
        pad = (ph, ph, pw, pw)
    g = int(groups) if isinstance(groups, int) and not isinstance(groups, bool) else 1
    return {"stride": _pair(stride), "padding": pad, "dilation": _pair(dilation), "groups": g}


# ==========================================================================================
# torch.export (.pt2)
# ==========================================================================================

_EXPORT_PASS = {"dropout", "clone", "contiguous", "alias", "detach", "_to_copy", "to",
                "lift_fresh_copy", "native_dropout"}


def graph_from_export(path: str) -> Graph | None:
    """The IR of a ``torch.export.save`` archive, or None when ``path`` is not one."""
    opened = _zip_members(path)
    if opened is None:
        return None
    f, entries = opened
    try:
        cands = [n for n in entries
                 if re.search(r"(^|/)models/[^/]+\.json$", n)
                 or n.endswith("serialized_exported_program.json")]
        if not cands:
            return None
        # a program JSON of 64 MB of "[]," took 1.7 GB once parsed: the reader's cap
        raw = _read(f, entries[sorted(cands)[0]], MAX_PROGRAM)
    finally:
        f.close()
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"exported program JSON is invalid: {exc}") from None
    try:
        return _export_ir(doc)
    except _TooBig:
        raise CheckpointError(path, f"exported graph has more than {MAX_NODES} nodes",
                              "too_large") from None
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise CheckpointError(path, f"exported program JSON has an unexpected shape: "
                              f"{exc.__class__.__name__}: {exc}") from None


def _arg_value(arg: Any, env: dict[str, Any]) -> Any:
    """A serialized argument: a tensor reference -> env value, else the literal."""
    if not isinstance(arg, dict) or not arg:
        return None
    kind, val = next(iter(arg.items()))
    if kind == "as_tensor":
        return env.get(val["name"], ("unknown", val["name"]))
    if kind == "as_tensors":
        return [env.get(v["name"], ("unknown", v["name"])) for v in val]
    if kind in ("as_int", "as_float", "as_bool", "as_string", "as_ints", "as_floats",
                "as_bools", "as_strings"):
        return val
    if kind == "as_none":
        return None
    return ("unknown", kind)


def _export_ir(doc: dict[str, Any]) -> Graph:
    gm = doc.get("graph_module", doc)
    graph = gm["graph"]
    sig = gm.get("signature") or {}
    b = _Builder()
    env: dict[str, Any] = {}  # value name -> ("node", ir name) | ("param", key) | ...
    for spec in sig.get("input_specs", []):
        kind, body = next(iter(spec.items()))
        arg = body.get("arg") or {}
        name = arg.get("name") or (arg.get("as_tensor") or {}).get("name")
        if not name:
            continue
        if kind == "parameter":
            env[name] = ("param", body["parameter_name"])
        elif kind == "buffer":
            env[name] = ("param", body["buffer_name"])
        elif kind in ("tensor_constant", "constant_tensor"):
            env[name] = ("param", body.get("tensor_constant_name", name))
        elif kind == "user_input":
            env[name] = ("node", b.add(name, "input", attrs={"shape": None}))
    for inp in graph.get("inputs", []):
        t = (inp.get("as_tensor") or {}).get("name") if isinstance(inp, dict) else None
        if t and t not in env:
            env[t] = ("node", b.add(t, "input", attrs={"shape": None}))
    for node in graph["nodes"]:
        target = str(node.get("target", ""))
        args: dict[str, Any] = {}
        pos: list[Any] = []
        for inp in node.get("inputs", []):
            v = _arg_value(inp.get("arg"), env)
            args[inp.get("name", "")] = v
            pos.append(v)
        outs = node.get("outputs", [])
        out_names: list[str] = []
        for o in outs:
            if "as_tensor" in o:
                out_names.append(o["as_tensor"]["name"])
            elif "as_tensors" in o:
                out_names.extend(t["name"] for t in o["as_tensors"])
        m = re.match(r"^torch\.ops\.aten\.([A-Za-z0-9_]+)(\.[A-Za-z0-9_]+)?$", target)
        op = m.group(1) if m else target
        result = _torch_op(b, op, pos, args, hint=out_names[0] if out_names else op)
        if target in ("_operator.getitem", "getitem"):
            src, idx = [*pos, None, None][:2]
            result = src if idx == 0 and isinstance(src, tuple) and src[0] == "node" \
                else ("unknown", "getitem")
        for i, n in enumerate(out_names):
            env[n] = result if i == 0 else ("unknown", n)
    outputs = []
    for o in graph.get("outputs", []):
        t = (o.get("as_tensor") or {}).get("name") if isinstance(o, dict) else None
        v = env.get(t) if t else None
        if isinstance(v, tuple) and v[0] == "node":
            outputs.append(v[1])
    if outputs:
        b.add("output", "output", tuple(outputs))
    return Graph(tuple(b.nodes), source="graph:export", layout="nchw", kernel_layout="oihw")


# -- the op table shared by torch.export and TorchScript ------------------------------------

def _tensors(values: Any) -> list[str]:
    """IR node names of the tensor values in ``values`` (nested lists included)."""
    out: list[str] = []
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "node":
            out.append(v[1])
        elif isinstance(v, list):
            stack.extend(reversed(v))
    return out


def _key(v: Any) -> str | None:
    return v[1] if isinstance(v, tuple) and len(v) == 2 and v[0] == "param" else None


def _roles(pairs: tuple[tuple[str, Any], ...]) -> dict[str, str]:
    """role -> state_dict key for the arguments that are checkpoint tensors."""
    out: dict[str, str] = {}
    for role, v in pairs:
        k = _key(v)
        if k:
            out[role] = k
    return out


def _get(pos: list[Any], args: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if name in args:
        return args[name]
    return pos[i] if i < len(pos) else default


_ACTS = {"relu": "relu", "relu_": "relu", "silu": "silu", "silu_": "silu",
         "hardswish": "hardswish", "hardswish_": "hardswish", "sigmoid": "sigmoid",
         "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh", "gelu": "gelu",
         "relu6": "relu6", "relu6_": "relu6"}
_SCALAR_FNS = {"size", "dim", "len", "ne", "eq", "lt", "gt", "le", "ge", "format", "__is__",
               "__isnot__", "numel", "sym_size", "warn", "RaiseException", "_verify_batch_size",
               "list", "append", "__getitem__", "int", "float", "floordiv", "sym_numel",
               "_assert", "__not__", "isinstance", "annotate", "uninitialized", "unchecked_cast",
               "is_scripting", "_unwrap_optional", "str"}


def _torch_op(b: _Builder, op: str, pos: list[Any], args: dict[str, Any], hint: str) -> Any:
    """Emit the IR node for one torch op (aten / torch.* / F.* name) and return its value."""
    x = _get(pos, args, 0, "input", _get(pos, args, 0, "self"))
    xs = _tensors([x])
    if op in ("conv2d", "_convolution", "convolution", "conv1d", "conv3d"):
        w, bias = _get(pos, args, 1, "weight"), _get(pos, args, 2, "bias")
        stride, padding = _get(pos, args, 3, "stride", 1), _get(pos, args, 4, "padding", 0)
        dilation = _get(pos, args, 5, "dilation", 1)
        if op in ("_convolution", "convolution"):
            if _get(pos, args, 6, "transposed", False):
                return _other(b, op, pos, args, hint)
            groups = _get(pos, args, 8, "groups", 1)
        else:
            groups = _get(pos, args, 6, "groups", 1)
        params = _roles((("kernel", w), ("bias", bias)))
        attrs = _conv_attrs(stride, padding, dilation, groups)
        if op == "conv1d":
            attrs.update(rank=1)
        name = b.add(_param_module(params) or hint, "conv", tuple(xs), params, attrs)
        return ("node", name)
    if op in ("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
              "_native_batch_norm_legit", "functional.batch_norm", "cudnn_batch_norm",
              "_batch_norm_impl_index", "instance_norm"):
        if op == "instance_norm":
            return _other(b, op, pos, args, hint)
        if op == "functional.batch_norm":  # F.batch_norm(input, mean, var, weight, bias, ...)
            mean, var = _get(pos, args, 1, "running_mean"), _get(pos, args, 2, "running_var")
            w, bias = _get(pos, args, 3, "weight"), _get(pos, args, 4, "bias")
            eps = _get(pos, args, 7, "eps", 1e-5)
        elif op.startswith("_native_batch_norm_legit"):
            w, bias = _get(pos, args, 1, "weight"), _get(pos, args, 2, "bias")
            mean, var = _get(pos, args, 3, "running_mean"), _get(pos, args, 4, "running_var")
            eps = _get(pos, args, 6, "eps", 1e-5)
        else:
            w, bias = _get(pos, args, 1, "weight"), _get(pos, args, 2, "bias")
            mean, var = _get(pos, args, 3, "running_mean"), _get(pos, args, 4, "running_var")
            eps = _get(pos, args, 7, "eps", 1e-5)
        params = _roles((("gamma", w), ("beta", bias), ("mean", mean), ("var", var)))
        eps_v = float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) \
            else 1e-5
        name = b.add(_param_module(params) or hint, "bn", tuple(xs), params, {"eps": eps_v})
        return ("node", name)
    if op in ("linear", "addmm", "matmul", "mm"):
        if op == "linear":
            w, bias = _get(pos, args, 1, "weight"), _get(pos, args, 2, "bias")
            params = _roles((("kernel", w), ("bias", bias)))
            if "kernel" in params:
                return ("node", b.add(_param_module(params) or hint, "dense", tuple(xs), params))
        return _other(b, op, pos, args, hint)
    if op in _ACTS:
        return ("node", b.add(hint, _ACTS[op], tuple(xs)))
    if op in ("hardtanh", "hardtanh_"):
        lo, hi = _get(pos, args, 1, "min_val", -1.0), _get(pos, args, 2, "max_val", 1.0)
        if lo == 0 and hi == 6:
            return ("node", b.add(hint, "relu6", tuple(xs)))
        return ("node", b.add(hint, "activation", tuple(xs),
                              attrs={"name": "hardtanh", "min": lo, "max": hi}))
    if op in ("leaky_relu", "leaky_relu_"):
        alpha = _get(pos, args, 1, "negative_slope", 0.01)
        return ("node", b.add(hint, "leaky_relu", tuple(xs),
                              attrs={"alpha": float(alpha) if isinstance(alpha, (int, float))
                                     else 0.01}))
    if op in ("add", "add_", "__iadd__", "__add__"):
        other = _get(pos, args, 1, "other")
        ins = _tensors([x, other])
        alpha = _get(pos, args, 2, "alpha", 1)
        if len(ins) == 2 and alpha == 1:
            return ("node", b.add(hint, "add", tuple(ins)))
        return _other(b, op, pos, args, hint)
    if op in ("mul", "mul_", "__mul__"):
        ins = _tensors([x, _get(pos, args, 1, "other")])
        if len(ins) == 2:
            return ("node", b.add(hint, "mul", tuple(ins)))
        return _other(b, op, pos, args, hint)
    if op in ("cat", "concat", "concatenate"):
        tensors = _get(pos, args, 0, "tensors")
        ins = _tensors([tensors])
        dim = _get(pos, args, 1, "dim", 0)
        if ins and isinstance(dim, int):
            return ("node", b.add(hint, "concat", tuple(ins), attrs={"axis": dim}))
        return _other(b, op, pos, args, hint)
    if op in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
        k = _get(pos, args, 1, "kernel_size")
        stride = _get(pos, args, 2, "stride") or k
        padding = _get(pos, args, 3, "padding", 0)
        ph, pw = _pair(padding, 0)
        kind = "avgpool" if op == "avg_pool2d" else "maxpool"
        attrs = {"pool": _pair(k), "stride": _pair(stride),
                                 "padding": (ph, ph, pw, pw)}
        return ("node", b.add(hint, kind, tuple(xs), attrs=attrs))
    if op in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"):
        size = _get(pos, args, 1, "output_size")
        if _pair(size, 0) == (1, 1):
            kind = "gmp" if "max" in op else "gap"
            return ("node", b.add(hint, kind, tuple(xs), attrs={"keepdims": True}))
        return _other(b, op, pos, args, hint)
    if op in ("mean",):
        dims = _get(pos, args, 1, "dim")
        if isinstance(dims, list) and sorted(int(d) % 4 for d in dims) == [2, 3]:
            keep = bool(_get(pos, args, 2, "keepdim", False))
            return ("node", b.add(hint, "gap", tuple(xs), attrs={"keepdims": keep}))
        return _other(b, op, pos, args, hint)
    if op in ("flatten",):
        return ("node", b.add(hint, "flatten", tuple(xs)))
    if op in ("view", "reshape", "_unsafe_view"):
        return ("node", b.add(hint, "reshape", tuple(xs)))
    if op in _EXPORT_PASS or op in ("dropout_", "feature_dropout", "alpha_dropout",
                                    "identity"):
        return ("node", b.add(hint, "identity", tuple(xs)))
    if op in _SCALAR_FNS:
        return ("unknown", op)
    return _other(b, op, pos, args, hint)


def _other(b: _Builder, op: str, pos: list[Any], args: dict[str, Any], hint: str) -> Any:
    ins = _tensors([pos, list(args.values())])
    ins = list(OrderedDict.fromkeys(ins))
    if not ins:
        return ("unknown", op)
    return ("node", b.add(hint, "other", tuple(ins), attrs={"name": op}))


# ==========================================================================================
# TorchScript
# ==========================================================================================

@dataclass
class _Class:
    qualname: str
    node: ast.ClassDef
    attrs: dict[str, str] = field(default_factory=dict)  # submodule attr -> class qualname
    consts: dict[str, Any] = field(default_factory=dict)  # Final constants
    methods: dict[str, ast.FunctionDef] = field(default_factory=dict)
    params: set[str] = field(default_factory=set)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _parse_classes(module: str, source: str, out: dict[str, _Class]) -> None:
    tree = ast.parse(source)
    for top in tree.body:
        if not isinstance(top, ast.ClassDef):
            continue
        cls = _Class(f"{module}.{top.name}", top)
        for st in top.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                ann = st.annotation
                if isinstance(ann, ast.Subscript) and _dotted(ann.value) == "Final":
                    cls.consts[st.target.id] = _literal(st.value) if st.value else None
                    continue
                d = _dotted(ann)
                if d and d.startswith("__torch__."):
                    cls.attrs[st.target.id] = d
            elif isinstance(st, ast.Assign) and len(st.targets) == 1:
                t = st.targets[0]
                if isinstance(t, ast.Subscript) and _dotted(t.value) == "__annotations__":
                    key = _literal(t.slice)
                    d = _dotted(st.value)
                    if isinstance(key, str) and d and d.startswith("__torch__."):
                        cls.attrs[key] = d
                elif isinstance(t, ast.Name) and t.id in ("__parameters__", "__buffers__"):
                    vals = _literal(st.value)
                    if isinstance(vals, list):
                        cls.params.update(str(v) for v in vals)
            elif isinstance(st, ast.FunctionDef):
                cls.methods[st.name] = st
        out[cls.qualname] = cls


def _strip_mangle(qualname: str) -> str:
    return re.sub(r"\.___torch_mangle_\d+", "", qualname)


class _Interp:
    """Symbolic, side-effect-free walk of TorchScript forwards."""

    def __init__(self, classes: dict[str, _Class], functions: dict[str, ast.FunctionDef]):
        self.classes = classes
        self.functions = functions
        self.b = _Builder()
        self.depth = 0
        self.none_attrs: set[str] | None = None  # "path.attr" pickled as None

    # values: ("node", name) | ("param", key) | ("mod", path, cls) | ("fn", dotted)
    #         | ("unknown", why) | python literals | lists
    def run_module(self, path: str, cls: str, method: str, args: list[Any]) -> Any:
        c = self.classes.get(cls)
        if c is None or method not in c.methods:
            return _other(self.b, f"call:{_strip_mangle(cls)}.{method}", args, {},
                          path or "call")
        return self.call(c.methods[method], ("mod", path, cls), args)

    def call(self, fn: ast.FunctionDef, self_val: Any, args: list[Any]) -> Any:
        if self.depth >= MAX_DEPTH:
            return _other(self.b, "depth", args, {}, "call")
        self.depth += 1
        try:
            env: dict[str, Any] = {}
            params = [a.arg for a in fn.args.args]
            vals = ([self_val] if self_val is not None else []) + list(args)
            if self_val is None and params and params[0] == "self":
                vals = list(args)
            for i, p in enumerate(params):
                if i < len(vals):
                    env[p] = vals[i]
                else:
                    defaults = fn.args.defaults
                    j = i - (len(params) - len(defaults))
                    env[p] = _literal(defaults[j]) if 0 <= j < len(defaults) else None
            ret = self.block(fn.body, env)
            return ret[1] if ret is not None else None
        finally:
            self.depth -= 1

    def block(self, body: list[ast.stmt], env: dict[str, Any]) -> tuple[str, Any] | None:
        for st in body:
            r = self.stmt(st, env)
            if r is not None:
                return r
        return None

    def stmt(self, st: ast.stmt, env: dict[str, Any]) -> tuple[str, Any] | None:
        if isinstance(st, ast.Return):
            return ("return", self.expr(st.value, env) if st.value else None)
        if isinstance(st, ast.Assign):
            val = self.expr(st.value, env)
            for t in st.targets:
                self.bind(t, val, env)
            return None
        if isinstance(st, ast.AnnAssign) and st.value is not None:
            self.bind(st.target, self.expr(st.value, env), env)
            return None
        if isinstance(st, ast.AugAssign):
            cur = self.expr(st.target, env)
            val = self.binop(st.op, cur, self.expr(st.value, env))
            self.bind(st.target, val, env)
            return None
        if isinstance(st, ast.Expr):
            self.expr(st.value, env)
            return None
        if isinstance(st, ast.If):
            test = self.expr(st.test, env)
            if isinstance(test, bool):
                return self.block(st.body if test else st.orelse, env)
            env_a, env_b = dict(env), dict(env)
            ra = self.block(st.body, env_a)
            rb = self.block(st.orelse, env_b)
            if ra is not None or rb is not None:
                vals = [r[1] for r in (ra, rb) if r is not None]
                if ra is not None and rb is not None:
                    return ("return", self.merge(vals[0], vals[1]))
                # one branch returns: the rest of the function may still run
                for k in set(env_a) | set(env_b):
                    env[k] = self.merge(env_a.get(k), env_b.get(k))
                return None
            for k in set(env_a) | set(env_b):
                env[k] = self.merge(env_a.get(k), env_b.get(k))
            return None
        # loops, with, raise, imports: nothing here is run; names they bind stay unknown
        for node in ast.walk(st):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                env[node.id] = ("unknown", type(st).__name__)
        if isinstance(st, (ast.For, ast.While)):
            ins = [v for v in env.values() if isinstance(v, tuple) and v[:1] == ("node",)]
            del ins  # a loop's dataflow is not followed
        return None

    def merge(self, a: Any, b: Any) -> Any:
        if a == b:
            return a
        ins = list(OrderedDict.fromkeys(_tensors([a, b])))
        if not ins:
            return ("unknown", "branch")
        return ("node", self.b.add("branch", "other", tuple(ins), attrs={"name": "if"}))

    def bind(self, target: ast.AST, val: Any, env: dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = val
        elif isinstance(target, (ast.Tuple, ast.List)):
            items = val if isinstance(val, list) and len(val) == len(target.elts) else None
            for i, t in enumerate(target.elts):
                self.bind(t, items[i] if items else ("unknown", "unpack"), env)

    def binop(self, op: ast.operator, a: Any, b: Any) -> Any:
        if isinstance(op, ast.Add):
            return _torch_op(self.b, "add", [a, b], {}, "add")
        if isinstance(op, ast.Mult):
            return _torch_op(self.b, "mul", [a, b], {}, "mul")
        return _other(self.b, type(op).__name__.lower(), [a, b], {}, "binop")

    def attr_of(self, base: Any, name: str) -> Any:
        if isinstance(base, tuple) and base[:1] == ("mod",):
            _, path, cls = base
            c = self.classes.get(cls)
            if c is not None:
                child = f"{path}.{name}" if path else name
                if name in c.attrs:
                    return ("mod", child, c.attrs[name])
                if name in c.params:
                    if self.none_attrs is not None and child in self.none_attrs:
                        return None
                    return ("param", child)
                if name == "training":
                    return False
                if name in c.consts:
                    return c.consts[name]
            return ("unknown", name)
        d = base[1] if isinstance(base, tuple) and base[:1] == ("fn",) else None
        if d is not None:
            return ("fn", f"{d}.{name}")
        return ("unknown", name)

    def expr(self, e: ast.AST | None, env: dict[str, Any]) -> Any:
        if e is None:
            return None
        if isinstance(e, ast.Constant):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in env:
                return env[e.id]
            return ("fn", e.id)
        if isinstance(e, (ast.List, ast.Tuple)):
            return [self.expr(x, env) for x in e.elts]
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub):
            v = self.expr(e.operand, env)
            return -v if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if isinstance(e, ast.Attribute):
            return self.attr_of(self.expr(e.value, env), e.attr)
        if isinstance(e, ast.BinOp):
            return self.binop(e.op, self.expr(e.left, env), self.expr(e.right, env))
        if isinstance(e, ast.Call):
            return self.call_expr(e, env)
        return ("unknown", type(e).__name__)

    def call_expr(self, e: ast.Call, env: dict[str, Any]) -> Any:
        args = [self.expr(a, env) for a in e.args]
        kwargs = {k.arg: self.expr(k.value, env) for k in e.keywords if k.arg}
        fn = e.func
        if isinstance(fn, ast.Name) and fn.id == "getattr" and len(args) >= 2 \
                and isinstance(args[1], str):
            return self.attr_of(args[0], args[1])
        if isinstance(fn, ast.Attribute):
            base = self.expr(fn.value, env)
            if isinstance(base, tuple) and base[:1] == ("mod",):
                return self.run_module(base[1], base[2], fn.attr, args)
            target = self.attr_of(base, fn.attr)
        else:
            target = self.expr(fn, env)
        if not (isinstance(target, tuple) and target[:1] == ("fn",)):
            return _other(self.b, "call", args, kwargs, "call")
        dotted = target[1]
        last = dotted.rsplit(".", 1)[-1]
        hint = last.strip("_") or "op"
        if dotted.startswith("__torch__.torch.nn.functional."):
            if last == "batch_norm":
                return _torch_op(self.b, "functional.batch_norm", args, kwargs, hint)
            if last in ("relu", "silu", "hardswish", "hardtanh", "relu6", "dropout", "linear",
                        "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool2d",
                        "_max_pool2d", "avg_pool2d", "leaky_relu", "sigmoid", "tanh", "gelu",
                        "dropout2d", "flatten"):
                op = "dropout" if last.startswith("dropout") else last
                return _torch_op(self.b, op, args, kwargs, hint)
            if last in _SCALAR_FNS or last.startswith("_verify"):
                return ("unknown", last)
            fdef = self.functions.get(dotted)
            if fdef is not None:
                return self.call(fdef, None, args)
            return _other(self.b, last, args, kwargs, hint)
        if dotted.startswith("__torch__."):
            fdef = self.functions.get(dotted)
            if fdef is not None:
                return self.call(fdef, None, args)
            return _other(self.b, dotted, args, kwargs, hint)
        if dotted.startswith(("torch.", "ops.aten.", "ops.prim.", "aten.")):
            if dotted.startswith("ops.prim."):
                return ("unknown", last)
            return _torch_op(self.b, last, args, kwargs, hint)
        if dotted in _SCALAR_FNS or last in _SCALAR_FNS:
            return ("unknown", last)
        return _other(self.b, dotted, args, kwargs, hint)


def graph_from_torchscript(path: str) -> Graph | None:
    """The IR of a ``torch.jit.save`` archive (scripted or traced), or None when ``path``
    is not one. The ``code/`` sources are parsed, never executed."""
    opened = _zip_members(path)
    if opened is None:
        return None
    f, entries = opened
    try:
        names = list(entries)
        if not names or "/" not in names[0]:
            return None
        root = names[0].split("/", 1)[0]
        code = [n for n in names if n.startswith(f"{root}/code/") and n.endswith(".py")]
        if not code:
            return None
        sources = {n: _read(f, entries[n]) for n in code}
        data = entries.get(f"{root}/data.pkl")
        pkl = _read(f, data) if data is not None else None
    finally:
        f.close()
    classes: dict[str, _Class] = {}
    functions: dict[str, ast.FunctionDef] = {}
    for n, raw in sources.items():
        rel = n[len(f"{root}/code/"):-3]
        module = rel.replace("/", ".")
        try:
            text = raw.decode("utf-8")
            _parse_classes(module, text, classes)
            for top in ast.parse(text).body:
                if isinstance(top, ast.FunctionDef):
                    functions[f"{module}.{top.name}"] = top
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError
                ) as exc:
            raise CheckpointError(path, f"TorchScript source {rel}.py does not parse: "
                                  f"{exc.__class__.__name__}") from None
    root_cls = _torchscript_root(pkl, classes)
    if root_cls is None:
        raise CheckpointError(path, "TorchScript archive: cannot tell the root module class",
                              "unsupported")
    interp = _Interp(classes, functions)
    interp.none_attrs = _none_attrs(pkl)
    x = ("node", interp.b.add("input", "input", attrs={"shape": None}))
    try:
        out = interp.run_module("", root_cls, "forward", [x])
    except _TooBig:
        raise CheckpointError(path, f"TorchScript graph has more than {MAX_NODES} nodes",
                              "too_large") from None
    except RecursionError:
        raise CheckpointError(path, "TorchScript source nests too deeply", "too_large"
                              ) from None
    outs = _tensors([out])
    if outs:
        interp.b.add("output", "output", tuple(outs))
    return Graph(tuple(interp.b.nodes), source="graph:torchscript", layout="nchw",
                 kernel_layout="oihw")


def _none_attrs(pkl: bytes | None) -> set[str] | None:
    """``path.attr`` of every module attribute data.pkl stores as None (a Conv2d built
    with ``bias=False`` shares its class with biased ones); None when data.pkl cannot be
    read. Every global becomes an inert ``Opaque`` stand-in and persistent ids (storages)
    become None, so nothing the pickle names is imported or called."""
    if not pkl or len(pkl) > (16 << 20):
        return None
    import io
    import pickle
    import pickletools

    from bnexporter.formats.torch_pickle import Opaque, _opaque_class

    try:  # bound what the C unpickler would allocate before it runs
        for n, (opcode, arg, _) in enumerate(pickletools.genops(pkl)):
            if n > 2_000_000 or (opcode.name in ("LONG_BINPUT", "LONG_BINGET", "PUT", "GET")
                                 and isinstance(arg, int) and arg > (1 << 20)):
                return None
    except Exception:
        return None

    class _Inert(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _opaque_class(module, name)

        def persistent_load(self, pid: Any) -> Any:
            return None
    try:
        root = _Inert(io.BytesIO(pkl), encoding="latin1").load()
    except Exception:
        return None
    out: set[str] = set()
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    seen: set[int] = set()
    while stack:
        obj, path, depth = stack.pop()
        if not isinstance(obj, Opaque) or id(obj) in seen or depth > MAX_DEPTH:
            continue
        seen.add(id(obj))
        st = obj.state_dict()
        for k, v in (st or {}).items():
            if not isinstance(k, str):
                continue
            child = f"{path}.{k}" if path else k
            if v is None:
                out.add(child)
            elif isinstance(v, Opaque):
                stack.append((v, child, depth + 1))
    return out


def _torchscript_root(pkl: bytes | None, classes: dict[str, _Class]) -> str | None:
    if pkl:
        import pickletools
        try:
            strings: list[str] = []
            for opcode, arg, _ in pickletools.genops(pkl):
                if opcode.name == "GLOBAL" and isinstance(arg, str):
                    cand = arg.replace(" ", ".")
                    if cand in classes:
                        return cand
                elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") \
                        and isinstance(arg, str):
                    strings.append(arg)
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    cand = f"{strings[-2]}.{strings[-1]}"
                    if cand in classes:
                        return cand
                if len(strings) > 64:
                    strings = strings[-2:]
        except Exception:
            pass
    used = {t for c in classes.values() for t in c.attrs.values()}
    tops = [q for q, c in classes.items() if q not in used and "forward" in c.methods]
    return tops[0] if len(tops) == 1 else None


# ==========================================================================================
# full-module pickles
# ==========================================================================================

@dataclass
class TorchModule:
    """One module of a pickled ``nn.Module`` tree."""

    path: str
    cls: str                                     # "torch.nn.modules.batchnorm.BatchNorm2d"
    children: list[TorchModule] = field(default_factory=list)
    params: list[str] = field(default_factory=list)   # state_dict keys it owns directly
    eps: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.rsplit(".", 1)[-1]

    def child(self, attr: str) -> TorchModule | None:
        want = f"{self.path}.{attr}" if self.path else attr
        return next((c for c in self.children if c.path == want), None)

    def walk(self) -> list[TorchModule]:
        out, stack = [], [self]
        while stack:
            m = stack.pop()
            out.append(m)
            stack.extend(reversed(m.children))
        return out


def _build_tree(obj: Any, path: str = "", depth: int = 0) -> TorchModule | None:
    from bnexporter.formats.torch_pickle import Opaque, TensorRef

    if not isinstance(obj, Opaque) or depth > MAX_DEPTH:
        return None
    st = obj.state_dict()
    if st is None or "_modules" not in st:
        return None
    mod = TorchModule(path, f"{obj.global_module}.{obj.global_name}")

    def items(v: Any) -> list[tuple[Any, Any]]:
        if isinstance(v, dict):
            return list(v.items())
        if isinstance(v, Opaque):
            return list(v.items)
        return []
    for part in ("_parameters", "_buffers"):
        for k, v in items(st.get(part)):
            if isinstance(k, str) and isinstance(v, TensorRef):
                mod.params.append(f"{path}.{k}" if path else k)
    for k in ("eps", "negative_slope", "min_val", "max_val", "inplace", "p", "groups",
              "stride", "padding", "dilation", "kernel_size", "output_size", "start_dim",
              "num_features", "affine", "track_running_stats", "in_features", "out_features"):
        v = st.get(k)
        if isinstance(v, (int, float, str, tuple, list)) or (v is None and k in st):
            mod.attrs[k] = v
    eps = st.get("eps")
    if isinstance(eps, float) and not isinstance(eps, bool):
        mod.eps = eps
    for k, v in items(st.get("_modules")):
        if not isinstance(k, str):
            continue
        child = _build_tree(v, f"{path}.{k}" if path else k, depth + 1)
        if child is not None:
            mod.children.append(child)
    return mod


def module_tree(path: str) -> TorchModule | None:
    """The module tree of a full-module torch pickle (zip or legacy), read with the
    project's restricted unpickler; None when it holds no ``nn.Module``."""
    from bnexporter.formats import torch_pickle
    from bnexporter.formats.torch_pickle import Refused

    opened = _zip_members(path)
    if opened is None:
        return None
    f, entries = opened
    try:
        names = list(entries)
        if not names or "/" not in names[0]:
            return None
        root = names[0].split("/", 1)[0]
        entry = entries.get(f"{root}/data.pkl")
        if entry is None or f"{root}/code/" in entries or any(
                n.startswith(f"{root}/code/") for n in names):
            return None
        data = _read(f, entry, torch_pickle.MAX_PICKLE_BYTES)
    finally:
        f.close()
    try:
        obj = torch_pickle.load(data)
    except Refused as exc:
        raise CheckpointError(path, f"data.pkl: {exc.cause}", exc.reason) from None
    return find_module(obj)


def find_module(obj: Any) -> TorchModule | None:
    """The module tree of ``obj`` or of the first module under a wrapper key."""
    from bnexporter.formats.torch_layout import WRAPPER_KEYS

    tree = _build_tree(obj)
    if tree is not None:
        return tree
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if key in obj:
                tree = _build_tree(obj[key])
                if tree is not None:
                    prefix = ""
                    return _prefixed(tree, prefix)
        for v in obj.values():
            tree = _build_tree(v)
            if tree is not None:
                return tree
    return None


def _prefixed(tree: TorchModule, prefix: str) -> TorchModule:
    return tree


_LEAF = {
    "Conv1d": "conv", "Conv2d": "conv", "BatchNorm1d": "bn", "BatchNorm2d": "bn",
    "BatchNorm3d": "bn", "SyncBatchNorm": "bn", "ReLU": "relu", "ReLU6": "relu6",
    "SiLU": "silu", "Hardswish": "hardswish", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "GELU": "gelu", "Linear": "dense", "MaxPool2d": "maxpool", "AvgPool2d": "avgpool",
    "AdaptiveAvgPool2d": "gap", "Flatten": "flatten", "Dropout": "identity",
    "Dropout2d": "identity", "Identity": "identity", "LeakyReLU": "leaky_relu",
    "Hardtanh": "activation",
}


def _is_torch_nn(m: TorchModule) -> bool:
    return m.cls.startswith("torch.nn.modules.")


class _TreeIR:
    def __init__(self) -> None:
        self.b = _Builder()

    def leaf(self, m: TorchModule, src: str | None) -> str:
        op = _LEAF.get(m.name, "other") if _is_torch_nn(m) else "other"
        ins = (src,) if src else ()
        keys = {k.rsplit(".", 1)[-1]: k for k in m.params}
        params: dict[str, str] = {}
        attrs: dict[str, Any] = {}
        if op == "bn":
            for role, attr in (("gamma", "weight"), ("beta", "bias"), ("mean", "running_mean"),
                               ("var", "running_var")):
                if attr in keys:
                    params[role] = keys[attr]
            attrs["eps"] = m.eps if m.eps is not None else 1e-5
        elif op in ("conv", "dense"):
            if "weight" in keys:
                params["kernel"] = keys["weight"]
            if "bias" in keys:
                params["bias"] = keys["bias"]
            if op == "conv":
                attrs = _conv_attrs(m.attrs.get("stride", 1), m.attrs.get("padding", 0),
                                    m.attrs.get("dilation", 1), m.attrs.get("groups", 1))
        elif op == "activation":
            if m.attrs.get("min_val") == 0 and m.attrs.get("max_val") == 6:
                op = "relu6"
            else:
                op, attrs = "activation", {"name": "hardtanh"}
        elif op == "leaky_relu":
            attrs = {"alpha": float(m.attrs.get("negative_slope", 0.01))}
        elif op == "gap":
            if _pair(m.attrs.get("output_size"), 0) != (1, 1):
                op, attrs = "other", {"name": m.name}
            else:
                attrs = {"keepdims": True}
        if op == "other":
            attrs = {"name": m.cls}
        return self.b.add(m.path or m.name, op, ins, params, attrs)

    def run(self, m: TorchModule, src: str | None) -> str | None:
        """Emit ``m``; returns the IR node holding its output when that is certain."""
        if not m.children:
            return self.leaf(m, src)
        if m.name == "Sequential" and _is_torch_nn(m):
            cur = src
            for c in m.children:
                cur = self.run(c, cur)
            return cur
        block = _KNOWN_BLOCKS.get(m.cls)
        if block is not None:
            out = block(self, m, src)
            if out is not None:
                return out
        if m.name == "BatchNormAct2d":
            return self.bn_act(m, src)
        return self.opaque(m, src)

    def opaque(self, m: TorchModule, src: str | None) -> str:
        """A module whose forward is unknown: children are emitted unconnected, each BN
        read by an ``other`` node (its consumer stays unknown)."""
        for c in m.children:
            out = self.run(c, None)
            if out is not None:
                self.b.add(f"{c.path}/unknown", "other", (out,),
                           attrs={"name": f"unknown consumer in {m.cls}"})
        return self.b.add(m.path or "module", "other", (src,) if src else (),
                          attrs={"name": m.cls})

    def bn_act(self, m: TorchModule, src: str | None) -> str:
        bn = self.leaf(TorchModule(m.path, "torch.nn.modules.batchnorm.BatchNorm2d", [],
                                   m.params, m.eps, m.attrs), src)
        cur = bn
        for c in m.children:  # drop, act
            cur = self.run(c, cur) or cur
        return cur


def _basic_block(t: _TreeIR, m: TorchModule, src: str | None) -> str | None:
    need = ["conv1", "bn1", "relu", "conv2", "bn2"]
    c = {a: m.child(a) for a in need}
    kids = {a: v for a, v in c.items() if v is not None}
    if len(kids) != len(need):
        return None
    x = t.run(kids["conv1"], src)
    x = t.run(kids["bn1"], x)
    x = t.run(kids["relu"], x)
    x = t.run(kids["conv2"], x)
    x = t.run(kids["bn2"], x)
    ds = m.child("downsample")
    ident = t.run(ds, src) if ds is not None else src
    add = t.b.add(f"{m.path}/add", "add", tuple(i for i in (x, ident) if i))
    return t.b.add(f"{m.path}/relu_out", "relu", (add,))


def _bottleneck(t: _TreeIR, m: TorchModule, src: str | None) -> str | None:
    need = ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"]
    if any(m.child(a) is None for a in need):
        return None
    x = src
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        x = t.run(m.child(conv), x)  # type: ignore[arg-type]
        x = t.run(m.child(bn), x)  # type: ignore[arg-type]
        x = t.b.add(f"{m.path}.relu", "relu", (x,) if x else ())
    x = t.run(m.child("conv3"), x)  # type: ignore[arg-type]
    x = t.run(m.child("bn3"), x)  # type: ignore[arg-type]
    ds = m.child("downsample")
    ident = t.run(ds, src) if ds is not None else src
    add = t.b.add(f"{m.path}/add", "add", tuple(i for i in (x, ident) if i))
    return t.b.add(f"{m.path}/relu_out", "relu", (add,))


def _inverted_residual(t: _TreeIR, m: TorchModule, src: str | None) -> str | None:
    conv = m.child("conv")
    if conv is None:
        return None
    out = t.run(conv, src)
    if m.attrs.get("use_res_connect") or (m.attrs.get("stride") == 1 and False):
        return t.b.add(f"{m.path}/add", "add", tuple(i for i in (out, src) if i))
    return out


_KNOWN_BLOCKS = {
    "torchvision.models.resnet.BasicBlock": _basic_block,
    "torchvision.models.resnet.Bottleneck": _bottleneck,
    # torchvision's Conv2dNormActivation is a Sequential subclass: conv, bn, act in order
    "torchvision.ops.misc.Conv2dNormActivation": lambda t, m, s: _seq(t, m, s),
    "torchvision.ops.misc.ConvNormActivation": lambda t, m, s: _seq(t, m, s),
    "torchvision.models.mobilenetv2.InvertedResidual": _inverted_residual,
}


def _seq(t: _TreeIR, m: TorchModule, src: str | None) -> str | None:
    cur = src
    for c in m.children:
        cur = t.run(c, cur)
    return cur


def graph_from_module_tree(root: Any) -> Graph | None:
    """The certain part of a pickled module's dataflow (``root``: a :class:`TorchModule`,
    an unpickled object, or a file path). BNs inside modules whose forward is unknown
    get an ``other`` consumer."""
    if isinstance(root, str):
        root = module_tree(root)
    elif not isinstance(root, TorchModule):
        root = find_module(root)
    if root is None:
        return None
    t = _TreeIR()
    x = t.b.add("input", "input", attrs={"shape": None})
    try:
        out = t.run(root, x)
    except _TooBig:
        return None
    if out is not None:
        t.b.add("output", "output", (out,))
    return Graph(tuple(t.b.nodes), source="graph:module_tree", layout="nchw",
                 kernel_layout="oihw")


def module_report(root: TorchModule) -> dict[str, dict[str, Any]]:
    """Per module path: class and (for BN-like modules) eps."""
    return {m.path: {"class": m.cls, **({"eps": m.eps} if m.eps is not None else {})}
            for m in root.walk()}


# ==========================================================================================
# graph description JSON
# ==========================================================================================

FORMAT_NAME = "bnexporter-graph"
FORMAT_VERSION = 1
MAX_JSON = 64 << 20


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_graph_json(graph: Graph, path: str) -> None:
    """Write ``graph`` as a version-1 graph description file."""
    doc = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "source": graph.source,
        "layout": graph.layout, "kernel_layout": graph.kernel_layout,
        "input_shape": list(graph.input_shape) if graph.input_shape else None,
        "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs),
                   "params": dict(n.params), "attrs": _jsonable(dict(n.attrs))}
                  for n in graph.nodes],
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def graph_from_json(path: str) -> Graph:
    """Read a graph description file; any deviation is a one-line ``CheckpointError``."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(path, f"graph description: {msg}", "corrupt")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_JSON + 1)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror}", "io") from None
    if len(raw) > MAX_JSON:
        raise CheckpointError(path, f"graph description exceeds {MAX_JSON} bytes",
                              "too_large")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    except RecursionError:
        raise bad("JSON nests too deeply") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise bad(f'"format" must be "{FORMAT_NAME}"')
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"graph description version {version!r} is not "
                              f"supported (this reader knows {FORMAT_VERSION})", "unsupported")
    layout = doc.get("layout", "nchw")
    if layout not in ("nchw", "nhwc"):
        raise bad(f'"layout" must be "nchw" or "nhwc", not {layout!r}')
    klayout = doc.get("kernel_layout", "oihw" if layout == "nchw" else "hwio")
    if klayout not in ("oihw", "hwio"):
        raise bad(f'"kernel_layout" must be "oihw" or "hwio", not {klayout!r}')
    shape = doc.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise bad('"input_shape" must be a list of positive integers or null')
    source = doc.get("source", "describe")
    if not isinstance(source, str):
        raise bad('"source" must be a string')
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise bad('"nodes" must be a non-empty list')
    if len(nodes) > MAX_NODES:
        raise CheckpointError(path, f"graph description has more than {MAX_NODES} nodes",
                              "too_large")
    seen: set[str] = set()
    out: list[Node] = []
    for i, n in enumerate(nodes):
        if not isinstance(n, dict):
            raise bad(f"node {i} is not an object")
        name, op = n.get("name"), n.get("op")
        if not isinstance(name, str) or not name:
            raise bad(f"node {i} has no name")
        if name in seen:
            raise bad(f"node {name!r} is defined twice")
        if op not in OPS:
            raise bad(f"node {name!r} has unknown op {op!r}")
        inputs = n.get("inputs", [])
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise bad(f"node {name!r}: inputs must be a list of node names")
        for x in inputs:
            if x not in seen:
                raise bad(f"node {name!r} reads {x!r}, which is not defined before it")
        params = n.get("params", {})
        if not isinstance(params, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
            raise bad(f"node {name!r}: params must map roles to tensor names")
        attrs = n.get("attrs", {})
        if not isinstance(attrs, dict):
            raise bad(f"node {name!r}: attrs must be an object")
        if op == "bn" and ("mean" not in params or "var" not in params):
            raise bad(f"bn node {name!r} must name its mean and var tensors")
        unknown = set(n) - {"name", "op", "inputs", "params", "attrs"}
        if unknown:
            raise bad(f"node {name!r} has unknown keys {sorted(unknown)}")
        seen.add(name)
        out.append(Node(name, op, tuple(inputs), dict(params),
                        {k: _tuplify(v) for k, v in attrs.items()}))
    return Graph(tuple(out), source=source, layout=layout, kernel_layout=klayout,
                 input_shape=tuple(shape) if shape else None)
