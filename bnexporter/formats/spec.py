"""What a format module tells the rest of the program about itself.

Each reader module exports one ``FORMAT``; ``formats.sniff`` walks the table in
order of precedence, so adding a format is one module plus one row there.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from bnexporter.errors import CheckpointError
from bnexporter.formats.base import Reader

# (reason, message) of a file that is not finished yet, or None
Incomplete = tuple[str, str] | None


@dataclass
class Probe:
    """The leading bytes of a file, and its zip member names when it is a zip."""

    path: str
    head: bytes
    _members: list[str] | None = field(default=None, repr=False)

    @property
    def is_zip(self) -> bool:
        return self.head[:4] == b"PK\x03\x04"

    def members(self) -> list[str]:
        if self._members is None:
            try:
                with zipfile.ZipFile(self.path) as zf:
                    self._members = zf.namelist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise CheckpointError(self.path, f"incomplete or corrupt zip archive ({exc})",
                                      "truncated", True) from None
            except (ValueError, NotImplementedError, RuntimeError) as exc:
                raise CheckpointError(self.path, f"unreadable zip archive ({exc})") from None
        return self._members


@dataclass(frozen=True)
class Format:
    key: str
    # the container's own bytes (cheap, for completeness checks before a full sniff)
    looks_like: Callable[[bytes], bool]
    # the whole decision; may list zip members
    sniff: Callable[[Probe], bool]
    open: Callable[[str], Reader]
    # (path, open file, head, size) -> Incomplete; None: quiescence is the only signal
    incomplete: Callable[[str, BinaryIO, bytes, int], Incomplete] | None = None
    patterns: tuple[str, ...] = ()
    # a checkpoint named by its path rather than a file's bytes (TF prefixes, folders)
    by_path: Callable[[str], bool] | None = None
