"""The reader interface every checkpoint format implements, and safe file I/O."""

from __future__ import annotations

import fcntl
import math
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnexporter.errors import CheckpointError
from bnexporter.formats import dtypes

# Elements per chunk when a tensor is scanned in full: 4 Mi elements keeps a
# float32 chunk plus its temporaries well under 100 MB whatever the tensor size.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class CheckpointMeta:
    """What a file says about itself beyond raw tensors.

    ``framework`` selects the naming convention for BatchNorm discovery
    (``keras``, ``torch``, ``tf``, ``generic``). ``model_config`` is a Keras model
    config (dict) when the file carries one. ``bn_eps`` maps a BN layer name to the
    epsilon found in the file itself (e.g. a pickled torch module).
    """

    framework: str = "generic"
    model_config: dict[str, Any] | None = None
    step: int | None = None
    bn_eps: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # tensor names that are not model weights (optimizer slots, ...): scanned
    # for non-finite values but never grouped into BN layers
    auxiliary: frozenset[str] = frozenset()
    # Keras >= 3.6: tensor path prefix ("layers/conv2d_3") -> layer name, from the file
    layer_names: dict[str, str] = field(default_factory=dict)


class Reader(ABC):
    """Base class: subclasses fill ``_infos`` and implement ``_read_flat``."""

    format: str = "unknown"

    def __init__(self, path: str):
        self.path = str(path)
        self.meta = CheckpointMeta()
        self._infos: dict[str, TensorInfo] = {}

    # -- interface -----------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in file order; cheaper than :meth:`tensors` for lazy readers."""
        return list(self._infos)

    def tensors(self) -> list[TensorInfo]:
        out = []
        for name in list(self.names()):
            try:
                out.append(self.info(name))
            except KeyError:  # a lazily opened entry turned out not to hold a tensor
                continue
        return out

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat elements ``[start, stop)`` of a tensor, decoded to a numpy dtype."""
        info = self.info(name)
        stop = info.size if stop is None else min(stop, info.size)
        start = max(0, min(start, stop))
        if stop == start:
            return np.zeros(0, dtype=np.float32 if dtypes.is_float(info.dtype) else np.int64)
        return self._read_flat(info, start, stop)

    def read_array(self, name: str) -> np.ndarray:
        info = self.info(name)
        return self.read(name).reshape(info.shape)

    def iter_chunks(self, name: str, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                    align: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, flat_chunk)``; chunk boundaries are multiples of ``align``."""
        info = self.info(name)
        step = max(align, (chunk_elements // max(align, 1)) * max(align, 1))
        for start in range(0, info.size, step):
            yield start, self.read(name, start, start + step)

    def close(self) -> None:  # noqa: B027  (readers without handles need nothing)
        """Release file handles; safe to call twice."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------
    def _parse_or_close(self) -> None:
        """Run the subclass's ``_parse``; a failure releases the handles it opened."""
        try:
            self._parse()  # type: ignore[attr-defined]
        except Exception:
            self.close()
            raise

    @abstractmethod
    def _read_flat(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        ...

    def error(self, cause: str, reason: str = "corrupt", retryable: bool = False
              ) -> CheckpointError:
        return CheckpointError(self.path, cause, reason, retryable)


def open_regular(path: str) -> int:
    """A read-only fd on ``path``, refused unless it is a regular file.

    ``open()`` of a FIFO blocks until a writer appears and opening a device can
    have side effects, so the type is checked before opening; the open itself is
    non-blocking and re-checked with ``fstat`` in case the path was swapped.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot open: {exc.strerror}", "io") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(path, "is a directory, not a checkpoint file", "unsupported")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, "not a regular file", "unsupported")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(path, f"cannot open: {exc.strerror}", "io") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(path, "not a regular file", "unsupported")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def read_head(path: str, nbytes: int) -> bytes:
    """The first ``nbytes`` of a regular file (see :func:`open_regular`)."""
    fd = open_regular(path)
    try:
        return os.pread(fd, nbytes, 0)
    except OSError as exc:
        raise CheckpointError(path, f"read failed: {exc.strerror}", "io", True) from None
    finally:
        os.close(fd)


class RangeFile:
    """Explicit positional reads of byte ranges, bounds-checked.

    Deliberately not mmap: a memory-mapped file that another process truncates
    raises SIGBUS and kills the whole daemon; ``os.pread`` just returns short.
    """

    def __init__(self, path: str, base: int = 0, length: int | None = None):
        self.path = path
        self.fd = open_regular(path)
        total = os.fstat(self.fd).st_size
        self.base = base
        self.size = total - base if length is None else length
        if base + self.size > total:
            self.close()
            raise CheckpointError(path, "member extends past end of file", "truncated", True)

    def read(self, offset: int, nbytes: int) -> bytes:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CheckpointError(
                self.path,
                f"read of {nbytes} bytes at offset {offset} is outside the file "
                f"({self.size} bytes)", "truncated", True)
        chunks = []
        pos = self.base + offset
        remaining = nbytes
        while remaining:
            try:
                data = os.pread(self.fd, min(remaining, 1 << 26), pos)
            except OSError as exc:
                raise CheckpointError(self.path, f"read failed: {exc.strerror}", "io", True
                                      ) from None
            if not data:
                raise CheckpointError(self.path, "file shrank while being read", "truncated",
                                      True)
            chunks.append(data)
            pos += len(data)
            remaining -= len(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)


class OffsetReader(Reader):
    """A reader for formats whose tensors are contiguous C-order byte ranges."""

    big_endian = False

    def __init__(self, path: str):
        super().__init__(path)
        self._offsets: dict[str, int] = {}
        self._file: RangeFile | None = None

    def _read_flat(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        assert self._file is not None
        size = dtypes.itemsize(info.dtype)
        raw = self._file.read(self._offsets[info.name] + start * size, (stop - start) * size)
        return dtypes.decode(raw, info.dtype, self.big_endian)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
