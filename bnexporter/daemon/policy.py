"""Small pure decisions the planner makes, kept apart so each is unit-tested:
when a file has settled, how long to back off, which checkpoint is newest, which
shard owns a model, and how arrivals coalesce while an analysis runs."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from bnexporter.daemon import names
from bnexporter.daemon.config import Retry
from bnexporter.daemon.files import Candidate

if TYPE_CHECKING:
    from bnexporter.scan import ScanOptions



# -- settle --------------------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    sig: tuple[int, ...]
    since: float  # monotonic time this signature was first seen


def observe(prev: Observation | None, sig: tuple[int, ...], now: float) -> Observation:
    """Keep the first-seen time while the signature is unchanged."""
    if prev is not None and prev.sig == sig:
        return prev
    return Observation(sig, now)


def settled(obs: Observation, now: float, settle: float, mtime: float, wall_now: float,
            closed_sig: tuple[int, ...] | None = None) -> bool:
    """Size and mtime unchanged for ``settle`` seconds, or known finished.

    ``mtime`` older than ``settle`` means nobody wrote during that long, as
    good as watching it for that long (files found at start-up need no wait).
    A close-after-write event whose signature still matches means the writer
    is done with it.
    """
    if closed_sig is not None and closed_sig == obs.sig:
        return True
    return now - obs.since >= settle or wall_now - mtime >= settle


# -- retries -------------------------------------------------------------------

def backoff(attempt: int, retry: Retry) -> float:
    """Delay before attempt ``attempt + 1`` (attempt counts from 1): doubling, capped."""
    return min(retry.max_delay, retry.initial_delay * 2.0 ** max(0, attempt - 1))


def give_up(attempts: int, first: float, now: float, retry: Retry) -> bool:
    return attempts >= retry.max_attempts or now - first >= retry.give_up_after


# -- ordering ------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """Where a checkpoint sits in a run: its step when known, else its mtime."""

    step: int | None
    mtime: float

    @classmethod
    def of(cls, c: Candidate) -> Key:
        return cls(c.step, c.mtime)


def is_newer(a: Key, b: Key) -> bool:
    """Strictly newer: by step when both know it, by mtime otherwise."""
    if a.step is not None and b.step is not None and a.step != b.step:
        return a.step > b.step
    return a.mtime > b.mtime


def newest(cands: Sequence[Candidate]) -> Candidate | None:
    """By step when every candidate names one, else by modification time."""
    if not cands:
        return None
    if all(c.step is not None for c in cands):
        return max(cands, key=lambda c: (c.step, c.mtime, c.path))
    return max(cands, key=lambda c: (c.mtime, c.step if c.step is not None else -1, c.path))


def in_order(cands: Sequence[Candidate]) -> list[Candidate]:
    """Oldest first, for history backfill."""
    if all(c.step is not None for c in cands):
        return sorted(cands, key=lambda c: (c.step, c.mtime, c.path))
    return sorted(cands, key=lambda c: (c.mtime, c.path))


# -- sharding ------------------------------------------------------------------

def shard_of(name: str, count: int) -> int:
    """Stable across processes and Python versions (unlike ``hash()``)."""
    return zlib.crc32(names.encode(name)) % count if count > 1 else 0


def owned(name: str, shard: tuple[int, int]) -> bool:
    return shard_of(name, shard[1]) == shard[0]


# -- coalescing ----------------------------------------------------------------

J = TypeVar("J")


@dataclass(frozen=True)
class Job:
    """One analysis the planner hands to a worker."""

    model: str
    generation: int   # of the model's configuration; results for an older one are dropped
    cand: Candidate
    opts: ScanOptions


class Slot(Generic[J]):
    """At most one job running and one waiting per model; a new arrival
    replaces the waiting one, so a burst of checkpoints costs two analyses."""

    def __init__(self) -> None:
        self.running: J | None = None
        self.pending: J | None = None

    def offer(self, job: J) -> bool:
        """Queue ``job``; True when the caller should hand the model to a worker."""
        first = self.pending is None and self.running is None
        self.pending = job
        return first

    def start(self) -> J | None:
        job, self.pending = self.pending, None
        self.running = job
        return job

    def finish(self) -> bool:
        """The running job ended; True when a waiting job needs a worker."""
        self.running = None
        return self.pending is not None
