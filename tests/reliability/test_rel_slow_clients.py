"""Issue 13.3: slow clients cannot hold the server; many honest scrapers are all served.

Real daemon, loopback. 256 clients (kept at 256: a cut one is replaced at once) send
their request one byte a second; plain HTTP, then TLS + basic auth (where they trickle a
real ClientHello and need no credentials). Throughout, scrapes are answered fast, and
every slow connection is cut within the whole-request deadline (server.REQUEST_TIMEOUT)
however it trickles. Then 200 scrapers at once: all answered.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path

import bcrypt
import pytest
import yaml
from certs import make_pki
from rel_support import base_config, bn_tensors, safetensors_bytes, tls_client

from bnexporter.daemon.web.server import REQUEST_TIMEOUT
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.slow
SLOW = 256
REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris-" + b"x" * 64


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


class Slowloris:
    """``n`` connections that each send one byte of ``payload`` per second."""

    def __init__(self, port: int, payload: bytes, n: int = SLOW):
        self.port, self.payload, self.n = port, payload, n
        self.lifetimes: list[float] = []   # seconds from connect to being cut
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> list:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.setblocking(False)
        self.opened += 1
        return [s, time.monotonic(), 0]

    def _run(self) -> None:
        conns = [self._open() for _ in range(self.n)]
        while not self.stop.is_set():
            t0 = time.monotonic()
            for c in conns:
                s, born, sent = c
                gone = False
                try:
                    if s.recv(4096) == b"":
                        gone = True
                except BlockingIOError:
                    pass
                except OSError:
                    gone = True
                if not gone and sent < len(self.payload):
                    try:
                        s.send(self.payload[sent:sent + 1])
                        c[2] += 1
                    except BlockingIOError:
                        pass
                    except OSError:
                        gone = True
                if gone:
                    self.lifetimes.append(time.monotonic() - born)
                    s.close()
                    with contextlib.suppress(OSError):
                        c[:] = self._open()
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))
        for s, _, _ in conns:
            s.close()


def _scrape_times(d: DaemonProcess, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        status, _, _ = d.request("/metrics", timeout=10)
        assert status == 200
        out.append(time.monotonic() - t0)
        time.sleep(0.25)
    return out


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "ckpt-1.safetensors").write_bytes(safetensors_bytes(bn_tensors(["bn1", "bn2"])))
    return folder


def test_slow_clients_plain_then_200_scrapers(tmp_path: Path):
    folder = _folder(tmp_path)
    d = DaemonProcess(tmp_path, base_config(log_level="info",
                                            models=[{"name": "m", "path": str(folder)}]))
    d.start()
    port = int(d.url.rsplit(":", 1)[1].strip("/"))
    try:
        d.wait_for(lambda s: s.get("bnexporter_model_bn_layers", model="m") == 2, "analysed")
        loris = Slowloris(port, REQUEST)
        loris.thread.start()
        try:
            time.sleep(2)
            times = _scrape_times(d, REQUEST_TIMEOUT + 4)
        finally:
            loris.stop.set()
            loris.thread.join(10)
        assert max(times) < 2.0, times
        assert loris.lifetimes, "no slow connection was ever cut"
        assert max(loris.lifetimes) < REQUEST_TIMEOUT + 2.5, max(loris.lifetimes)
        s = d.scrape()
        cut = sum(s.get("bnexporter_http_connections_closed_total", reason=r) or 0
                  for r in ("request_timeout", "evicted"))
        assert cut >= len(loris.lifetimes) - SLOW  # every cut is counted
        # 200 honest scrapers at once
        results: list[tuple[int, float]] = []
        lock = threading.Lock()
        go = threading.Event()

        def one() -> None:
            go.wait()
            t0 = time.monotonic()
            try:
                status = d.request("/metrics", timeout=10)[0]
            except OSError:
                status = -1
            with lock:
                results.append((status, time.monotonic() - t0))

        threads = [threading.Thread(target=one) for _ in range(200)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(30)
        assert len(results) == 200
        failures = [r for r in results if r[0] != 200]
        lat = sorted(r[1] for r in results)
        print(f"200 scrapers: p50 {lat[100]:.3f} s, p99 {lat[197]:.3f} s, max {lat[-1]:.3f} s")
        assert not failures, failures[:5]
        assert lat[197] < 1.5, lat[-5:]
    finally:
        assert d.stop() == 0


def test_slow_clients_tls_and_auth(tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    folder = _folder(tmp_path)
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
        "basic_auth_users": {"prom": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()}}))
    cfg = base_config(log_level="info", web_config_file=str(web),
                      models=[{"name": "m", "path": str(folder)}])
    d = DaemonProcess(tmp_path, cfg)
    d.tls = tls_client(pki.ca)
    d.auth = ("prom", "pw")
    d.start()
    port = int(d.url.rsplit(":", 1)[1].strip("/"))
    try:
        d.wait_for(lambda s: s.get("bnexporter_model_bn_layers", model="m") == 2, "analysed")
        hello = _client_hello()
        assert len(hello) > REQUEST_TIMEOUT + 10  # it cannot finish before the deadline
        loris = Slowloris(port, hello)
        loris.thread.start()
        try:
            time.sleep(2)
            times = _scrape_times(d, REQUEST_TIMEOUT + 4)
            assert d.request("/metrics", auth=("x", "y"))[0] == 401
        finally:
            loris.stop.set()
            loris.thread.join(10)
        assert max(times) < 2.0, times
        assert loris.lifetimes and max(loris.lifetimes) < REQUEST_TIMEOUT + 2.5
    finally:
        assert d.stop() == 0
