"""Helpers for the reliability tests: the real ``bnexporter run`` as a subprocess
(optionally as another user, in another mount namespace, with TLS), its process
tree and resource use read from /proc, and small checkpoint writers."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "daemon"))
from daemon_support import Scrape  # noqa: E402

_LISTEN = re.compile(r"listening on (https?://\S+/) ")
NOBODY = 54321  # a uid/gid with no other processes, for tests that need a non-root daemon


def base_config(**extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0", "log_level": "debug", "poll_interval": 0.3,
        "rescan_interval": 5, "settle_seconds": 0.3, "analysis_timeout": 60,
        "retry": {"initial_delay": 0.2, "max_delay": 0.5, "give_up_after": 3,
                  "max_attempts": 20},
    }
    cfg.update(extra)
    return cfg


def shared_dir(prefix: str = "bnexporter-rel-", owner: int | None = None) -> Path:
    """A folder outside pytest's 0700 basetemp, so another uid can reach it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


class Daemon:
    """``bnexporter run --config FILE`` in a subprocess, talked to over HTTP(S)."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                 prefix: list[str] | None = None, args: list[str] | None = None,
                 launcher: list[str] | None = None):
        self.workdir = workdir
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

    # -- lifecycle ---------------------------------------------------------------
    def launch(self) -> Daemon:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [*self.prefix, *self.launcher, "run", "--config", str(self.config_path),
               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, env=self.env)
        return self

    def start(self, timeout: float = 20.0) -> Daemon:
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

    def stop(self, timeout: float = 10.0) -> int:
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

    def scrape(self) -> Scrape:
        status, body, _ = self.request("/metrics")
        assert status == 200, body
        return Scrape(body.decode())

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


# -- /proc ------------------------------------------------------------------------

def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    tree = children_map()
    out, stack = [], list(tree.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(tree.get(p, []))
    return out


def exists(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:data.rfind(b")") + 3] != b"Z"


def usage(pid: int) -> dict[str, int]:
    """RSS (kB), open fds, threads of ``pid``; processes below it."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads,
            "children": len(descendants(pid))}


# -- checkpoints -------------------------------------------------------------------

def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file (float32/int64 only), written by hand."""
    header: dict[str, Any] = {}
    offset = 0
    blobs = []
    for name, arr in tensors.items():
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[arr.dtype]
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def bn_tensors(layers: list[str], channels: int = 8, dead: int = 2, seed: int = 0,
               pad_elements: int = 0) -> dict[str, np.ndarray]:
    """Torch-named BN layers with ``dead`` dead channels each, plus optional padding."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in layers:
        beta = rng.uniform(0.0, 0.2, channels).astype(np.float32)
        beta[:dead] = -5.0
        out[f"{name}.weight"] = rng.uniform(0.8, 1.2, channels).astype(np.float32)
        out[f"{name}.bias"] = beta
        out[f"{name}.running_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
        out[f"{name}.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    if pad_elements:
        out["head.weight"] = rng.normal(0, 0.02, pad_elements).astype(np.float32)
    return out


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tls_client(ca: Path, cert: Path | None = None, key: Path | None = None,
               max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def raw_connect(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)
