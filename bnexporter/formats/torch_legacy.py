"""PyTorch's legacy (< 1.6, ``_use_new_zipfile_serialization=False``) format.

The file is a sequence: pickled magic number, protocol version (1001),
``sys_info``, the object pickle (storages as persistent ids ``('storage',
StorageType, key, location, numel, view)``), the list of storage keys, then for
each key in that order an int64 element count and the raw little-endian bytes.
Each pickle's extent is found by walking its opcodes, and the storages' offsets
by hopping over the counts, so only the pickles and 8 bytes per storage are
read when the file is opened.
"""

from __future__ import annotations

import io
import struct

from bnexporter.formats import torch_pickle
from bnexporter.formats.base import RangeFile
from bnexporter.formats.spec import Format
from bnexporter.formats.torch_pickle import Refused, StorageRef
from bnexporter.formats.torch_zip import TORCH_PATTERNS, TorchReaderBase

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
HEAD = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")


def looks_like(head: bytes) -> bool:
    """The magic number pickled with protocol 2 (what every torch version wrote)."""
    return head.startswith(HEAD)


class _Stream(io.RawIOBase):
    """A read-only, buffered window of a RangeFile for :func:`pickletools.genops`."""

    def __init__(self, f: RangeFile, pos: int, limit: int):
        super().__init__()
        self._f = f
        self._end = pos + limit
        self._pos = pos
        self._buf = b""
        self._buf_pos = pos

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._f.size - self._pos
        n = max(0, min(n, self._f.size - self._pos))
        end = self._pos + n
        if end > self._end:
            raise Refused("pickle is larger than the pickle size limit", "too_large")
        if not (self._buf_pos <= self._pos and end <= self._buf_pos + len(self._buf)):
            self._buf_pos = self._pos
            self._buf = self._f.read(self._pos, min(self._f.size - self._pos,
                                                    max(n, 1 << 16)))
        out = self._buf[self._pos - self._buf_pos:end - self._buf_pos]
        self._pos = end
        return out

    def readline(self, limit: int | None = -1) -> bytes:
        out = bytearray()
        while True:
            ch = self.read(1)
            if not ch:
                return bytes(out)
            out += ch
            if ch == b"\n" or (limit is not None and 0 < limit <= len(out)):
                return bytes(out)


class TorchLegacyReader(TorchReaderBase):
    format = "torch-legacy"

    def __init__(self, path: str):
        super().__init__(path)
        self._file = RangeFile(path)
        self._spans: dict[str, tuple[int, int]] = {}
        self._parse_or_close()

    def _pickle_at(self, pos: int, what: str, storages: dict[str, StorageRef] | None = None
                   ) -> tuple[object, int]:
        """Unpickle the pickle starting at ``pos``; return it and where it ends."""
        assert self._file is not None
        try:
            limit = torch_pickle.MAX_PICKLE_BYTES
            length = torch_pickle.prescan(_Stream(self._file, pos, limit), limit)
            data = self._file.read(pos, length)
            return torch_pickle.load(data, legacy=True, storages=storages), pos + length
        except Refused as exc:
            retry = exc.reason == "truncated"
            raise self.error(f"{what}: {exc.cause}", exc.reason, retry) from None

    def _parse(self) -> None:
        f = self._file
        assert f is not None
        if not looks_like(f.read(0, min(f.size, len(HEAD)))):
            raise self.error("not a legacy torch file (magic number missing)", "unsupported")
        magic, pos = self._pickle_at(0, "magic number")
        version, pos = self._pickle_at(pos, "protocol version")
        if magic != MAGIC or version != PROTOCOL_VERSION:
            raise self.error(f"unexpected legacy header (magic {magic!r}, protocol "
                             f"{version!r})", "unsupported")
        sys_info, pos = self._pickle_at(pos, "sys_info")
        if not isinstance(sys_info, dict):
            raise self.error("sys_info is not a dict")
        storages: dict[str, StorageRef] = {}
        root, pos = self._pickle_at(pos, "object pickle", storages)
        keys, pos = self._pickle_at(pos, "storage key list")
        if not isinstance(keys, list) or not all(isinstance(k, (str, bytes)) for k in keys):
            raise self.error("storage key list is not a list of names")
        count_order = "<" if sys_info.get("little_endian", True) else ">"
        for key in keys:
            key = key.decode("ascii", "replace") if isinstance(key, bytes) else key
            ref = storages.get(key)
            if ref is None:
                raise self.error(f"storage {key} is listed but never used by the pickle")
            itemsize = ref.itemsize
            if itemsize is None:
                raise self.error(f"storage {key} has an unknown element type {ref.dtype}",
                                 "unsupported")
            (count,) = struct.unpack(count_order + "q", f.read(pos, 8))
            if count < 0 or pos + 8 + count * itemsize > f.size:
                raise self.error(f"storage {key} claims {count} elements past the end of "
                                 "the file", "truncated", True)
            if count != ref.numel:
                raise self.error(f"storage {key} holds {count} elements, the pickle says "
                                 f"{ref.numel}")
            self._spans[key] = (pos + 8, count * itemsize)
            pos += 8 + count * itemsize
        missing = set(storages) - set(self._spans)
        if missing:
            raise self.error(f"{len(missing)} storage(s) used by the pickle are not in the "
                             "file")
        if pos != f.size:
            self.meta.notes.append(f"{f.size - pos} trailing bytes after the last storage")
        self._setup(root)

    def _storage_bytes(self, storage: StorageRef) -> int:
        nbytes = self._spans[storage.key][1]
        if storage.view is None:
            return nbytes
        size = storage.itemsize or 1
        start, numel = storage.view
        if (start + numel) * size > nbytes:
            raise self.error(f"storage view {storage.view} exceeds storage {storage.key}")
        return numel * size

    def _storage_offset(self, storage: StorageRef) -> int:
        offset, _ = self._spans[storage.key]
        if storage.view is not None:
            offset += storage.view[0] * (storage.itemsize or 1)
        return offset


FORMAT = Format("torch-legacy", looks_like, lambda p: looks_like(p.head), TorchLegacyReader,
                None, TORCH_PATTERNS)
