"""Cheap "is this file finished?" checks that use each format's own structure.

Quiescence (size and mtime settled) is necessary but not sufficient: a writer
may pause. These checks catch the common half-written states before a full
analysis is spent on them. Each returns ``None`` when the file looks complete,
else ``(reason, message)`` with a retryable reason.
"""

from __future__ import annotations

import json
import os
import struct

_ZIP_EOCD = b"PK\x05\x06"
_HDF5 = b"\x89HDF\r\n\x1a\n"
_MAX_COMMENT = 0xFFFF


def check(path: str) -> tuple[str, str] | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(1032)
            size = os.fstat(fh.fileno()).st_size
            if path.endswith(".index"):
                return _tf(path)
            if not head:
                return "truncated", "file is empty"
            if head[:4] == b"PK\x03\x04":
                return _zip(fh, size)
            if any(head[o:o + 8] == _HDF5 for o in (0, 512, 1024)):
                return _hdf5(fh, head, size)
            if len(head) >= 9 and head[8:9] == b"{":
                return _safetensors(fh, head, size)
    except OSError as exc:
        return "io", f"cannot read: {exc.strerror or exc}"
    return None  # other formats: quiescence only


def _zip(fh, size: int) -> tuple[str, str] | None:  # type: ignore[no-untyped-def]
    """The end-of-central-directory record is written last, at the very end."""
    tail_len = min(size, 22 + _MAX_COMMENT)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    pos = tail.rfind(_ZIP_EOCD)
    while pos >= 0:
        if pos + 22 <= len(tail):
            (comment,) = struct.unpack("<H", tail[pos + 20:pos + 22])
            if pos + 22 + comment == len(tail):
                return None
        pos = tail.rfind(_ZIP_EOCD, 0, pos)
    return "truncated", "zip archive has no end-of-central-directory record yet"


def _safetensors(fh, head: bytes, size: int) -> tuple[str, str] | None:  # type: ignore[no-untyped-def]
    """8 + header length + the largest data offset must equal the file size."""
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n > size:
        return "truncated", f"safetensors header ({n} bytes) extends past the end of the file"
    fh.seek(8)
    try:
        header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # not our business: the reader reports a corrupt header precisely
    if 8 + n + end > size:
        return "truncated", f"safetensors data ends at {8 + n + end} bytes, file has {size}"
    return None


def _hdf5(fh, head: bytes, size: int) -> tuple[str, str] | None:  # type: ignore[no-untyped-def]
    """The superblock records the end-of-file address; a shorter file is unfinished.

    A writer still holding the file (HDF5 >= 1.10 locking) is caught by the
    analysis itself, which reports it as retryable.
    """
    base = next(o for o in (0, 512, 1024) if head[o:o + 8] == _HDF5)
    version = head[base + 8]
    if version in (0, 1):
        width = head[base + 13]
        at = base + 24 + (4 if version == 1 else 0) + 2 * width
    elif version in (2, 3):
        width = head[base + 9]
        at = base + 12 + 2 * width
    else:
        return None
    if width not in (2, 4, 8) or at + width > len(head):
        return None
    eof = int.from_bytes(head[at:at + width], "little")
    if eof != (1 << (8 * width)) - 1 and base + eof > size:
        return "truncated", f"HDF5 file is {size} bytes, its superblock says {base + eof}"
    return None


def _tf(path: str) -> tuple[str, str] | None:
    try:
        from ..formats.tf_bundle import bundle_complete
    except ImportError:
        return None
    if bundle_complete(path[: -len(".index")]):
        return None
    return "incomplete", "TF bundle index or data shards are not complete yet"
