"""What a TorchScript ``data.pkl`` means: the module tree, and which attributes are weights.

``torch.jit.save`` pickles every module as a ``__torch__.<qualname>`` object whose
state is one flat dict: parameters, buffers, submodules and plain values side by
side. Only the class sources under ``code/`` say which attribute is which
(``__parameters__ = ["weight", "bias", ]``, ``__buffers__ = [...]``), and they
also carry a BatchNorm's eps. Those lines are matched as text and read as
literals; the code is never parsed as a program, imported or run. Names follow
``ScriptModule.state_dict()``: a module's parameters, then its buffers, then its
submodules, depth first.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from bnexporter.formats.torch_layout import Layout
from bnexporter.formats.torch_pickle import MAX_NAME, MAX_NESTING, Opaque, Refused, TensorRef

_CLASS = re.compile(r"class ([A-Za-z_][A-Za-z0-9_]*)\s*[(:]")
_DECL = re.compile(r"  (__parameters__|__buffers__) = (\[[^\]]*\])\s*$")
_EPS = re.compile(r"  eps : Final\[float\] = ([-+0-9.eE]+)\s*$")
# traced BatchNorm forwards call torch.batch_norm with eps as the 8th literal
_BN_CALL = re.compile(r"torch\.batch_norm\(([^()]*)\)")
# torch writes ``["weight", "bias", ]``: double-quoted names, a comma after each
_NAME_LIST = re.compile(r'\[\s*(?:"[^"\\]*"\s*,\s*)*(?:"[^"\\]*"\s*)?\]')
_NAME = re.compile(r'"([^"\\]*)"')
_MAX_DECL = 1 << 16
# a real archive has one class per module type (a few thousand at most); each costs a
# ClassDecl, so a code/ of 64 MB of "class c1:" lines would cost gigabytes
MAX_CLASSES = 1 << 16


@dataclass
class ClassDecl:
    """What one ``code/`` class declares about its instances' attributes."""

    module: bool = False               # it declares __parameters__: an nn.Module
    parameters: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    eps: float | None = None


def code_module(member: str, root: str) -> str | None:
    """``<root>/code/__torch__/a/b.py`` -> ``__torch__.a.b`` (the classes' pickle module)."""
    prefix = f"{root}/code/"
    if not member.startswith(prefix) or not member.endswith(".py"):
        return None
    return member[len(prefix):-3].replace("/", ".")


def _names(literal: str) -> tuple[str, ...] | None:
    """The names of a declaration list, matched as text (never evaluated): ast.literal_eval
    of a 64 KB list took 0.17 s, and a file may hold hundreds of them."""
    if len(literal) > _MAX_DECL or not _NAME_LIST.fullmatch(literal):
        return None
    return tuple(_NAME.findall(literal))


def _eps(text: str) -> float | None:
    try:
        eps = float(text)
    except ValueError:
        return None
    return eps if 0.0 <= eps < 1.0 else None


def parse_classes(module: str, text: str, out: dict[str, ClassDecl]) -> None:
    """Add the declarations of every top-level class in one ``code/`` file to ``out``.

    Raises :class:`Refused` past :data:`MAX_CLASSES` classes in all."""
    current: ClassDecl | None = None
    # lines one at a time: text.splitlines() of a 16 MB file of short lines is ~20 times it
    for line in io.StringIO(text, newline=None):
        if line[:1] not in ("\n", " "):     # a top-level statement ends the class
            m = _CLASS.match(line)
            if m is None:
                current = None
                continue
            current = out.setdefault(f"{module}.{m.group(1)}", ClassDecl())
            if len(out) > MAX_CLASSES:
                raise Refused(f"TorchScript code/ declares more than {MAX_CLASSES} classes",
                              "too_large")
            continue
        if current is None:
            continue
        m = _DECL.match(line)
        if m:
            names = _names(m.group(2))
            if names is not None:
                current.module = True
                if m.group(1) == "__parameters__":
                    current.parameters = names
                else:
                    current.buffers = names
            continue
        m = _EPS.match(line)
        if m:
            current.eps = _eps(m.group(1))
            continue
        call = _BN_CALL.search(line) if current.eps is None else None
        if call:
            args = [a.strip() for a in call.group(1).split(",")]
            if len(args) >= 8:
                current.eps = _eps(args[7])


def _is_module(obj: object, classes: dict[str, ClassDecl]) -> bool:
    if not isinstance(obj, Opaque) or not obj.global_module.startswith("__torch__"):
        return False
    state = obj.state_dict()
    if state is None:
        return False
    decl = classes.get(obj.qualname)
    return decl.module if decl is not None else "training" in state


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def interpret(root: object, classes: dict[str, ClassDecl]) -> Layout:
    """The module's weights named like its ``state_dict()``, and BN epsilons.

    A class without a declaration (no ``code/`` for it) contributes every tensor
    attribute, with a note. A module object reached twice is walked once.
    """
    if not _is_module(root, classes):
        raise Refused("data.pkl does not hold a TorchScript module", "unsupported")
    layout = Layout(source="TorchScript module")
    undeclared: set[str] = set()
    seen: set[int] = set()
    stack: list[tuple[Opaque, str, int]] = [(root, "", 0)]  # type: ignore[list-item]
    while stack:
        obj, path, depth = stack.pop()
        if depth >= MAX_NESTING:
            raise Refused(f"TorchScript modules nest more than {MAX_NESTING} levels deep",
                          "too_large")
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        state = obj.state_dict() or {}
        decl = classes.get(obj.qualname)
        if decl is None:
            undeclared.add(obj.qualname)
            weights = [k for k, v in state.items() if isinstance(v, TensorRef)]
        else:
            weights = [*decl.parameters, *decl.buffers]
            if decl.eps is not None and "running_var" in decl.buffers:
                layout.bn_eps[path] = decl.eps
        for key in weights:
            value = state.get(key)
            if isinstance(value, TensorRef) and isinstance(key, str) \
                    and len(path) + len(key) < MAX_NAME:
                layout.tensors.setdefault(_join(path, key), value)
        kids = [(k, v) for k, v in state.items()
                if isinstance(k, str) and len(path) + len(k) < MAX_NAME
                and _is_module(v, classes)]
        for key, child in reversed(kids):
            stack.append((child, _join(path, key), depth + 1))
    if undeclared:
        layout.notes.append(f"{len(undeclared)} TorchScript class(es) without code/ "
                            "declarations: every tensor attribute of theirs read as a weight")
    return layout
