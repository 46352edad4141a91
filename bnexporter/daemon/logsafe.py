"""Log lines that a file name cannot forge.

Model, layer, tensor and file names come from folders anyone on a shared
filesystem can create. A name containing a newline would otherwise start a
line that looks like the daemon's own (``... WARNING bnexporter: model x is
fine``), and terminal escape sequences could rewrite what an operator sees.
Every control character in the *message* is therefore written as a visible
escape (``\\n``, ``\\x1b``). Tracebacks keep their line breaks but every
line of them is indented, so text from an exception message can never start a
line of its own at the left margin.
"""

from __future__ import annotations

import logging
import re
from types import TracebackType

# C0 controls, DEL, C1 controls, the Unicode line/paragraph separators, and lone
# surrogates (bytes of a file name that are not UTF-8: ``\\xNN``, as in names.py)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def escape_controls(text: str) -> str:
    """``text`` with every control character replaced by a printable escape."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(_one, text)


def _one(m: re.Match[str]) -> str:
    c = m.group()
    n = ord(c)
    if c in _NAMED:
        return _NAMED[c]
    if n < 0x100:
        return f"\\x{n:02x}"
    if 0xDC80 <= n <= 0xDCFF:  # an undecodable byte of a file name
        return f"\\x{n - 0xDC00:02x}"
    return f"\\u{n:04x}"


class SafeFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose message part is one line of printable text."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.splitlines())
