"""Make opening one regular file block in the kernel, like a read on a dead
hard-mounted NFS server: a fanotify permission mark (FAN_OPEN_PERM) whose
events this listener never answers. Any process that opens the file sits in
uninterruptible sleep (state D, killable by SIGKILL, as with NFS) until the
listener is closed. Needs CAP_SYS_ADMIN (root in this test environment)."""

from __future__ import annotations

import ctypes
import os

FAN_CLOEXEC = 0x1
FAN_CLASS_CONTENT = 0x4
FAN_OPEN_PERM = 0x10000
FAN_MARK_ADD = 0x1
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]


class StuckOpen:
    """``with StuckOpen(path):`` -- opens of ``path`` block until the block ends."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self) -> StuckOpen:
        fd = _libc.fanotify_init(FAN_CLOEXEC | FAN_CLASS_CONTENT, os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_init: {os.strerror(err)}")
        if _libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_OPEN_PERM, AT_FDCWD,
                               os.fsencode(self.path)) != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"fanotify_mark: {os.strerror(err)}")
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # pending permission events are allowed on close
            self.fd = -1


def available() -> str | None:
    """``None`` when fanotify permission events work here, else why not."""
    fd = _libc.fanotify_init(FAN_CLOEXEC | FAN_CLASS_CONTENT, os.O_RDONLY)
    if fd < 0:
        return f"fanotify_init: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    return None
