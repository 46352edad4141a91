"""Run ``analyse_path`` in worker processes with a memory cap and a per-file time limit.

A hostile file may crash the interpreter (libhdf5 is C), hang (a FIFO, a
quadratic loop) or allocate what it declares; none of that may take pytest
down with it. Each :class:`Sandbox` owns one long-lived worker
(``sandbox_worker.py``) and restarts it after a crash or a timeout, so a corpus
of hundreds of files costs one interpreter start per worker, not per file.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_worker.py")

# Address-space cap per worker. A normal analysis of every committed fixture
# peaks near 130 MB of address space (numpy + h5py, one BLAS thread); the
# biggest legitimate buffer a reader makes is a compressed .keras weights member
# (up to 256 MB, held twice while inflating). 1 GiB leaves room for both.
MEMORY_LIMIT = 1 << 30
TIME_LIMIT = float(os.environ.get("BNEXPORTER_HOSTILE_TIMEOUT", "20"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1",
               HDF5_USE_FILE_LOCKING="FALSE", PYTHONPATH=ROOT)
    return env


class Sandbox:
    """One worker process; :meth:`analyse` is not thread-safe (use one per thread)."""

    def __init__(self, memory: int = MEMORY_LIMIT, timeout: float = TIME_LIMIT):
        self.memory, self.timeout = memory, timeout
        self.proc: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the box)
        self.restarts = 0

    def _start(self) -> subprocess.Popen:
        self._stderr.seek(0)
        self._stderr.truncate()
        proc = subprocess.Popen([sys.executable, WORKER, str(self.memory), ROOT],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self._stderr, env=_env(), cwd=ROOT, text=True,
                                bufsize=1)
        ready = self._readline(proc, 60)
        if ready is None or not json.loads(ready).get("ready"):
            self._kill(proc)
            raise RuntimeError(f"sandbox worker did not start: {self._stderr_tail()}")
        return proc

    def _readline(self, proc: subprocess.Popen, timeout: float) -> str | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = proc.stdout.readline()
        return line or None

    def _stderr_tail(self, n: int = 2000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")[-n:]

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()  # only ever our own child, by its handle
        proc.wait()

    def analyse(self, path: str, marker: str | None = None, timeout: float | None = None
                ) -> dict:
        """The worker's verdict on one path; ``status`` is ok, error, exception,
        timeout or crash."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin is not None
        started = time.perf_counter()
        try:
            proc.stdin.write(json.dumps({"path": path, "marker": marker}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._readline(proc, timeout or self.timeout)
        if line is not None:
            return json.loads(line)
        elapsed = time.perf_counter() - started
        alive = proc.poll() is None
        self._kill(proc)
        self.proc = None
        self.restarts += 1
        if alive:
            return {"status": "timeout", "seconds": round(elapsed, 1),
                    "stderr": self._stderr_tail()}
        return {"status": "crash", "returncode": proc.returncode,
                "stderr": self._stderr_tail()}

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self._kill(self.proc)
            self.proc = None
        self._stderr.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def analyse_many(jobs: Iterable[tuple[str, str, str | None, float | None]], workers: int = 2
                 ) -> dict[str, dict]:
    """``{key: verdict}`` for ``(key, path, marker, timeout)`` jobs over ``workers`` sandboxes
    (``timeout`` None: :data:`TIME_LIMIT`)."""
    jobs = list(jobs)
    results: dict[str, dict] = {}
    local = threading.local()
    boxes: list[Sandbox] = []
    lock = threading.Lock()

    def run(job: tuple[str, str, str | None, float | None]) -> None:
        box = getattr(local, "box", None)
        if box is None:
            box = local.box = Sandbox()
            with lock:
                boxes.append(box)
        key, path, marker, timeout = job
        results[key] = box.analyse(path, marker, timeout)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, jobs))
    finally:
        for box in boxes:
            box.close()
    return results


def shown(path: str) -> set[str]:
    """Ways an error line may show a path: raw, or with control characters and
    undecodable bytes escaped (``\\xNN`` or Python-repr style)."""
    hexed = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or c == "\x7f" else c for c in path)
    return {path, hexed, repr(path)[1:-1], path.encode("unicode_escape", "backslashreplace")
            .decode("ascii"), path.encode("utf-8", "backslashreplace").decode("utf-8")
            .encode("unicode_escape").decode("ascii")}


def problems(m: dict, r: dict) -> list[str]:
    """Every rule the verdict ``r`` on manifest entry ``m`` breaks."""
    out = []
    status = r["status"]
    if status == "timeout":
        out.append(f"no answer within {r['seconds']} s (hang, or work out of all proportion "
                   "to the file)")
    elif status == "crash":
        out.append(f"the analysing process died (exit {r['returncode']}): {r['stderr'][-800:]}")
    elif status == "exception":
        out.append("a traceback escaped analyse_path:\n" + r["traceback"])
    if r.get("marker"):
        out.append("code from the file ran: its marker file was created")
    if r.get("audit"):
        out.append(f"process/network calls during the analysis: {r['audit']}")
    err = r.get("error") or ""
    if status == "error":
        named = m["error_file"]
        ok = any(err.startswith(n + ": ") and err[len(n) + 2:].strip() for n in shown(named))
        if not ok and os.path.isdir(named):  # a TF folder: the error names what it points at
            head, sep, cause = err.partition(": ")
            ok = head.startswith(named + "/") and bool(sep) and bool(cause.strip())
        if not ok:
            out.append(f"error does not start with {named!r}, ': ' and a cause: {err!r}")
        if "\n" in err or "Traceback" in err:
            out.append(f"error is not one line: {err!r}")
        if any(ord(c) < 32 or c == "\x7f" for c in err):
            out.append(f"error line carries control characters (log injection): {err!r}")
        if " reader failed: " in err:
            out.append(f"a reader raised an unexpected exception (open_reader's catch-all "
                       f"wrapped it): {err!r}")
        if "MemoryError" in err:
            out.append(f"memory was bounded only by this test's {MEMORY_LIMIT >> 20} MiB "
                       f"address-space cap (the reader allocated what the file declares): "
                       f"{err!r}")
        if m["reasons"] and r.get("reason") not in m["reasons"]:
            out.append(f"reason {r.get('reason')!r} is not one of {m['reasons']}: {err!r}")
        for word in m["forbid"]:
            if word in err.lower():
                out.append(f"misleading cause ({word!r}): {err!r}")
    if m["expect"] == "error" and status == "ok":
        out.append("analysed a file that must be refused")
    if m["expect"] == "ok" and status == "error":
        out.append(f"refused a file that must be analysed: {err!r}")
    if status == "ok" and r["nonfinite"] < m["nonfinite"]:
        out.append(f"counted {r['nonfinite']} non-finite values, expected >= {m['nonfinite']}")
    if status == "ok" and m["max_nonfinite"] is not None and r["nonfinite"] > m["max_nonfinite"]:
        out.append(f"counted {r['nonfinite']} non-finite values that only exist in a file "
                   "outside the checkpoint: data was read through a link out of the file")
    return out
