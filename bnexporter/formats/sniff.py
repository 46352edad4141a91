"""Pick a reader from a file's leading bytes (or a TF prefix), never from its extension.

The table below is the one list of formats: detection walks it in order of
precedence, and the daemon derives its default patterns, completeness checks
and forkserver preload list from it.
"""

from __future__ import annotations

import os

from bnexporter.errors import CheckpointError
from bnexporter.formats import (
    hdf5_keras,
    keras_zip,
    npz,
    safetensors,
    tf_bundle,
    torch_export,
    torch_legacy,
    torch_zip,
    torchscript,
)
from bnexporter.formats.base import Reader, read_head
from bnexporter.formats.spec import Format, Incomplete, Probe

# order matters: a .keras archive holds .npy-free members, an npz is any zip of .npy
FORMATS: tuple[Format, ...] = (
    tf_bundle.FORMAT, hdf5_keras.FORMAT, keras_zip.FORMAT, torch_zip.FORMAT,
    torchscript.FORMAT, torch_export.FORMAT, npz.FORMAT, torch_legacy.FORMAT,
    safetensors.FORMAT,
)
# the readers and the libraries they import on first use (the daemon's forkserver
# preloads these, so its analysis processes start with them loaded)
MODULES = (*(m.__name__ for m in (tf_bundle, hdf5_keras, keras_zip, torch_zip, torchscript,
                                  torch_export, npz, torch_legacy, safetensors)), "h5py")
_HEAD = 1024 + 8


def default_patterns() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for f in FORMATS for p in f.patterns))


def _format(path: str) -> Format:
    for fmt in FORMATS:
        if fmt.by_path is not None and fmt.by_path(path):
            return fmt
    probe = Probe(path, read_head(path, _HEAD))  # refuses FIFOs, devices and directories
    if not probe.head:
        raise CheckpointError(path, "file is empty", "truncated", True)
    for fmt in FORMATS:
        if fmt.by_path is None and fmt.sniff(probe):
            return fmt
    head = probe.head
    if probe.is_zip:
        raise CheckpointError(path, "zip archive is neither a .keras, torch nor .npz file",
                              "unsupported")
    if head[:3] == b"PK\x05" or head[:4] == b"PK\x07\x08":
        raise CheckpointError(path, "empty or incomplete zip archive", "truncated", True)
    raise CheckpointError(path, f"unrecognised format (first bytes {head[:8].hex()})",
                          "unsupported")


def detect(path: str) -> str:
    """Return a format key: keras-h5, keras, torch, torchscript, torch-export,
    torch-legacy, safetensors, npz, tf."""
    return _format(path).key


def open_reader(path: str) -> Reader:
    """Open the right reader for ``path``; every failure is a CheckpointError."""
    fmt = _format(path)
    try:
        return fmt.open(path)
    except CheckpointError:
        raise
    except (MemoryError, RecursionError) as exc:
        raise CheckpointError(path, f"refused: {exc.__class__.__name__} while parsing",
                              "too_large") from None
    except Exception as exc:  # a reader bug must still surface as a one-line error
        raise CheckpointError(path, f"{fmt.key} reader failed: {exc.__class__.__name__}: {exc}"
                              ) from None


def incomplete(path: str) -> Incomplete:
    """Cheap "is this file finished?" from the format's own structure; None: looks complete."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
            size = os.fstat(fh.fileno()).st_size
            if path.endswith(".index"):
                return tf_bundle.incomplete(path, fh, head, size)
            if not head:
                return "truncated", "file is empty"
            for fmt in FORMATS:
                if fmt.incomplete is not None and fmt.looks_like(head):
                    return fmt.incomplete(path, fh, head, size)
    except OSError as exc:
        return "io", f"cannot read: {exc.strerror or exc}"
    return None  # other formats: quiescence only
