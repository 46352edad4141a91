"""A full scan's second thread: it scans the tensors the refinement does not read
while the refinement runs, so the two overlap where a second core is free.

Only with ``ScanOptions.threads >= 2`` (``BNEXPORTER_SCAN_THREADS``); the default is
one thread, since a sidecar shares the node with the training job, and no analysis
ever starts more than one extra thread. The thread takes only tensors whose bytes
are one positional run on disk (``Reader.raw_extent``): their reads are ``pread``
into per-thread buffers and share no reader state (a streamed zip member, h5py or a
lazily opened shard are left to the main thread).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable

from bnexporter.formats.base import Reader, TensorInfo
from bnexporter.report import TensorReport

ENV = "BNEXPORTER_SCAN_THREADS"
_WARNED: set[str] = set()  # bad values already warned about


def configured_threads() -> int:
    """Threads one analysis may use: ``BNEXPORTER_SCAN_THREADS``, default 1.

    A value that is not a whole number >= 1 gives 1 (the side that never takes a core
    from the training job) with a warning naming it, once per distinct value.
    """
    raw = os.environ.get(ENV, "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        if raw not in _WARNED:
            _WARNED.add(raw)
            logging.getLogger("bnexporter").warning(
                "%s=%r is not a whole number >= 1: scanning with one thread", ENV, raw)
        return 1
    return value



class Ahead:
    """Tensor reports computed ahead of the scan loop by one background thread.

    A context manager: leaving it (also on an error) empties the queue and waits for
    the thread, so the reader is never closed under a read.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self.done: dict[str, TensorReport] = {}
        self._queue: deque[TensorInfo] = deque()
        self._work: Callable[[TensorInfo], TensorReport] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, reader: Reader, infos: Iterable[TensorInfo], claimed: set[str],
              work: Callable[[TensorInfo], TensorReport]) -> None:
        """Queue ``infos`` (minus ``claimed``, read by the refinement) and start."""
        if self.threads < 2:
            return
        # raw_extent runs here, in the calling thread: any lazy state it fills is
        # filled before the background thread looks
        self._queue.extend(i for i in infos if i.name not in claimed and i.size
                           and reader.raw_extent(i.name) is not None)
        if not self._queue:
            return
        self._work = work
        self._thread = threading.Thread(target=self._run, name="bnexporter-scan",
                                        daemon=True)
        self._thread.start()

    def _next(self) -> TensorInfo | None:
        try:
            return self._queue.popleft()  # atomic: both threads take from the front
        except IndexError:
            return None

    def _drain(self) -> None:
        assert self._work is not None
        while (info := self._next()) is not None:
            self.done[info.name] = self._work(info)

    def _run(self) -> None:
        try:
            self._drain()
        except BaseException as exc:  # re-raised in the caller's thread by finish()
            self._error = exc
            self._queue.clear()

    def finish(self) -> dict[str, TensorReport]:
        """Help with what is still queued, wait for the thread, re-raise its error."""
        if self._thread is None:
            return self.done
        self._drain()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        return self.done

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.clear()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
