"""Pick inotify or polling for a folder from the type of filesystem it lives on.

inotify only reports writes made through this kernel: on NFS, Lustre, GPFS,
CIFS, Ceph, 9p or any FUSE mount a checkpoint written by a trainer on another
machine produces no event at all, so ``watch: auto`` polls there.
"""

from __future__ import annotations

import os
import re

# filesystems where another machine (or a userspace daemon) can change files
NETWORK_FS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "9p", "ceph", "cephfs",
    "glusterfs", "beegfs", "afs", "openafs", "ncpfs", "orangefs", "pvfs2", "panfs", "ocfs2",
    "gfs2", "virtiofs", "davfs", "wekafs", "quobyte", "moosefs", "lizardfs",
})

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) per line of ``/proc/self/mountinfo``."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        parts = left.split()
        if not sep or len(parts) < 5 or not right.split():
            continue
        mounts.append((_unescape(parts[4]), right.split()[0]))
    return mounts


def fs_type(path: str, mounts: list[tuple[str, str]]) -> str | None:
    """Type of the mount holding ``path`` (longest mount point prefix; the last
    of equal ones wins, as a later mount hides an earlier one)."""
    best: tuple[int, str] | None = None
    for point, kind in mounts:
        inside = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), kind)
    return best[1] if best else None


def needs_polling(kind: str | None) -> bool:
    if kind is None:
        return False
    return kind in NETWORK_FS or kind.startswith("fuse") or kind.startswith("nfs")


def choose_mode(path: str, mode: str, mountinfo: str | None = None) -> tuple[str, str]:
    """("inotify" | "poll", why) for ``path`` under watch ``mode``."""
    if mode != "auto":
        return mode, "configured"
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
                mountinfo = fh.read()
        except OSError:
            return "poll", "no /proc/self/mountinfo (not Linux?)"
    kind = fs_type(os.path.realpath(path), parse_mountinfo(mountinfo))
    if needs_polling(kind):
        return "poll", f"{kind} filesystem"
    return "inotify", f"{kind or 'unknown'} filesystem"
