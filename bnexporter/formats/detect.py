"""Pick a reader from a file's leading bytes, never from its extension."""

from __future__ import annotations

import os
import re
import zipfile

from ..errors import CheckpointError
from .base import Reader, read_head

_HEAD = 1024 + 8
# pickle protocol 2 + LONG1 of the legacy torch magic number 0x1950a86a20f9469cfc6c
_TORCH_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")


def _zip_kind(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(path, f"incomplete or corrupt zip archive ({exc})",
                              "truncated", True) from None
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(path, f"unreadable zip archive ({exc})") from None
    top = set(names)
    if "model.weights.h5" in top or ("config.json" in top and "metadata.json" in top):
        return "keras"
    if names:
        root = names[0].split("/", 1)[0]
        if f"{root}/constants.pkl" in top:
            return "torchscript"
        if f"{root}/data.pkl" in top:
            return "torch"
    if any(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


_TF_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")


def _is_tf_bundle(path: str) -> bool:
    """A TF checkpoint is a prefix, its ``.index``, a data shard or its folder."""
    if path.endswith(".index") or os.path.basename(path) == "checkpoint":
        return True
    if _TF_SHARD.search(path):
        return True
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "checkpoint"))
    return not os.path.exists(path) and os.path.isfile(path + ".index")


def detect(path: str) -> str:
    """Return a format key: keras-h5, keras, torch, torch-legacy, safetensors, npz, tf."""
    from . import safetensors

    if _is_tf_bundle(path):
        return "tf"
    head = read_head(path, _HEAD)  # refuses FIFOs, devices and directories
    if not head:
        raise CheckpointError(path, "file is empty", "truncated", True)
    for off in (0, 512, 1024):
        if head[off:off + 8] == b"\x89HDF\r\n\x1a\n":
            return "keras-h5"
    if head[:4] == b"PK\x03\x04":
        return _zip_kind(path)
    if head[:16].startswith(_TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if safetensors.looks_like(head):
        return "safetensors"
    if head[:3] == b"PK\x05" or head[:4] == b"PK\x07\x08":
        raise CheckpointError(path, "empty or incomplete zip archive", "truncated", True)
    raise CheckpointError(path, f"unrecognised format (first bytes {head[:8].hex()})",
                          "unsupported")


def open_reader(path: str) -> Reader:
    """Open the right reader for ``path``; every failure is a CheckpointError."""
    kind = detect(path)
    try:
        return _open(kind, path)
    except CheckpointError:
        raise
    except (MemoryError, RecursionError) as exc:
        raise CheckpointError(path, f"refused: {exc.__class__.__name__} while parsing",
                              "too_large") from None
    except Exception as exc:  # a reader bug must still surface as a one-line error
        raise CheckpointError(path, f"{kind} reader failed: {exc.__class__.__name__}: {exc}"
                              ) from None


def _open(kind: str, path: str) -> Reader:
    if kind == "keras-h5":
        from .hdf5_keras import KerasH5Reader

        return KerasH5Reader(path)
    if kind == "keras":
        from .keras_zip import KerasZipReader

        return KerasZipReader(path)
    if kind == "safetensors":
        from .safetensors import SafetensorsReader

        return SafetensorsReader(path)
    if kind == "npz":
        from .npz import NpzReader

        return NpzReader(path)
    if kind == "torch":
        from .torch_zip import TorchZipReader

        return TorchZipReader(path)
    if kind == "torch-legacy":
        from .torch_legacy import TorchLegacyReader

        return TorchLegacyReader(path)
    if kind == "tf":
        from .tf_bundle import TFBundleReader

        return TFBundleReader(path)
    if kind == "torchscript":
        raise CheckpointError(path, "TorchScript archives are not supported (save a "
                              "state_dict instead)", "unsupported")
    raise CheckpointError(path, "zip archive is neither a .keras, torch nor .npz file",
                          "unsupported")
