"""Training step from a checkpoint's file name (``ckpt-1200``, ``epoch=3-step=1500``)."""

from __future__ import annotations

import os
import re

_PATTERNS = [
    re.compile(r"(?:^|[^a-z])(?:global_)?step[=_-]?(\d+)", re.I),
    re.compile(r"(?:^|[^a-z])(?:ckpt|checkpoint|iter|iteration|it)[=_.-]?(\d+)", re.I),
    re.compile(r"(?:^|[^a-z])(?:epoch|ep)[=_.-]?(\d+)", re.I),
    # a bare number, not part of a word (h5) or a decimal (0.43)
    re.compile(r"(?<![0-9A-Za-z])(?<!\d\.)(\d+)(?!\d|\.\d)"),
]


def step_from_name(path: str, regex: str | None = None) -> int | None:
    """The number that names a step; with ``regex``, its ``step`` group or first group."""
    name = os.path.basename(path)
    if regex:
        m = re.search(regex, name)
        if not m:
            return None
        value = m.groupdict().get("step") if m.groupdict() else None
        value = value if value is not None else (m.group(1) if m.groups() else m.group(0))
        return int(value) if value and value.isdigit() else None
    # Hugging Face style folders name the step, the file inside does not
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    for part, patterns in ((name, _PATTERNS), (parent, _PATTERNS[:2])):
        for pattern in patterns:
            m = pattern.search(part)
            if m:
                return int(m.group(1))
    return None
