"""Drive a real ``bnexporter run`` subprocess over real HTTP for the daemon tests."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
_LISTEN = re.compile(r"listening on (http://\S+/) ")


class Scrape:
    """One parsed /metrics answer: samples keyed by (name, sorted labels)."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(lbl) for (n, lbl) in self.samples if n == name]

    def models(self) -> set[str]:
        return {dict(lbl)["model"] for (n, lbl) in self.samples
                if n == "bnexporter_model_up"}


class DaemonProc:
    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.args = args
        self.workdir = workdir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._checked: set[str] = set()

    def start(self, timeout: float = 20.0) -> DaemonProc:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "bnexporter", "run", *self.args],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, env=self.env)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = _LISTEN.search(self.log())
            if m:
                self.url = m.group(1)
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"daemon did not start listening:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- HTTP ----------------------------------------------------------------------
    def request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None
                ) -> tuple[int, str]:
        req = urllib.request.Request(self.url.rstrip("/") + path, method=method,
                                     data=b"" if method == "POST" else None,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                self.last_headers = dict(resp.headers)
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self) -> Scrape:
        """Parse every scrape; promtool-check every distinct one."""
        status, text = self.request("/metrics")
        assert status == 200, text
        parsed = Scrape(text)
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest not in self._checked:
            res = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                                 capture_output=True, timeout=30)
            assert res.returncode == 0, (res.stdout + res.stderr).decode()
            self._checked.add(digest)
        return parsed

    def wait_for(self, cond: Callable[[Scrape], Any], what: str, timeout: float = 10.0
                 ) -> Scrape:
        end = time.monotonic() + timeout
        last: Scrape | None = None
        while time.monotonic() < end:
            last = self.scrape()
            if cond(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n--- last scrape ---\n"
                             f"{last.text if last else ''}\n--- log ---\n{self.log()}")

    # -- lifecycle -----------------------------------------------------------------
    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; kill (and fail loudly later) if it does not exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def write_slowly(path: Path, data: bytes, chunks: int = 8, pause: float = 0.12) -> None:
    """Write in place the way a framework does: one open handle, growing file."""
    step = max(1, len(data) // chunks)
    with open(path, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start:start + step])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(pause)
