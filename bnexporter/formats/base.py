"""The reader interface every checkpoint format implements, and safe file I/O."""

from __future__ import annotations

import fcntl
import importlib
import math
import os
import stat
import sys
import threading
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

# storage (raw bits) dtype of each tensor dtype, as Reader.iter_raw yields it
_RAW_BITS = {"float64": "u8", "float32": "u4", "float16": "u2", "bfloat16": "u2",
             "float8_e4m3fn": "u1", "float8_e5m2": "u1", "float8_e4m3fnuz": "u1",
             "float8_e5m2fnuz": "u1", "float8_e8m0fnu": "u1"}


class LazyModule:
    """A library imported on its first use, not when the reader module loads: a scan
    of one format never pays another format's imports (h5py alone is ~30-100 ms).

    ``home.alias = LazyModule(...)``; the first attribute access imports the library
    and puts the real module in its place.
    """

    def __init__(self, name: str, home: str, alias: str):
        self._name, self._home, self._alias = name, home, alias

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        setattr(sys.modules[self._home], self._alias, module)
        return getattr(module, attr)


@dataclass(frozen=True)
class RawExtent:
    """Where a tensor's bytes lie as one contiguous C-order run on disk."""

    file: RangeFile
    offset: int
    big_endian: bool = False


def raw_view(dtype: str) -> np.dtype:
    """How :meth:`Reader.iter_raw` views a dtype's raw items."""
    return np.dtype(_RAW_BITS.get(dtype) or dtypes.raw_code(dtype))


_RAW_BUFFERS = threading.local()


def raw_buffer(nbytes: int) -> np.ndarray:
    """A reused per-thread byte buffer of at least ``nbytes``."""
    buf = getattr(_RAW_BUFFERS, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _RAW_BUFFERS.buf = np.empty(max(nbytes, 1), dtype=np.uint8)
    return buf


def in_raw_buffer(a: np.ndarray) -> bool:
    """Whether ``a`` is a view of this thread's :func:`raw_buffer` (a piece that
    :meth:`Reader.iter_raw` read and overwrites with the next one)."""
    buf = getattr(_RAW_BUFFERS, "buf", None)
    return buf is not None and a.base is buf


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
    # False where the file stores tensors in an order of its own (safetensors: by dtype
    # and name), not the module's construction order
    keeps_module_order: bool = True

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

    def raw_extent(self, name: str) -> RawExtent | None:
        """The tensor's bytes as one run on disk, when the format stores it so."""
        return None

    def iter_raw(self, name: str, piece_elements: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, piece)`` over the whole tensor for the full scan.

        Where :meth:`raw_extent` knows the bytes, each piece is the raw storage bits
        (native byte order; uint16 for float16 / bfloat16, uint32 for float32, uint64
        for float64, uint8 codes for float8, the integer dtype itself otherwise), read
        straight into one reused buffer: no allocation, no copy besides the read. The
        piece is only valid until the next one is requested. Elsewhere, decoded chunks
        of ``piece_elements`` (what :meth:`iter_chunks` gives).
        """
        info = self.info(name)
        ext = self.raw_extent(name) if info.size else None
        if ext is None:
            yield from self.iter_chunks(name, piece_elements)
            return
        size = dtypes.itemsize(info.dtype)
        view = raw_view(info.dtype)
        step = max(1, piece_elements)
        buf = raw_buffer(step * size)
        for start in range(0, info.size, step):
            n = min(step, info.size - start)
            part = buf[: n * size]
            ext.file.readinto(ext.offset + start * size, part)
            arr = part.view(view)
            if ext.big_endian and size > 1:
                arr.byteswap(inplace=True)
            yield start, arr

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

    def readinto(self, offset: int, out: np.ndarray) -> None:
        """Fill the byte array ``out`` from ``offset``, bounds-checked like :meth:`read`."""
        nbytes = out.size
        if offset < 0 or offset + nbytes > self.size:
            raise CheckpointError(
                self.path,
                f"read of {nbytes} bytes at offset {offset} is outside the file "
                f"({self.size} bytes)", "truncated", True)
        mv = out.data.cast("B")
        pos, done = self.base + offset, 0
        while done < nbytes:
            try:
                got = os.preadv(self.fd, [mv[done:]], pos + done)
            except OSError as exc:
                raise CheckpointError(self.path, f"read failed: {exc.strerror}", "io", True
                                      ) from None
            if got <= 0:
                raise CheckpointError(self.path, "file shrank while being read", "truncated",
                                      True)
            done += got

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

    def raw_extent(self, name: str) -> RawExtent | None:
        if self._file is None:
            return None
        return RawExtent(self._file, self._offsets[self.info(name).name], self.big_endian)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
