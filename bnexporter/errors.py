"""The one error type every reader raises: this file cannot be read, and why."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\n``, ``\\x1b``, ...).

    Paths and causes come from the file system and from file contents: a newline
    there would split one log line in two, an escape code would reach a terminal.
    """
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


# The one list of error reasons: report.error_reason, bnexporter_errors_total{reason},
# the page and the docs. (reason, what it means, may the file still be being written)
REASON_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("truncated", "shorter than its own structure says: still being written, or cut", True),
    ("incomplete", "a multi-file checkpoint whose parts are not all there yet", True),
    ("io", "the file could not be read (permissions, vanished, I/O error)", True),
    ("corrupt", "its structure contradicts itself", False),
    ("unsupported", "a format or feature bnexporter does not read", False),
    ("forbidden", "it asks for something never done (code, globals, links outside)", False),
    ("too_large", "over a safety bound (sizes, nesting, amplification)", False),
    ("timeout", "the analysis ran out of time", False),
    ("internal", "a bug in bnexporter, reported instead of crashing", False),
)
REASONS = tuple(r for r, _, _ in REASON_TABLE)
RETRYABLE = frozenset(r for r, _, retry in REASON_TABLE if retry)


class CheckpointError(Exception):
    """A checkpoint could not be read. ``str()`` is one line: ``path: cause``.

    ``reason`` is a short, stable, metric-friendly token (``truncated``,
    ``unsupported``, ``corrupt``, ``forbidden``, ``incomplete``, ``io``, ``too_large``).
    ``retryable`` says whether the file may still be being written, so the daemon
    knows to try again later rather than give up.
    """

    def __init__(self, path: str, cause: str, reason: str = "corrupt", retryable: bool = False):
        self.path = str(path)
        self.cause = printable(" ".join(str(cause).split()))
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"{printable(self.path)}: {self.cause}")
