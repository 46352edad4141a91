"""numpy ``.npz``: a zip of ``.npy`` members, read member by member."""

from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np

from bnexporter.formats import dtypes, zipmember
from bnexporter.formats.base import Reader, TensorInfo
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
        self._archive_size = os.stat(path).st_size
        infos = self._zip.infolist()
        if len(infos) > _MAX_MEMBERS:
            raise self.error(f"{len(infos)} members is more than any checkpoint holds")
        for zi in infos:
            if not zi.filename.endswith(".npy"):
                continue
            name = zi.filename[:-4]
            shape, dtype = self._header(zi)
            self._members[name] = zi
            self._infos[name] = TensorInfo(name, shape, dtype)
        self.meta.framework = "torch" if any(k.endswith("running_var") for k in self._infos) \
            else "generic"

    def _header(self, zi: zipfile.ZipInfo) -> tuple[tuple[int, ...], str]:
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
        return tuple(shape), name

    def _load(self, name: str) -> np.ndarray:
        arr = self._cache.get(name)
        if arr is None:
            zi = self._members[name]
            if zi.compress_type != zipfile.ZIP_STORED and zi.file_size > 64 * zi.compress_size + (
                    1 << 20):
                raise self.error(f"member {zi.filename} inflates {zi.file_size} bytes from "
                                 f"{zi.compress_size}: refusing a likely zip bomb")
            try:
                with self._zip.open(zi) as fh:
                    arr = np.lib.format.read_array(fh, allow_pickle=False).ravel(order="K")
            except _MEMBER_ERRORS as exc:
                raise self.error(f"member {zi.filename} unreadable ({exc.__class__.__name__}: "
                                 f"{exc})") from None
            arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
            if len(self._cache) < 64:
                self._cache[name] = arr
        return arr

    def _read_flat(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        return self._load(info.name)[start:stop]

    def close(self) -> None:
        self._zip.close()


def _sniff(probe: Probe) -> bool:
    return probe.is_zip and any(n.endswith(".npy") for n in probe.members())


FORMAT = Format("npz", zipmember.looks_like, _sniff, NpzReader, zipmember.incomplete, ("*.npz",))
