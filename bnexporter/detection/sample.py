"""Load and validate a user's census sample (unlabeled model inputs).

Accepted files: ``.npy`` (one array) and ``.npz`` (the array under key ``x`` or
``inputs``, else the first one). Pickled objects are refused (``allow_pickle=False``).

Validation, each failure a one-line :class:`~bnexporter.errors.CheckpointError`
naming the file and the cause:

- size: the file, and the array it declares, at most ``max_bytes`` (256 MiB);
- dtype: float16 / float32 / float64, or uint8. Everything is returned as float32;
  uint8 values are kept as they are (0..255, **not** rescaled): feed the sample the
  model was trained on, already preprocessed;
- rank >= 2 with N >= 1 inputs, every value finite;
- shape against the model input ``expect_shape`` (one input, in the graph's layout,
  ``None`` = any size): a sample in the other channel order (NHWC given for an NCHW
  model or the reverse) is transposed when only that reading fits. One input
  without its batch axis is accepted as N = 1.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

import numpy as np

from bnexporter.errors import CheckpointError

MAX_BYTES = 256 << 20
_KEYS = ("x", "inputs")
_DTYPES = {"float16", "float32", "float64", "uint8"}


def _fits(shape: Sequence[int], want: Sequence[int | None]) -> bool:
    return len(shape) == len(want) and all(w is None or w < 0 or int(w) == int(s)
                                           for s, w in zip(shape, want, strict=True))


def _fmt(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def _check_npy_header(path: str, fileobj: object, max_bytes: int, label: str) -> None:
    """Read a .npy header only: refuse object dtypes and oversized arrays before loading."""
    try:
        version = np.lib.format.read_magic(fileobj)  # type: ignore[arg-type]
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fileobj)  # type: ignore
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fileobj)  # type: ignore
    except Exception as exc:
        raise CheckpointError(path, f"{label}not a valid .npy array ({exc})", "corrupt") from None
    if dtype.hasobject:
        raise CheckpointError(path, f"{label}holds Python objects (pickle): refused",
                              "forbidden")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > max_bytes:
        raise CheckpointError(path, f"{label}array of {nbytes} bytes exceeds the sample cap of "
                              f"{max_bytes} bytes", "too_large")


def _read(path: str, max_bytes: int) -> np.ndarray:
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise CheckpointError(path, f"cannot open sample: {exc.strerror}", "io") from None
    if not os.path.isfile(path):
        raise CheckpointError(path, "sample is not a regular file", "unsupported")
    if size > max_bytes:
        raise CheckpointError(path, f"sample file of {size} bytes exceeds the cap of "
                              f"{max_bytes} bytes", "too_large")
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head.startswith(b"PK"):
        return _read_npz(path, max_bytes)
    if head != b"\x93NUMPY":
        raise CheckpointError(path, "sample is neither a .npy nor a .npz file", "unsupported")
    with open(path, "rb") as fh:
        _check_npy_header(path, fh, max_bytes, "")
    try:
        return np.load(path, allow_pickle=False, mmap_mode=None)
    except Exception as exc:
        raise CheckpointError(path, f"cannot read .npy sample ({exc.__class__.__name__}: "
                              f"{exc})", "corrupt") from None


def _read_npz(path: str, max_bytes: int) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
            if not members:
                raise CheckpointError(path, "npz sample holds no array", "unsupported")
            by_key = {i.filename[:-4]: i for i in members}
            info = next((by_key[k] for k in _KEYS if k in by_key), members[0])
            key = info.filename[:-4]
            if info.file_size > max_bytes:
                raise CheckpointError(path, f"array {key!r} of {info.file_size} bytes exceeds "
                                      f"the sample cap of {max_bytes} bytes", "too_large")
            with zf.open(info) as fh:
                _check_npy_header(path, fh, max_bytes, f"array {key!r}: ")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(path, f"corrupt .npz sample ({exc})", "corrupt") from None
    try:
        with np.load(path, allow_pickle=False, mmap_mode=None) as npz:
            return np.asarray(npz[key])
    except Exception as exc:
        raise CheckpointError(path, f"cannot read array {key!r} of the .npz sample "
                              f"({exc.__class__.__name__}: {exc})", "corrupt") from None


def _all_finite(x: np.ndarray, chunk: int = 1 << 22) -> bool:
    flat = x.reshape(-1)
    return all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))


def load_sample(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES,
                expect_shape: Sequence[int | None] | None = None,
                layout: str | None = None) -> np.ndarray:
    """The sample in ``path`` as float32 ``(N, *expect_shape)``.

    ``expect_shape`` is one model input in the graph's layout (``Graph.input_shape``);
    ``layout`` (``"nhwc"`` / ``"nchw"``) says which axis is the channel one and only
    makes the error messages clearer: the transposition is decided by shape alone.
    """
    p = os.fspath(path)
    x = _read(p, max_bytes)
    if x.dtype.name not in _DTYPES:
        raise CheckpointError(p, f"sample dtype {x.dtype} is not supported (float16, "
                              "float32, float64 or uint8)", "unsupported")
    if expect_shape is not None:
        want = tuple(expect_shape)
        if x.ndim == len(want) and _fits(x.shape, want):
            x = x[None]  # one input without its batch axis
        got = x.shape[1:]
        if not _fits(got, want):
            moved = None
            if x.ndim >= 3:
                first = np.moveaxis(x, 1, -1)   # NCHW -> NHWC
                last = np.moveaxis(x, -1, 1)    # NHWC -> NCHW
                fits = [a for a in (first, last) if _fits(a.shape[1:], want)]
                if len(fits) == 1:
                    moved = fits[0]
            if moved is None:
                where = f" ({layout})" if layout else ""
                raise CheckpointError(
                    p, f"sample of shape {_fmt(x.shape)} does not match the model input "
                    f"(N, {', '.join('?' if w is None else str(w) for w in want)}){where}",
                    "unsupported")
            x = moved
    if x.ndim < 2:
        raise CheckpointError(p, f"sample of shape {_fmt(x.shape)}: expected (N, ...) "
                              "with a batch axis", "unsupported")
    if x.shape[0] < 1:
        raise CheckpointError(p, "sample holds no inputs (N = 0)", "unsupported")
    if x.size == 0:
        raise CheckpointError(p, f"sample of shape {_fmt(x.shape)} is empty", "unsupported")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: caught just below
        out = np.ascontiguousarray(x, dtype=np.float32)
    if not _all_finite(out):
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise CheckpointError(p, f"sample has {bad} NaN or Inf values", "corrupt")
    return out


__all__ = ["MAX_BYTES", "load_sample"]
