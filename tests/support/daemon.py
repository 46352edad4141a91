"""One harness for the tests that drive a real ``bnexporter run`` subprocess over
real HTTP(S): start it (optionally as another user, through a launcher, with a
config written from a dict), talk to it, parse its scrapes, stop it."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
_LISTEN = re.compile(r"listening on (https?://\S+/) ")


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
        """Every model the daemon knows, analysed or not (model_up waits for a checkpoint)."""
        return {dict(lbl)["model"] for (n, lbl) in self.samples
                if n in ("bnexporter_model_up", "bnexporter_model_exported_series")}


class DaemonProcess:
    """``bnexporter run`` in a subprocess, talked to over HTTP(S).

    ``config`` (a dict) is written to a YAML file and passed as ``--config``;
    ``args`` are further command-line arguments (or the whole command line when
    there is no ``config``). With ``check_metrics``, every distinct scrape is
    also checked by ``promtool check metrics``.
    """

    def __init__(self, workdir: Path, config: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, prefix: list[str] | None = None,
                 args: list[str] | None = None, launcher: list[str] | None = None,
                 check_metrics: bool = False):
        self.workdir = workdir
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = workdir / f"config-{time.monotonic_ns()}.yaml"
            self.config_path.write_text(yaml.safe_dump(config))
            self.config_path.chmod(0o644)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.prefix = prefix or []
        self.args = args or []
        self.launcher = launcher or [sys.executable, "-m", "bnexporter"]
        self.log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.tls: ssl.SSLContext | None = None   # client context for https
        self.auth: tuple[str, str] | None = None
        self.check_metrics = check_metrics
        self.last_headers: dict[str, str] = {}
        self._checked: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------
    def launch(self) -> DaemonProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        config = ["--config", str(self.config_path)] if self.config_path is not None else []
        cmd = [*self.prefix, *self.launcher, "run", *config, *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, env=self.env)
        return self

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        self.launch()
        assert self.proc is not None
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

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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

    # -- HTTP ------------------------------------------------------------------------
    def request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None, timeout: float = 10.0
                ) -> tuple[int, bytes, dict[str, str]]:
        hdrs = dict(headers or {})
        creds = auth or self.auth
        if creds is not None:
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            hdrs["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(self.url.rstrip("/") + path, method=method,
                                     data=b"" if method == "POST" else None, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.tls) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def text(self, path: str, method: str = "GET", headers: dict[str, str] | None = None
             ) -> tuple[int, str]:
        """``request`` with the body decoded; the headers are kept in ``last_headers``."""
        status, body, self.last_headers = self.request(path, method, headers)
        return status, body.decode()

    def scrape(self) -> Scrape:
        """Parse every scrape; with ``check_metrics``, promtool-check every distinct one."""
        status, body, _ = self.request("/metrics")
        assert status == 200, body
        text = body.decode()
        if self.check_metrics:
            digest = hashlib.sha1(body).hexdigest()
            if digest not in self._checked:
                res = subprocess.run([PROMTOOL, "check", "metrics"], input=body,
                                     capture_output=True, timeout=30)
                assert res.returncode == 0, (res.stdout + res.stderr).decode()
                self._checked.add(digest)
        return Scrape(text)

    def wait_for(self, cond: Callable[[Scrape], Any], what: str, timeout: float = 15.0
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

    def wait_log(self, pattern: str, timeout: float = 15.0, count: int = 1) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log()
            if len(re.findall(pattern, text)) >= count:
                return text
            time.sleep(0.1)
        raise AssertionError(f"log never matched {pattern!r} x{count}:\n{self.log()}")

    @property
    def host_port(self) -> tuple[str, int]:
        m = re.match(r"https?://([^/:]+):(\d+)/", self.url)
        assert m, self.url
        return m.group(1).replace("localhost", "127.0.0.1"), int(m.group(2))


def write_slowly(path: Path, data: bytes, chunks: int = 8, pause: float = 0.12) -> None:
    """Write in place the way a framework does: one open handle, growing file."""
    step = max(1, len(data) // chunks)
    with open(path, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start:start + step])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(pause)
