"""What a torch checkpoint's object graph means: which dict holds the weights
(Lightning, DDP, EMA, ``{"model": ...}`` wrappers), which entries are optimizer
state, the training step, and BN epsilons of pickled modules.

The restricted unpickler (``torch_pickle``) decides what may be built; this
module only interprets the inert objects it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bnexporter.formats.torch_pickle import MAX_NAME, MAX_NESTING, Opaque, Refused, TensorRef

# dict keys that hold the model's weights, most specific first
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "ema",
                "state_dict_ema", "model_ema")
# keys that hold training state, never the model: not guessed as the weights
AUX_KEYS = frozenset({"optimizer", "optimizer_states", "optimizer_state_dict", "optim",
                      "opt", "scheduler", "lr_schedulers", "lr_scheduler", "scaler",
                      "callbacks", "loops", "amp", "grad_scaler"})
STEP_KEYS = ("global_step", "step", "iteration", "epoch")
_STRIP_SEGMENTS = ("_orig_mod",)


@dataclass
class Layout:
    """Tensors found in a checkpoint's object graph, named like a state_dict."""

    tensors: dict[str, TensorRef] = field(default_factory=dict)
    auxiliary: set[str] = field(default_factory=set)
    bn_eps: dict[str, float] = field(default_factory=dict)
    step: int | TensorRef | None = None
    step_key: str | None = None
    source: str = "state_dict"
    notes: list[str] = field(default_factory=list)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _key(key: object) -> str | None:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.decode("latin1")
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    return None


def _items(obj: object) -> list[tuple[object, object]]:
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, Opaque):
        return list(obj.items)
    return []


def _module_state(obj: object) -> dict | None:
    """The ``__dict__`` of a pickled ``nn.Module``, if ``obj`` is one."""
    if isinstance(obj, Opaque):
        st = obj.state_dict()
        if st is not None and "_parameters" in st and "_modules" in st:
            return st
    return None


def _bn_eps(obj: Opaque, st: dict) -> float | None:
    """The real epsilon of a pickled BatchNorm-like module (running stats + eps)."""
    eps = st.get("eps")
    buffers = dict(_items(st.get("_buffers")))
    is_bn = "BatchNorm" in obj.global_name or ("running_var" in buffers
                                               and "running_mean" in buffers)
    if not is_bn or isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    eps = float(eps)
    return eps if 0.0 <= eps < 1.0 else None


def _children(obj: object, path: str, bn_eps: dict[str, float]
              ) -> list[tuple[str, object]]:
    st = _module_state(obj)
    if st is not None:
        assert isinstance(obj, Opaque)
        eps = _bn_eps(obj, st)
        if eps is not None:
            bn_eps[path] = eps
        skip = st.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        kids: list[tuple[str, object]] = []
        for part in ("_parameters", "_buffers", "_modules"):
            for k, v in _items(st.get(part)):
                name = _key(k)
                if name is not None and v is not None and not (
                        part == "_buffers" and name in skip):
                    kids.append((name, v))
        return kids
    if isinstance(obj, dict):
        return [(k, v) for k, v in ((_key(k), v) for k, v in obj.items()) if k is not None]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    if isinstance(obj, Opaque):
        kids = [(f"args.{i}", v) for i, v in enumerate(obj.args)]
        st = obj.state_dict()
        if st is not None:
            kids += [(k, v) for k, v in ((_key(k), v) for k, v in st.items()) if k]
        elif obj.state is not None:
            kids.append(("state", obj.state))
        kids += [(k, v) for k, v in ((_key(k), v) for k, v in obj.items) if k]
        kids += [(str(i), v) for i, v in enumerate(obj.listitems)]
        return kids
    return []


def flatten(root: object, prefix: str = "", skipped: dict[str, int] | None = None
            ) -> tuple[dict[str, TensorRef], dict[str, float]]:
    """Every tensor reachable from ``root``, named by its dotted path (iteratively).

    Tensors we cannot represent (quantized, sparse, meta, wrapper subclasses)
    are counted in ``skipped`` by their rebuild function.
    """
    tensors: dict[str, TensorRef] = {}
    bn_eps: dict[str, float] = {}
    seen: set[int] = set()
    long_paths = f"tensor(s) under paths longer than {MAX_NAME} characters"
    # path None: the name grew too long; keep walking (depth is still bounded) unnamed
    stack: list[tuple[object, str | None, int]] = [(root, prefix, 0)]
    while stack:
        obj, path, depth = stack.pop()
        if isinstance(obj, TensorRef):
            if path is not None:
                tensors.setdefault(path or "tensor", obj)
            elif skipped is not None:
                skipped[long_paths] = skipped.get(long_paths, 0) + 1
            continue
        if not isinstance(obj, (dict, list, tuple, Opaque)) or id(obj) in seen:
            continue
        if (skipped is not None and isinstance(obj, Opaque)
                and obj.global_module.startswith("torch")
                and obj.global_name.startswith("_rebuild_")):
            skipped[obj.global_name] = skipped.get(obj.global_name, 0) + 1
        if depth >= MAX_NESTING:
            raise Refused(f"checkpoint objects nest more than {MAX_NESTING} levels deep",
                          "too_large")
        seen.add(id(obj))
        kids = _children(obj, path or "", bn_eps if path is not None else {})
        for key, child in reversed(kids):
            name = None if path is None or len(path) + len(key) + 1 > MAX_NAME \
                else _join(path, key)
            stack.append((child, name, depth + 1))
    return tensors, bn_eps


def _renamer(names: list[str]) -> Callable[[str], str]:
    """Drop ``_orig_mod`` segments (torch.compile) and a ``module.`` prefix on every
    name (DataParallel/DDP), unless that would make two names collide."""

    def drop(name: str) -> str:
        return ".".join(p for p in name.split(".") if p not in _STRIP_SEGMENTS)

    dropped = [drop(n) for n in names]
    prefix = ""
    while dropped and all(n.startswith(prefix + "module.") for n in dropped):
        prefix += "module."

    def rename(name: str) -> str:
        out = drop(name)
        return out[len(prefix):] if out.startswith(prefix) else out

    if len({rename(n) for n in names}) != len(names):
        return lambda n: n
    return rename


def _step(root: dict) -> tuple[int | TensorRef | None, str | None]:
    for key in STEP_KEYS:
        value = root.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and value >= 0:
            return value, key
        if isinstance(value, float) and value.is_integer() and value >= 0:
            return int(value), key
        if isinstance(value, TensorRef) and value.numel == 1:
            return value, key
    return None, None


def interpret(root: object) -> Layout:
    """Find the model weights (bare, wrapped, or a pickled module) and the rest."""
    layout = Layout()
    primary_key: str | None = None
    if isinstance(root, dict) and not any(isinstance(v, TensorRef) for v in root.values()):
        ranked = [k for k in WRAPPER_KEYS if k in root]
        ranked += sorted((k for k in root if isinstance(k, str) and k not in ranked
                          and k not in AUX_KEYS),
                         key=lambda k: -len(flatten(root[k])[0]))
        for key in ranked:
            if flatten(root[key])[0]:
                primary_key = key
                break
    skipped: dict[str, int] = {}
    if primary_key is None:
        tensors, bn_eps = flatten(root, "", skipped)
        layout.source = "module" if _module_state(root) is not None else "state_dict"
    else:
        assert isinstance(root, dict)
        tensors, bn_eps = flatten(root[primary_key], "", skipped)
        layout.source = primary_key
        if _module_state(root[primary_key]) is not None:
            layout.source += " (pickled module)"
    rename = _renamer(list(tensors))
    layout.tensors = {rename(n): t for n, t in tensors.items()}
    layout.bn_eps = {rename(n): e for n, e in bn_eps.items()}
    if isinstance(root, dict):
        layout.step, layout.step_key = _step(root)
        if primary_key is not None:
            for key, value in root.items():
                name = _key(key)
                if key == primary_key or name is None:
                    continue
                for aux_name, t in flatten(value, name, skipped)[0].items():
                    if aux_name in layout.tensors:
                        layout.notes.append(f"skipped {aux_name}: name already used")
                        continue
                    layout.tensors[aux_name] = t
                    layout.auxiliary.add(aux_name)
    for kind, count in sorted(skipped.items()):
        what = kind if " " in kind else f"tensor(s) rebuilt by {kind} (not supported)"
        layout.notes.append(f"skipped {count} {what}")
    return layout
