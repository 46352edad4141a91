"""Checkpoint readers: one module per format, each exporting one ``FORMAT``.

Every reader lists tensors (name, shape, dtype) without touching their data and
reads any flat element range of one tensor on demand, so analysing the four
small vectors of a BatchNorm layer never reads the rest of a large file.
``sniff`` holds the table of formats; nothing outside this package needs to
know which formats exist.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnexporter.formats.base import CheckpointMeta, Reader, TensorInfo
    from bnexporter.formats.sniff import open_reader

__all__ = ["CheckpointMeta", "Reader", "TensorInfo", "open_reader"]
_HOME = {"CheckpointMeta": "base", "Reader": "base", "TensorInfo": "base", "open_reader": "sniff"}


def __getattr__(name: str) -> Any:
    # resolved on first use, so importing one reader never imports every other
    if name in _HOME:
        return getattr(import_module(f"bnexporter.formats.{_HOME[name]}"), name)
    raise AttributeError(name)
