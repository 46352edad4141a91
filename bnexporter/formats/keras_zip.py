"""Keras 3 ``.keras`` archives: ``config.json`` plus an inner ``model.weights.h5``.

Nothing is extracted to disk: h5py reads the inner file through a window onto
the zip member, and tensor bytes are read straight from the archive.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from bnexporter.errors import CheckpointError
from bnexporter.formats import zipmember
from bnexporter.formats.base import open_regular
from bnexporter.formats.hdf5_keras import KerasH5Reader
from bnexporter.formats.spec import Format, Probe

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_CONFIG_BYTES = 64 << 20
_MAX_RATIO = 100  # a deflated member claiming more than this inflation is refused
# a deflated model.weights.h5 up to this size is inflated into memory (one pass, CRC
# checked); a larger one is inflated piece by piece as it is read (_Inflating)
_INFLATE_MAX = 64 << 20


class _Seekable(io.RawIOBase):
    """Read-only and seekable over ``_size`` bytes of one open file; subclasses provide
    ``readinto``."""

    _pos = 0
    _size = 0
    _fd = -1

    def __init__(self, path: str):
        super().__init__()
        self._fd = open_regular(path)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        ref = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, ref + offset)
        return self._pos

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


class _Window(_Seekable):
    """A read-only, seekable view of ``[base, base+size)`` of a file, for h5py."""

    def __init__(self, path: str, base: int, size: int):
        super().__init__(path)
        self._base, self._size, self._pos = base, size, 0

    def readinto(self, buf: WriteableBuffer) -> int:
        view = memoryview(buf)
        n = max(0, min(len(view), self._size - self._pos))
        data = os.pread(self._fd, n, self._base + self._pos) if n else b""
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _Inflating(_Seekable):
    """A read-only, seekable view of a *deflated* member's inflated bytes, for h5py,
    without inflating the member into memory.

    One decompressor moves forward through the stream; every ``MARK`` bytes of
    output a copy of its state is kept (the 32 KiB window plus a few KiB, ~40 KiB:
    ~40 MB per 4 GB of member), so a seek backwards (or far ahead) restarts from the
    nearest mark and inflates at most ``MARK`` bytes to get there; small reads go
    through a bounded page cache. Sequential reads, such as a dataset's bytes in a
    full scan, cost one pass. Output never runs past the declared size. Opening still
    inflates the member once up to its last metadata (~2-4 s per GB), twice with the
    forked metadata probe.
    """

    MARK = 4 << 20
    _IN = 256 << 10   # compressed bytes per read
    _OUT = 1 << 20    # inflated bytes per decompress call (bounds a zero-filled burst)
    # small reads (libhdf5's metadata: ~4,000 reads of ~512 bytes, backwards a third of
    # the time, over ~200 distinct 64 KiB pages of a 1 GB file) come from a page cache
    PAGE = 64 << 10
    PAGES = 512       # 32 MB at most

    def __init__(self, path: str, base: int, csize: int, usize: int):
        super().__init__(path)
        self._base, self._csize, self._size, self._pos = base, csize, usize, 0
        self._d = zlib.decompressobj(-15)
        self._out = self._in = 0     # inflated bytes produced / compressed bytes read
        self._tail = b""             # read but not yet consumed compressed bytes
        self._marks: list[tuple[int, int, Any]] = [(0, 0, self._d.copy())]
        self._pages: OrderedDict[int, bytes] = OrderedDict()

    def _inflate(self, n: int) -> bytes:
        """Up to ``n`` more inflated bytes from the current state (fewer at the end)."""
        parts = []
        while n > 0 and not self._d.eof:
            if not self._tail:
                k = min(self._IN, self._csize - self._in)
                if k <= 0:
                    break
                self._tail = os.pread(self._fd, k, self._base + self._in)
                if not self._tail:
                    break  # the file shrank: a short read, h5py reports it
                self._in += len(self._tail)
            try:
                chunk = self._d.decompress(self._tail, min(n, self._OUT))
            except zlib.error as exc:
                raise OSError(f"bad deflate data in model.weights.h5 ({exc})") from None
            self._tail = self._d.unconsumed_tail
            self._out += len(chunk)
            n -= len(chunk)
            parts.append(chunk)
            if self._out >= self._marks[-1][0] + self.MARK:
                self._marks.append((self._out, self._in - len(self._tail), self._d.copy()))
        return b"".join(parts)

    def _goto(self, pos: int) -> None:
        if pos < self._out or pos - self._out > self.MARK:
            i = bisect.bisect_right([m[0] for m in self._marks], pos) - 1
            out, inp, state = self._marks[i]
            if not out <= self._out <= pos:
                self._d, self._out, self._in, self._tail = state.copy(), out, inp, b""
        while self._out < pos:
            if not self._inflate(min(pos - self._out, self._OUT)):
                break

    def _read(self, pos: int, n: int) -> bytes:
        self._goto(pos)
        return self._inflate(n) if self._out == pos else b""

    def _page(self, index: int) -> bytes:
        page = self._pages.get(index)
        if page is None:
            page = self._pages[index] = self._read(index * self.PAGE, self.PAGE)
            if len(self._pages) > self.PAGES:
                self._pages.popitem(last=False)
        else:
            self._pages.move_to_end(index)
        return page

    def readinto(self, buf: WriteableBuffer) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if not n:
            return 0
        if n > self.PAGE:  # a dataset's bytes: straight from the stream
            data = self._read(self._pos, n)
        else:
            first, last = self._pos // self.PAGE, (self._pos + n - 1) // self.PAGE
            joined = b"".join(self._page(i) for i in range(first, last + 1))
            start = self._pos - first * self.PAGE
            data = joined[start: start + n]
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._marks = []
        self._pages.clear()
        super().close()


def _data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start: read from its *local* header, whose extra
    field may differ from the central directory's."""
    fd = open_regular(path)
    try:
        header = os.pread(fd, 30, info.header_offset)
    except (OSError, OverflowError) as exc:
        raise CheckpointError(path, f"zip member {info.filename}: bad local header offset "
                              f"({exc})") from None
    finally:
        os.close(fd)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(path, f"zip member {info.filename}: bad local header", "corrupt")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _inflate(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, never more than its declared size.

    ``zf.read()`` inflates the whole deflate stream whatever the header declares;
    a bounded ``read(n)`` stops the decompressor at ``n`` bytes.
    """
    try:
        with zf.open(info) as fh:
            data = fh.read(info.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError,
            NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(path, f"zip member {info.filename} unreadable ({exc})") from None
    if len(data) != info.file_size:
        raise CheckpointError(path, f"zip member {info.filename} holds {len(data)} bytes, "
                              f"not the {info.file_size} its header declares")
    return data


class KerasZipReader(KerasH5Reader):
    def __init__(self, path: str):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(path, f"incomplete or corrupt zip archive ({exc})",
                                  "truncated", True) from None
        except (ValueError, NotImplementedError, RuntimeError, EOFError) as exc:
            raise CheckpointError(path, f"unreadable zip archive ({exc})") from None
        with zf:
            names = {i.filename: i for i in zf.infolist()}
            member = names.get("model.weights.h5")
            if member is None:
                what = "model.weights.npz (unsupported)" if "model.weights.npz" in names \
                    else "no model.weights.h5"
                raise CheckpointError(path, f".keras archive has {what}", "unsupported")
            config = None
            cfg_info = names.get("config.json")
            if cfg_info is not None:
                if cfg_info.file_size > MAX_CONFIG_BYTES:
                    raise CheckpointError(path, f"config.json declares {cfg_info.file_size} "
                                          "bytes; refusing", "too_large")
                try:
                    config = json.loads(_inflate(path, zf, cfg_info).decode("utf-8"))
                except (ValueError, RecursionError) as exc:
                    raise CheckpointError(path, f"config.json unreadable ({exc})") from None
            stored = member.compress_type == zipfile.ZIP_STORED
            if not stored and member.file_size > _MAX_RATIO * max(member.compress_size, 1):
                raise CheckpointError(
                    path, f"model.weights.h5 inflates {member.compress_size} -> "
                    f"{member.file_size} bytes: refusing a likely zip bomb", "too_large")
            if stored:
                base = _data_offset(path, member)
                fileobj: io.IOBase = _Window(path, base, member.file_size)
            elif member.file_size <= _INFLATE_MAX or member.compress_type != zipfile.ZIP_DEFLATED:
                base = 0
                fileobj = io.BytesIO(_inflate(path, zf, member))
            else:  # inflated as h5py reads it, never whole (memory stays bounded)
                base = 0
                fileobj = _Inflating(path, _data_offset(path, member), member.compress_size,
                                     member.file_size)
        try:
            super().__init__(path, fileobj=fileobj, base_offset=base,
                             member_size=member.file_size, direct_io=stored)
        except Exception:
            fileobj.close()
            raise
        self._fileobj = fileobj
        self.format = "keras"
        if isinstance(config, dict):
            self.meta.model_config = config
        elif config is not None:
            self.meta.notes.append("config.json is not a JSON object; ignored")

    def close(self) -> None:
        super().close()
        fileobj = getattr(self, "_fileobj", None)
        if fileobj is not None:
            fileobj.close()


def _sniff(probe: Probe) -> bool:
    if not probe.is_zip:
        return False
    top = set(probe.members())
    return "model.weights.h5" in top or ("config.json" in top and "metadata.json" in top)


FORMAT = Format("keras", zipmember.looks_like, _sniff, KerasZipReader, zipmember.incomplete,
                ("*.keras",))
