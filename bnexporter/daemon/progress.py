"""Is an analysis still making progress? Read from ``/proc``, never from the task.

A read stuck on a dead network filesystem (or any blocked syscall) leaves a
process or thread with no CPU time and no bytes read: its counters freeze. A
long but healthy analysis moves at least one of them every few seconds. So an
analysis whose counters have not moved for ``stall_timeout`` seconds is stuck,
and can be stopped long before ``analysis_timeout`` without cutting short any
slow-but-working analysis.
"""

from __future__ import annotations

import os

# /proc/<pid>/io fields that move when data arrives (rchar: read()/pread() bytes
# returned; read_bytes: bytes fetched from storage, also during a long read)
_IO_FIELDS = (b"rchar", b"read_bytes", b"syscr")


def proc_dir(pid: int, tid: int | None = None) -> str:
    return f"/proc/{pid}/task/{tid}" if tid is not None else f"/proc/{pid}"


def sample(path: str) -> tuple[int, ...] | None:
    """CPU ticks and I/O counters of the task at ``path``; ``None`` if unreadable."""
    try:
        with open(os.path.join(path, "stat"), "rb") as fh:
            stat = fh.read()
        with open(os.path.join(path, "io"), "rb") as fh:
            io = fh.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after it
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        cpu = int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)
    except (IndexError, ValueError):
        return None
    counters = dict(line.split(b": ", 1) for line in io.splitlines() if b": " in line)
    return (cpu, *(int(counters.get(k, b"0")) for k in _IO_FIELDS))


class StallWatch:
    """Tracks one task; ``stalled(now)`` once its counters are frozen long enough."""

    def __init__(self, path: str, timeout: float, now: float):
        self.path = path
        self.timeout = timeout
        self.last = sample(path)
        self.since = now

    def stalled(self, now: float) -> bool:
        if self.timeout <= 0:
            return False
        current = sample(self.path)
        if current is None:   # gone, or /proc not readable: no opinion
            return False
        if current != self.last:
            self.last, self.since = current, now
            return False
        return now - self.since >= self.timeout
