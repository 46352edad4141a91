"""numpy ``.npz``: a zip of ``.npy`` members, read member by member."""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np

from bnexporter.errors import CheckpointError
from bnexporter.formats import dtypes, zipmember
from bnexporter.formats.base import (
    RangeFile,
    RawExtent,
    Reader,
    TensorInfo,
    raw_buffer,
    raw_view,
)
from bnexporter.formats.spec import Format, Probe

_MAX_MEMBERS = 1_000_000
_VERSIONS = {(1, 0), (2, 0), (3, 0)}
# what zipfile and numpy raise for a corrupt member or .npy payload
_MEMBER_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
                  NotImplementedError, RuntimeError)


class NpzReader(Reader):
    format = "npz"

    def __init__(self, path: str):
        super().__init__(path)
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise self.error(f"not a readable zip archive ({exc})", "truncated", True) from None
        except _MEMBER_ERRORS as exc:  # e.g. NotImplementedError: zip file version 7.5
            raise self.error(f"unreadable zip archive ({exc})") from None
        self._members: dict[str, zipfile.ZipInfo] = {}
        self._cache: dict[str, np.ndarray] = {}
        self._header_sizes: dict[str, int] = {}
        self._data_offsets: dict[str, int] = {}
        self._big: set[str] = set()
        self._file: RangeFile | None = None
        self._stream: list | None = None  # [name, open member, inflated bytes read]
        self._archive_size = os.stat(path).st_size
        infos = self._zip.infolist()
        if len(infos) > _MAX_MEMBERS:
            raise self.error(f"{len(infos)} members is more than any checkpoint holds")
        for zi in infos:
            if not zi.filename.endswith(".npy"):
                continue
            name = zi.filename[:-4]
            shape, dtype, header_size, big = self._header(zi)
            self._members[name] = zi
            self._header_sizes[name] = header_size
            if big:
                self._big.add(name)
            self._infos[name] = TensorInfo(name, shape, dtype)
        self.meta.framework = "torch" if any(k.endswith("running_var") for k in self._infos) \
            else "generic"

    def _header(self, zi: zipfile.ZipInfo) -> tuple[tuple[int, ...], str, int, bool]:
        """Shape and dtype from a member's .npy header, checked against its size.

        numpy trusts the header: a shape larger than the data fails late with a
        traceback, a huge one allocates it all up front. Here the element count
        must account for exactly the bytes the member declares.
        """
        if zi.compress_size > self._archive_size or (
                zi.compress_type == zipfile.ZIP_STORED and zi.file_size != zi.compress_size):
            raise self.error(f"member {zi.filename}: declared sizes {zi.compress_size} / "
                             f"{zi.file_size} do not fit the archive ({self._archive_size} bytes)")
        try:
            with self._zip.open(zi) as fh:
                version = np.lib.format.read_magic(fh)
                if version not in _VERSIONS:
                    raise ValueError(f"unknown .npy version {version}")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _fortran, dt = read_header(fh)
                header_size = fh.tell()
        except _MEMBER_ERRORS as exc:
            raise self.error(f"member {zi.filename}: bad .npy header ({exc})") from None
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise self.error(f"member {zi.filename}: invalid shape {shape!r}")
        name = dt.name if dt.byteorder in "=|<" or dt.itemsize == 1 else dt.newbyteorder().name
        if not dtypes.is_supported(name):
            raise self.error(f"member {zi.filename}: dtype {dt} is not numeric", "unsupported")
        need = math.prod(shape) * dt.itemsize
        if need != zi.file_size - header_size:
            raise self.error(f"member {zi.filename}: shape {tuple(shape)} of {dt} needs {need} "
                             f"bytes but the member holds {zi.file_size - header_size}")
        return tuple(shape), name, header_size, dt.byteorder == ">" and dt.itemsize > 1

    # members up to this size are inflated once and kept (BN vectors are read repeatedly)
    _SMALL = 1 << 20

    def _load(self, name: str) -> np.ndarray:
        arr = self._cache.get(name)
        if arr is None:
            zi = self._members[name]
            self._check_ratio(zi)
            try:
                with self._zip.open(zi) as fh:
                    arr = np.lib.format.read_array(fh, allow_pickle=False).ravel(order="K")
            except _MEMBER_ERRORS as exc:
                raise self._unreadable(zi, exc) from None
            arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
            if len(self._cache) < 64:
                self._cache[name] = arr
        return arr

    def _check_ratio(self, zi: zipfile.ZipInfo) -> None:
        if zi.compress_type != zipfile.ZIP_STORED and zi.file_size > 64 * zi.compress_size + (
                1 << 20):
            raise self.error(f"member {zi.filename} inflates {zi.file_size} bytes from "
                             f"{zi.compress_size}: refusing a likely zip bomb")

    def _unreadable(self, zi: zipfile.ZipInfo, exc: BaseException) -> CheckpointError:
        return self.error(f"member {zi.filename} unreadable ({exc.__class__.__name__}: "
                          f"{exc})")

    def _range(self) -> RangeFile:
        if self._file is None:
            self._file = RangeFile(self.path)
        return self._file

    def raw_extent(self, name: str) -> RawExtent | None:
        zi = self._members[self.info(name).name]
        if zi.compress_type != zipfile.ZIP_STORED:
            return None
        f = self._range()
        off = self._data_offsets.get(name)
        if off is None:
            off = self._data_offsets[name] = _data_offset(f, zi) + self._header_sizes[name]
        return RawExtent(f, off, name in self._big)

    def _read_flat(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        zi = self._members[info.name]
        if zi.file_size <= self._SMALL:
            return self._load(info.name)[start:stop]
        size = dtypes.itemsize(info.dtype)
        ext = self.raw_extent(info.name)
        if ext is not None:
            raw = ext.file.read(ext.offset + start * size, (stop - start) * size)
        else:
            raw = bytes(self._stream_into(info.name, start * size,
                                          np.empty((stop - start) * size, np.uint8)))
        return dtypes.decode(raw, info.dtype, info.name in self._big)

    def _stream_into(self, name: str, offset: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` with the inflated member bytes at ``offset`` (past the .npy
        header), resuming the open decompressor when reads run forward: memory is the
        piece asked for plus zlib's window, never the member."""
        zi = self._members[name]
        target = self._header_sizes[name] + offset
        st = self._stream
        try:
            if st is None or st[0] != name or st[2] > target:
                if st is not None:
                    st[1].close()
                self._check_ratio(zi)
                st = self._stream = [name, self._zip.open(zi), 0]
            fh = st[1]
            while st[2] < target:  # skip forward in bounded steps
                skip = fh.read(min(target - st[2], 1 << 20))
                if not skip:
                    break
                st[2] += len(skip)
            mv = out.data.cast("B")
            done = 0
            while done < out.size and st[2] == target + done:
                got = fh.readinto(mv[done:])
                if not got:
                    break
                done += got
                st[2] += got
        except _MEMBER_ERRORS as exc:
            self._stream = None
            raise self._unreadable(zi, exc) from None
        if done != out.size:
            self._stream = None
            raise self.error(f"member {zi.filename} holds fewer bytes than its header "
                             "declares", "truncated", True)
        return out

    def iter_raw(self, name: str, piece_elements: int) -> Iterator[tuple[int, np.ndarray]]:
        info = self.info(name)
        zi = self._members[info.name]
        if zi.compress_type == zipfile.ZIP_STORED or zi.file_size <= self._SMALL or \
                not info.size:
            yield from super().iter_raw(name, piece_elements)
            return
        size = dtypes.itemsize(info.dtype)
        view = raw_view(info.dtype)
        buf = raw_buffer(piece_elements * size)
        for start in range(0, info.size, piece_elements):
            n = min(piece_elements, info.size - start)
            part = self._stream_into(name, start * size, buf[: n * size])
            arr = part.view(view)
            if name in self._big and size > 1:
                arr.byteswap(inplace=True)
            yield start, arr

    def close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream = None
        if self._file is not None:
            self._file.close()
        self._zip.close()


def _data_offset(f: RangeFile, zi: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start, from its *local* header."""
    header = f.read(zi.header_offset, 30)
    if header[:4] != b"PK\x03\x04":
        raise CheckpointError(f.path, f"zip member {zi.filename}: bad local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return zi.header_offset + 30 + name_len + extra_len


def _sniff(probe: Probe) -> bool:
    return probe.is_zip and any(n.endswith(".npy") for n in probe.members())


FORMAT = Format("npz", zipmember.looks_like, _sniff, NpzReader, zipmember.incomplete, ("*.npz",))
