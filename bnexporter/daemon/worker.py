"""Run analyses off the main process, with a deadline, on a bounded pool.

Why a process per analysis (``isolation: process``, the default): a thread
stuck in a read of a dead NFS server cannot be killed, a 4 GB checkpoint's
temporary arrays should not stay in the exporter's heap, and numpy's Python-level
chunk loop would otherwise compete with scrapes for the GIL. Children are forked
from a ``forkserver`` that has numpy/h5py preloaded, so each start costs
milliseconds, and a child over its deadline is killed (reason ``timeout``).
``isolation: thread`` exists for platforms without fork; there a timed-out
analysis is abandoned, not stopped (its thread keeps running until the read
returns), which the docs state.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..report import CheckpointReport, failed
from ..scan import ScanOptions, analyse_path
from .files import Candidate

log = logging.getLogger("bnexporter.worker")

_PRELOAD = ["bnexporter.daemon.worker", "bnexporter.formats.hdf5_keras",
            "bnexporter.formats.safetensors", "bnexporter.formats.keras_zip",
            "bnexporter.formats.npz", "bnexporter.formats.torch_zip",
            "bnexporter.formats.tf_bundle"]


@dataclass(frozen=True)
class Job:
    model: str
    generation: int   # of the model's configuration; results for an older one are dropped
    cand: Candidate
    opts: ScanOptions


def test_delay() -> float:
    """``BNEXPORTER_TEST_ANALYSIS_DELAY`` (only with ``BNEXPORTER_TEST_HOOKS=1``)."""
    if os.environ.get("BNEXPORTER_TEST_HOOKS") != "1":
        return 0.0
    try:
        return float(os.environ.get("BNEXPORTER_TEST_ANALYSIS_DELAY", "0"))
    except ValueError:
        return 0.0


def _analyse(path: str, opts: ScanOptions, delay: float) -> CheckpointReport:
    if delay:
        time.sleep(delay)
    try:
        return analyse_path(path, opts)
    except Exception as exc:  # a bug must not take the worker down
        return failed(path, f"{path}: internal error: {exc.__class__.__name__}: {exc}",
                      "internal")


def _child_main(conn, path: str, opts: ScanOptions, delay: float) -> None:  # type: ignore[no-untyped-def]
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    conn.send(_analyse(path, opts, delay))
    conn.close()


_ctx_lock = threading.Lock()
_ctx: mp.context.BaseContext | None = None


def _context() -> mp.context.BaseContext:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            _ctx = ctx
        return _ctx


class Runner:
    """Runs one job to a report within ``timeout``; ``None`` when stopped."""

    def __init__(self, isolation: str, timeout: float, stop: threading.Event):
        self.isolation = isolation
        self.timeout = timeout
        self.stop = stop
        self.delay = test_delay()

    def run(self, job: Job) -> CheckpointReport | None:
        path = job.cand.path
        if self.isolation == "process":
            try:
                report = self._in_process(job)
            except OSError as exc:  # e.g. no writable temp folder for the forkserver socket
                log.error("cannot start analysis processes (%s); analysing in threads from "
                          "now on (a timed-out analysis can then only be abandoned)", exc)
                self.isolation = "thread"
                report = self._in_thread(job)
        else:
            report = self._in_thread(job)
        if report is None and not self.stop.is_set():
            report = failed(path, f"{path}: analysis took longer than {self.timeout:g} s",
                            "timeout", step=job.cand.step)
        return report

    def _in_thread(self, job: Job) -> CheckpointReport | None:
        box: list[CheckpointReport] = []
        t = threading.Thread(target=lambda: box.append(_analyse(job.cand.path, job.opts,
                                                                self.delay)),
                             name=f"analysis-{job.model}", daemon=True)
        t.start()
        deadline = time.monotonic() + self.timeout
        while t.is_alive() and time.monotonic() < deadline and not self.stop.is_set():
            t.join(0.2)
        return box[0] if box else None

    def _in_process(self, job: Job) -> CheckpointReport | None:
        ctx = _context()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(send, job.cand.path, job.opts, self.delay),
                           name=f"bnexporter-analysis-{job.model}", daemon=True)
        proc.start()
        send.close()
        deadline = time.monotonic() + self.timeout
        report: CheckpointReport | None = None
        try:
            while time.monotonic() < deadline and not self.stop.is_set():
                if recv.poll(0.2):
                    try:
                        report = recv.recv()
                    except (EOFError, OSError):
                        proc.join(1)
                        code = proc.exitcode
                        report = failed(job.cand.path, f"{job.cand.path}: analysis process died"
                                        f" (exit code {code})", "internal")
                    break
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(2)
            recv.close()
            proc.close()
        return report


class WorkerPool:
    """``size`` threads: take a job, run it, hand the report back."""

    def __init__(self, size: int, take: Callable[[float], Job | None],
                 done: Callable[[Job, CheckpointReport], None], runner: Runner):
        self._take, self._done, self._runner = take, done, runner
        self._threads = [threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
                         for i in range(size)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        stop = self._runner.stop
        while not stop.is_set():
            job = self._take(0.5)
            if job is None:
                continue
            try:
                report = self._runner.run(job)
            except Exception as exc:  # keep the worker alive whatever happens
                log.exception("analysis of %s failed unexpectedly", job.cand.path)
                report = failed(job.cand.path, f"{job.cand.path}: internal error: {exc}",
                                "internal")
            if report is not None:
                self._done(job, report)

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
