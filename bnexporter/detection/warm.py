"""A model's distilled inputs kept between analyses: the next checkpoint's warm start.

Distilling from noise takes hundreds of optimiser steps; from the previous checkpoint's
inputs a few dozen (docs/distill.md). The daemon analyses each checkpoint in a child
process, so the inputs live in a file per model: ``<cache>/<model>.npz`` holding ``x``
(the inputs, graph layout) and ``loss`` (the objective they reached).

The file only ever seeds an optimisation, yet it is read as untrusted: no pickles, the
sample loader's size and finiteness checks, and a cache directory that is not ours or
that others can write is refused (the distillation then starts cold), never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
import zipfile

import numpy as np

from bnexporter.detection.sample import load_sample
from bnexporter.errors import CheckpointError

MAX_BYTES = 64 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def default_dir() -> str:
    """Per user, under the temporary directory: lost on reboot, which only costs one
    cold start per model."""
    return os.path.join(tempfile.gettempdir(), f"bnexporter-{os.getuid()}", "distilled")


def path_for(cache: str, model: str) -> str:
    """The model's file: its name made safe, plus a hash so that two names that sanitise
    alike (``a/b``, ``a_b``) never share a file."""
    tag = hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return os.path.join(cache, f"{_UNSAFE.sub('_', model)[:80]}-{tag}.npz")


def _private_dir(folder: str) -> str | None:
    """``None`` if ``folder`` is (or was made) a directory of ours that only we can
    write, else why not."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError as exc:
        return f"cannot create {folder}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a directory"
    if st.st_uid != os.getuid():
        return f"{folder} belongs to another user"
    if st.st_mode & 0o022:
        return f"{folder} is writable by others"
    return None


def load(path: str, shape: tuple[int, ...] | None) -> tuple[np.ndarray, float] | None:
    """The kept inputs and their objective, or ``None`` when there are none yet.

    A file that exists but cannot be used raises :class:`CheckpointError` (a note for
    the report; the caller starts cold).
    """
    problem = _private_dir(os.path.dirname(path) or ".")
    if problem is not None:
        raise CheckpointError(path, f"warm start refused: {problem}", "unsupported")
    if not os.path.exists(path):
        return None
    x = load_sample(path, max_bytes=MAX_BYTES, expect_shape=shape)
    try:
        with np.load(path, allow_pickle=False) as z:
            loss = float(np.asarray(z["loss"]).reshape(-1)[0]) if "loss" in z.files else 0.0
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise CheckpointError(path, f"warm start unreadable: {exc}", "unsupported") from None
    if not np.isfinite(loss) or loss < 0:
        raise CheckpointError(path, f"warm start loss {loss!r} is not a number >= 0",
                              "unsupported")
    return x, loss


def save(path: str, x: np.ndarray, loss: float) -> str | None:
    """Replace the kept inputs atomically; ``None`` on success, else why not."""
    folder = os.path.dirname(path) or "."
    problem = _private_dir(folder)
    if problem is not None:
        return problem
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".warm-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, x=np.ascontiguousarray(x, np.float32), loss=np.float64(loss))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return f"cannot write {path}: {exc.strerror or exc}"
    return None
