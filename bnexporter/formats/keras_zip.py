"""Keras 3 ``.keras`` archives: ``config.json`` plus an inner ``model.weights.h5``.

Nothing is extracted to disk: h5py reads the inner file through a window onto
the zip member, and tensor bytes are read straight from the archive.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from typing import TYPE_CHECKING

from bnexporter.errors import CheckpointError
from bnexporter.formats import zipmember
from bnexporter.formats.base import open_regular
from bnexporter.formats.hdf5_keras import KerasH5Reader
from bnexporter.formats.spec import Format, Probe

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_CONFIG_BYTES = 64 << 20
_MAX_RATIO = 100  # a deflated member claiming more than this inflation is refused


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``[base, base+size)`` of a file, for h5py."""

    def __init__(self, path: str, base: int, size: int):
        self._fd = open_regular(path)
        self._base, self._size, self._pos = base, size, 0

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

    def readinto(self, buf: WriteableBuffer) -> int:
        view = memoryview(buf)
        n = max(0, min(len(view), self._size - self._pos))
        data = os.pread(self._fd, n, self._base + self._pos) if n else b""
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
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
            elif member.file_size <= (256 << 20):
                base = 0
                fileobj = io.BytesIO(_inflate(path, zf, member))
            else:
                raise CheckpointError(path, "model.weights.h5 is compressed and over 256 MB: "
                                      "unsupported (Keras itself stores it uncompressed)",
                                      "unsupported")
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
