"""Locate zip members' bytes from the archive's own headers, without zipfile.

Checkpoint zips (torch, .keras) store their big members uncompressed, so a
member's bytes can be read in place once its data offset is known. That offset
comes from the member's *local* header (name and extra lengths there may differ
from the central directory's, e.g. torch's 64-byte alignment padding), exactly
as torch's own reader does. The directory is validated first: a missing
end-of-central-directory record means the file is still being written
(retryable); overlapping or absurd entries mean a hostile or broken file.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from bnexporter.errors import CheckpointError
from bnexporter.formats.base import RangeFile

STORED = 0
DEFLATED = 8

MAX_MEMBERS = 1_000_000
MAX_DIRECTORY = 512 << 20
# Deflate cannot exceed ~1032:1, so a member claiming more is lying; and no
# compressed member of a checkpoint zip needs to inflate past 4 GiB.
MAX_RATIO = 1100
MAX_INFLATED = 4 << 30

_EOCD = struct.Struct("<4s4H2LH")                 # 22 bytes
_EOCD64_LOCATOR = struct.Struct("<4sLQL")         # 20 bytes
_EOCD64 = struct.Struct("<4sQ2H2L4Q")             # 56 bytes
_CENTRAL = struct.Struct("<4s6H3L5H2L")           # 46 bytes
_LOCAL = struct.Struct("<4s5H3L2H")               # 30 bytes
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class ZipEntry:
    """One central-directory entry; ``limit`` bounds where its bytes may lie."""

    name: str
    header_offset: int
    size: int            # bytes stored in the archive (compressed size)
    file_size: int       # bytes after decompression
    compress_type: int
    crc: int
    limit: int           # next entry's local header, or the directory's start


class Member(NamedTuple):
    data_offset: int
    size: int
    compress_type: int


def _fail(path: str, cause: str, reason: str = "corrupt", retryable: bool = False
          ) -> CheckpointError:
    return CheckpointError(path, cause, reason, retryable)


def _find_eocd(f: RangeFile) -> tuple[int, tuple]:
    """Position and fields of the end record; it must end exactly at EOF."""
    if f.size < _EOCD.size:
        raise _fail(f.path, "zip archive has no end-of-central-directory record (file is "
                    "incomplete or still being written)", "incomplete", True)
    tail = f.read(f.size - _EOCD.size, _EOCD.size)
    if tail[:4] == b"PK\x05\x06" and struct.unpack_from("<H", tail, 20)[0] == 0:
        return f.size - _EOCD.size, _EOCD.unpack(tail)
    window = min(f.size, _EOCD.size + 0xFFFF)
    tail = f.read(f.size - window, window)
    pos = len(tail)
    while True:
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
        if pos < 0:
            raise _fail(f.path, "zip archive has no end-of-central-directory record (file "
                        "is incomplete or still being written)", "incomplete", True)
        if pos + _EOCD.size <= len(tail):
            fields = _EOCD.unpack_from(tail, pos)
            if pos + _EOCD.size + fields[7] == len(tail):
                return f.size - window + pos, fields


def _directory_bounds(f: RangeFile) -> tuple[int, int, int]:
    """(entry count, directory offset, directory size), zip64-aware."""
    eocd_pos, (_, disk, cd_disk, _n_disk, count, cd_size, cd_off, _clen) = _find_eocd(f)
    end = eocd_pos
    if eocd_pos >= _EOCD64_LOCATOR.size:
        loc = f.read(eocd_pos - _EOCD64_LOCATOR.size, _EOCD64_LOCATOR.size)
        if loc[:4] == b"PK\x06\x07":
            _, _, rec_off, _ = _EOCD64_LOCATOR.unpack(loc)
            if rec_off + _EOCD64.size > eocd_pos - _EOCD64_LOCATOR.size:
                raise _fail(f.path, "zip64 end record lies outside the archive")
            rec = _EOCD64.unpack(f.read(rec_off, _EOCD64.size))
            if rec[0] != b"PK\x06\x06":
                raise _fail(f.path, "zip64 end record has a bad signature")
            disk, cd_disk, count, cd_size, cd_off = rec[4], rec[5], rec[7], rec[8], rec[9]
            end = rec_off
    if disk != 0 or cd_disk != 0:
        raise _fail(f.path, "multi-disk zip archives are not supported", "unsupported")
    if count > MAX_MEMBERS:
        raise _fail(f.path, f"zip archive claims {count} members (limit {MAX_MEMBERS})")
    if cd_size > MAX_DIRECTORY or cd_size < count * _CENTRAL.size:
        raise _fail(f.path, f"zip central directory size {cd_size} is implausible for "
                    f"{count} members")
    if cd_off + cd_size > end:
        raise _fail(f.path, "zip central directory extends past its end record",
                    "truncated", True)
    return count, cd_off, cd_size


def _zip64_extra(extra: bytes, usize: int, csize: int, hofs: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + length]
        pos += 4 + length
        if tag != 1:
            continue
        vals = [v for (v,) in struct.iter_unpack("<Q", body[:len(body) // 8 * 8])]
        if usize == _U32 and vals:
            usize = vals.pop(0)
        if csize == _U32 and vals:
            csize = vals.pop(0)
        if hofs == _U32 and vals:
            hofs = vals.pop(0)
        break
    return usize, csize, hofs


def read_directory(f: RangeFile) -> dict[str, ZipEntry]:
    """All entries in directory order, validated for layout but not yet located."""
    count, cd_off, cd_size = _directory_bounds(f)
    cd = f.read(cd_off, cd_size)
    raw: list[tuple[str, int, int, int, int, int, int]] = []
    names: set[str] = set()
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(cd):
            raise _fail(f.path, "zip central directory is shorter than its entry count")
        (sig, _vmade, _vneed, flags, method, _t, _d, crc, csize, usize, nlen, elen, clen,
         _disk, _iattr, _eattr, hofs) = _CENTRAL.unpack_from(cd, pos)
        if sig != b"PK\x01\x02":
            raise _fail(f.path, f"zip central directory entry at {cd_off + pos} has a bad "
                        "signature")
        start = pos + _CENTRAL.size
        name_b = cd[start:start + nlen]
        extra = cd[start + nlen:start + nlen + elen]
        pos = start + nlen + elen + clen
        if pos > len(cd):
            raise _fail(f.path, "zip central directory entry runs past the directory")
        usize, csize, hofs = _zip64_extra(extra, usize, csize, hofs)
        name = name_b.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if flags & 0x1:
            raise _fail(f.path, f"zip member {name!r} is encrypted", "unsupported")
        if name in names:
            raise _fail(f.path, f"zip member {name!r} appears twice")
        names.add(name)
        if method != STORED and (usize > MAX_INFLATED or usize > MAX_RATIO * max(csize, 1)
                                 + (1 << 20)):
            raise _fail(f.path, f"zip member {name!r} inflates {csize} bytes to {usize}: "
                        "refusing a likely zip bomb", "too_large")
        if method == STORED and usize != csize:
            raise _fail(f.path, f"stored zip member {name!r} has sizes {csize} != {usize}")
        raw.append((name, hofs, csize, usize, method, crc, nlen))
    order = sorted(range(len(raw)), key=lambda i: raw[i][1])
    entries: dict[str, ZipEntry] = {}
    limits = [0] * len(raw)
    for rank, i in enumerate(order):
        name, hofs, csize, nlen = raw[i][0], raw[i][1], raw[i][2], raw[i][6]
        nxt = raw[order[rank + 1]][1] if rank + 1 < len(order) else cd_off
        if hofs + _LOCAL.size + nlen + csize > nxt:
            raise _fail(f.path, f"zip member {name!r} overlaps the next member or the "
                        "central directory")
        limits[i] = nxt
    for i, (name, hofs, csize, usize, method, crc, _nlen) in enumerate(raw):
        entries[name] = ZipEntry(name, hofs, csize, usize, method, crc, limits[i])
    return entries


def data_offset(f: RangeFile, entry: ZipEntry) -> int:
    """Where the member's bytes start, read from its local header (one small read)."""
    head = f.read(entry.header_offset, _LOCAL.size)
    sig, _ver, _flags, _method, _t, _d, _crc, _cs, _us, nlen, elen = _LOCAL.unpack(head)
    if sig != b"PK\x03\x04":
        raise _fail(f.path, f"zip member {entry.name!r}: bad local header signature")
    start = entry.header_offset + _LOCAL.size + nlen + elen
    if start + entry.size > entry.limit:
        raise _fail(f.path, f"zip member {entry.name!r}: data runs into the next member")
    stored_name = f.read(entry.header_offset + _LOCAL.size, nlen)
    if stored_name.decode("utf-8", "replace") != entry.name and \
            stored_name.decode("cp437", "replace") != entry.name:
        raise _fail(f.path, f"zip member {entry.name!r}: local header names "
                    f"{stored_name[:80]!r}")
    return start


def read_member(f: RangeFile, entry: ZipEntry, max_size: int) -> bytes:
    """A whole small member (stored or deflated), CRC-checked, at most ``max_size`` bytes."""
    if entry.file_size > max_size:
        raise _fail(f.path, f"zip member {entry.name!r} has {entry.file_size} bytes "
                    f"(limit {max_size})", "too_large")
    raw = f.read(data_offset(f, entry), entry.size)
    if entry.compress_type == STORED:
        data = raw
    elif entry.compress_type == DEFLATED:
        inflater = zlib.decompressobj(-15)
        try:
            data = inflater.decompress(raw, entry.file_size + 1)
        except zlib.error as exc:
            raise _fail(f.path, f"zip member {entry.name!r}: bad deflate data ({exc})"
                        ) from None
    else:
        raise _fail(f.path, f"zip member {entry.name!r} uses compression method "
                    f"{entry.compress_type}", "unsupported")
    if len(data) != entry.file_size or zlib.crc32(data) != entry.crc:
        raise _fail(f.path, f"zip member {entry.name!r} fails its size/CRC check")
    return data


def locate_members(source: str | RangeFile) -> dict[str, Member]:
    """``name -> (data_offset, size, compress_type)`` for every member.

    Reads one local header per member: fine for archives with a handful of
    members (.keras); readers of archives with thousands of members should use
    :func:`read_directory` and :func:`data_offset` lazily instead.
    """
    f = RangeFile(source) if isinstance(source, str) else source
    try:
        return {name: Member(data_offset(f, e), e.size, e.compress_type)
                for name, e in read_directory(f).items()}
    finally:
        if isinstance(source, str):
            f.close()




_EOCD_SIG = b"PK\x05\x06"
_MAX_COMMENT = 0xFFFF


def incomplete(path: str, fh: BinaryIO, head: bytes, size: int) -> tuple[str, str] | None:
    """The end-of-central-directory record is written last, at the very end."""
    tail_len = min(size, 22 + _MAX_COMMENT)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    pos = tail.rfind(_EOCD_SIG)
    while pos >= 0:
        if pos + 22 <= len(tail):
            (comment,) = struct.unpack("<H", tail[pos + 20:pos + 22])
            if pos + 22 + comment == len(tail):
                return None
        pos = tail.rfind(_EOCD_SIG, 0, pos)
    return "truncated", "zip archive has no end-of-central-directory record yet"


def looks_like(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04"
