"""Names from the filesystem or from a file, made safe to show anywhere.

Folder and file names are bytes; Python decodes them with ``surrogateescape``,
so a byte that is not UTF-8 (a Latin-1 ``é`` is ``0xe9``) becomes a lone
surrogate (``U+DCE9``). A tensor name in a JSON header can hold a lone
surrogate too (``"\\ud800"``). Such a string cannot be encoded as UTF-8: one
of them in a label value, an HTML page or a log line would make encoding
raise, and every model behind the same answer would go with it.

The rule, everywhere (labels, HTML, logs, model names): each undecodable byte
becomes the four characters ``\\xNN`` (its hex value) and any other lone
surrogate ``\\uNNNN``; every other character is kept. So ``caf<0xe9>`` is
shown as ``caf\\xe9``, always the same way (stable across scrapes, restarts
and replicas), and nothing ever raises. The mapping is not injective (a folder
literally named ``caf\\xe9`` looks the same); model names that collide are
kept apart by the model discovery (the first one found keeps the name).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

_SURROGATE = re.compile("[\ud800-\udfff]")
T = TypeVar("T")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"


def clean(text: str) -> str:
    """``text`` with every lone surrogate replaced by a visible escape (see above)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape, text)


def needs_cleaning(text: str) -> bool:
    return clean(text) is not text


def encode(text: str) -> bytes:
    """UTF-8 bytes of ``text``, never raising (lone surrogates escaped first)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return clean(text).encode("utf-8")


def clean_tree(obj: T) -> T:
    """``obj`` (dataclasses, lists, tuples, dicts, strings) with every string cleaned;
    the very same object when nothing needed it (the common case costs one walk)."""
    out, _ = _walk(obj, 0)
    return out


def _walk(obj: Any, depth: int) -> tuple[Any, bool]:
    if isinstance(obj, str):
        new = clean(obj)
        return new, new is not obj
    if depth > 32 or obj is None or isinstance(obj, (int, float, bool, bytes)):
        return obj, False
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name, None)
            new, changed = _walk(value, depth + 1)
            if changed:
                changes[f.name] = new
        return (dataclasses.replace(obj, **changes), True) if changes else (obj, False)
    if isinstance(obj, (list, tuple)):
        if not obj or isinstance(obj[0], (int, float)):  # channel indices, shapes: no names
            return obj, False
        items = [_walk(v, depth + 1) for v in obj]
        if not any(c for _, c in items):
            return obj, False
        seq = [v for v, _ in items]
        if isinstance(obj, list):
            return seq, True
        return (type(obj)(*seq) if hasattr(obj, "_fields") else type(obj)(seq)), True
    if isinstance(obj, dict):
        pairs = [(_walk(k, depth + 1), _walk(v, depth + 1)) for k, v in obj.items()]
        if not any(kc or vc for (_, kc), (_, vc) in pairs):
            return obj, False
        return {k: v for (k, _), (v, _) in pairs}, True
    return obj, False
