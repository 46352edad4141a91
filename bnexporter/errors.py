"""The one error type every reader raises: this file cannot be read, and why."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint could not be read. ``str()`` is one line: ``path: cause``.

    ``reason`` is a short, stable, metric-friendly token (``truncated``,
    ``unsupported``, ``corrupt``, ``forbidden``, ``incomplete``, ``io``, ``too_large``).
    ``retryable`` says whether the file may still be being written, so the daemon
    knows to try again later rather than give up.
    """

    def __init__(self, path: str, cause: str, reason: str = "corrupt", retryable: bool = False):
        self.path = str(path)
        self.cause = " ".join(str(cause).split())
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"{self.path}: {self.cause}")
