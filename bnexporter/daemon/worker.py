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

from bnexporter.daemon import health, names, testhooks
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
        self.live: dict[int, str] = {}          # analysis pid -> model (the watchdog reads)
        self.starting: dict[int, float] = {}    # worker thread -> when its start() began

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
        me = threading.get_ident()
        self.starting[me] = time.monotonic()
        try:
            proc.start()  # asks the forkserver: blocks while it is stopped (watchdog)
        except BaseException:
            recv.close()
            send.close()
            raise
        finally:
            self.starting.pop(me, None)
        send.close()
        if proc.pid:
            self.live[proc.pid] = job.model
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
            self.live.pop(proc.pid or 0, None)
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


def _forkserver_pid() -> int | None:
    """The running forkserver's pid (multiprocessing keeps it privately)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    return pid if isinstance(pid, int) and pid > 0 else None


def _state(pid: int) -> str | None:
    """The process state letter from /proc (``T``: stopped), None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:data.rfind(b")") + 3].decode() or None


class Watchdog:
    """Watches the forkserver and the analysis processes every ``every`` seconds.

    A stopped one (SIGSTOP, state ``T``), or a process start that has not come back
    for ``START_TIMEOUT`` seconds, halts every analysis while nothing else notices.
    Found: one warning, ``bnexporter_worker_stalls_total{what}`` + 1,
    ``bnexporter_worker_pool_up`` 0 and ``/healthz`` 503 (health.py); after ``GRACE``
    seconds the daemon resumes its own process (SIGCONT) and, for a forkserver that
    still does not answer, kills it (multiprocessing starts a new one for the next
    analysis). Everything clears when analyses can start again.
    """

    GRACE = 5.0
    START_TIMEOUT = 15.0

    def __init__(self, runner: Runner, every: float = 0.5):
        self.runner = runner
        self.every = every
        self._since: dict[tuple[str, int], float] = {}   # (what, pid) -> first seen bad
        self._thread = threading.Thread(target=self._loop, name="worker-watchdog", daemon=True)
        health.BOARD.set("worker_pool_up", 1)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self.runner.stop.wait(self.every):
            try:
                self.check(time.monotonic())
            except Exception:
                log.exception("worker watchdog error")

    def check(self, now: float) -> None:
        bad: dict[tuple[str, int], str] = {}
        server = _forkserver_pid()
        if server is not None:
            if _state(server) in ("T", "t"):
                bad[("forkserver", server)] = f"the analysis forkserver (pid {server}) is stopped"
            elif any(now - t > self.START_TIMEOUT for t in list(self.runner.starting.values())):
                bad[("forkserver", server)] = (f"the analysis forkserver (pid {server}) does not "
                                               f"start processes (> {self.START_TIMEOUT:g} s)")
        for pid, model in list(self.runner.live.items()):
            if _state(pid) in ("T", "t"):
                bad[("analysis", pid)] = f"the analysis process of {model} (pid {pid}) is stopped"
        for key, why in bad.items():
            if key not in self._since:
                self._since[key] = now
                log.warning("%s; analyses are held up", why)
                health.BOARD.inc("worker_stalls", key[0])
            elif now - self._since[key] >= self.GRACE:
                self._remedy(key, why)
                self._since[key] = now  # once per GRACE
        for key in [k for k in self._since if k not in bad]:
            del self._since[key]
            log.info("analysis processes run again")
        up = not bad
        health.BOARD.set("worker_pool_up", 1 if up else 0)
        health.BOARD.problem("workers", None if up else "workers stalled: " +
                             "; ".join(sorted(bad.values())))

    @staticmethod
    def _remedy(key: tuple[str, int], why: str) -> None:
        what, pid = key
        stopped = _state(pid) in ("T", "t")
        try:
            if stopped:
                log.warning("%s for %g s: resuming it (SIGCONT)", why, Watchdog.GRACE)
                os.kill(pid, signal.SIGCONT)
            elif what == "forkserver":
                log.warning("%s: killing it; a new one is started for the next analysis", why)
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class WorkerPool:
    """``size`` threads: take a job, run it, hand the report back."""

    def __init__(self, size: int, take: Callable[[float], Job | None],
                 done: Callable[[Job, CheckpointReport], None], runner: Runner):
        self._take, self._done, self._runner = take, done, runner
        self._threads = [threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
                         for i in range(size)]
        self.watchdog = Watchdog(runner)

    def start(self) -> None:
        for t in self._threads:
            t.start()
        self.watchdog.start()

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
