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

The format's completeness check runs in the child too, before the analysis:
the daemon process itself never reads a checkpoint's bytes, so a read that
hangs (dead NFS server) can only ever hang a child, which is killed after
``stall_timeout`` seconds without progress (``progress.StallWatch``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from bnexporter.daemon import names, testhooks
from bnexporter.daemon.policy import Job
from bnexporter.daemon.progress import StallWatch, proc_dir
from bnexporter.formats.sniff import MODULES, incomplete
from bnexporter.report import CheckpointReport, failed
from bnexporter.scan import ScanOptions, analyse_path

log = logging.getLogger("bnexporter.worker")

_PRELOAD = ["bnexporter.daemon.worker", *MODULES]


def _analyse(path: str, opts: ScanOptions, delay: float) -> CheckpointReport:
    """Completeness check, then the analysis (the test delay sits between the two,
    widening the window in which a file can change after it was judged complete)."""
    try:
        problem = incomplete(path)
        if problem is not None:
            return failed(path, f"{path}: {problem[1]}", problem[0])
        if delay:
            time.sleep(delay)
        return analyse_path(path, opts)
    except Exception as exc:  # a bug must not take the worker down
        return failed(path, f"{path}: internal error: {exc.__class__.__name__}: {exc}",
                      "internal")


def _child_main(conn: Connection, path: str, opts: ScanOptions, delay: float) -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    conn.send(_analyse(path, opts, delay))
    conn.close()


class _Stalled(Exception):
    """The analysis made no progress for ``stall_timeout`` seconds."""


_ctx_lock = threading.Lock()
_ctx: mp.context.ForkServerContext | None = None


def _context() -> mp.context.ForkServerContext:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            _ctx = ctx
        return _ctx


# seconds before trying processes again after they failed to start (doubling, capped)
PROCESS_RETRY, PROCESS_RETRY_MAX = 5.0, 300.0


class Runner:
    """Runs one job to a report within ``timeout``; ``None`` when stopped."""

    def __init__(self, isolation: str, timeout: float, stop: threading.Event,
                 stall_timeout: float = 0.0):
        self.isolation = isolation
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.stop = stop
        self.delay = testhooks.ANALYSIS_DELAY
        self._no_processes_until = 0.0
        self._process_retry = PROCESS_RETRY
        self._unkillable: list[mp.process.BaseProcess] = []

    def run(self, job: Job) -> CheckpointReport | None:
        path = job.cand.path
        log.debug("model %s: analysing %s", job.model, path)
        try:
            report = self._run(job)
        except _Stalled:
            return failed(path, f"{path}: no progress for {self.stall_timeout:g} s (a read is "
                          "stuck: unresponsive network filesystem?); analysis stopped",
                          "timeout", step=job.cand.step)
        if report is None and not self.stop.is_set():
            report = failed(path, f"{path}: analysis took longer than {self.timeout:g} s",
                            "timeout", step=job.cand.step)
        # names from the file and its path may not be UTF-8: make them safe to show once,
        # here, so no label, page or log line downstream can fail on them (names.py)
        return names.clean_tree(report) if report is not None else None

    def _run(self, job: Job) -> CheckpointReport | None:
        if self.isolation != "process" or time.monotonic() < self._no_processes_until:
            return self._in_thread(job)
        try:
            report = self._in_process(job)
        except OSError as exc:  # e.g. /tmp full: no room for the forkserver's socket
            log.error("cannot start an analysis process (%s); analysing in threads "
                      "meanwhile (a timed-out analysis can then only be abandoned), trying "
                      "processes again in %g s", exc, self._process_retry)
            self._no_processes_until = time.monotonic() + self._process_retry
            self._process_retry = min(PROCESS_RETRY_MAX, 2 * self._process_retry)
            return self._in_thread(job)
        if self._no_processes_until:
            log.info("analysis processes work again")
            self._no_processes_until = 0.0
            self._process_retry = PROCESS_RETRY
        return report

    def _in_thread(self, job: Job) -> CheckpointReport | None:
        box: list[CheckpointReport] = []
        tids: list[int] = []

        def target() -> None:
            tids.append(threading.get_native_id())
            box.append(_analyse(job.cand.path, job.opts, self.delay))

        t = threading.Thread(target=target, name=f"analysis-{job.model}", daemon=True)
        t.start()
        start = time.monotonic()
        deadline = start + self.timeout
        watch: StallWatch | None = None
        while t.is_alive() and time.monotonic() < deadline and not self.stop.is_set():
            t.join(0.2)
            if watch is None and tids:
                watch = StallWatch(proc_dir(os.getpid(), tids[0]), self.stall_timeout, start)
            if watch is not None and t.is_alive() and watch.stalled(time.monotonic()):
                raise _Stalled  # the thread is abandoned: it ends when its read returns
        return box[0] if box else None

    def _in_process(self, job: Job) -> CheckpointReport | None:
        self._reap()
        ctx = _context()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, args=(send, job.cand.path, job.opts, self.delay),
                           name=f"bnexporter-analysis-{job.model}", daemon=True)
        try:
            proc.start()
        except BaseException:
            recv.close()
            send.close()
            raise
        send.close()
        start = time.monotonic()
        deadline = start + self.timeout
        watch = StallWatch(proc_dir(proc.pid), self.stall_timeout, start) if proc.pid else None
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
                if watch is not None and watch.stalled(time.monotonic()):
                    raise _Stalled
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(2)
            recv.close()
            if proc.exitcode is None:  # stuck in an uninterruptible read: reap it later
                log.warning("analysis process %s did not exit after SIGKILL", proc.pid)
                self._unkillable.append(proc)
            else:
                proc.close()
        return report

    def _reap(self) -> None:
        for proc in list(self._unkillable):
            if proc.exitcode is not None:
                self._unkillable.remove(proc)
                proc.close()


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
