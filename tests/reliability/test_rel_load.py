"""Load on the HTTP side: 50 scrapers at once, while clients that send half a
request and stall, and clients that stop reading a ~9 MB answer, hold
connections open. Nobody else may wait for them."""

from __future__ import annotations

import gzip
import socket
import statistics
import threading
import time
import urllib.request

import pytest
from rel_support import base_config, bn_tensors, safetensors_bytes, usage

from bnexporter.daemon.web.app import HEADER_TIMEOUT
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.slow  # many models, concurrent and slow clients (~25 s)

MODELS, LAYERS = 6, 2000


def _scrape(url: str) -> tuple[float, int]:
    req = urllib.request.Request(url + "metrics", headers={"Accept-Encoding": "gzip"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = gzip.decompress(resp.read())
    return time.monotonic() - t0, len(body)


def _burst(url: str, n: int) -> list[float]:
    """``n`` scrapes started together; their latencies (a failure raises)."""
    out: list[float] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(n)

    def one() -> None:
        try:
            gate.wait(10)
            latency, size = _scrape(url)
            assert size > 5_000_000
            out.append(latency)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(out) == n
    return sorted(out)


def _figures(name: str, lat: list[float]) -> str:
    return (f"{name}: {len(lat)} scrapes, p50 {1000 * statistics.median(lat):.0f} ms, "
            f"max {1000 * lat[-1]:.0f} ms")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("load")
    models = []
    for i in range(MODELS):
        folder = base / f"m{i}"
        folder.mkdir()
        layers = [f"stage{j // 100}.block{j % 100}.bn" for j in range(LAYERS)]
        (folder / "ckpt-100.safetensors").write_bytes(
            safetensors_bytes(bn_tensors(layers, 8, dead=1 + i, seed=i)))
        models.append({"name": f"m{i}", "path": str(folder)})
    d = DaemonProcess(base, base_config(log_level="info", workers=2, models=models)).start()
    d.wait_for(lambda s: all(s.get("bnexporter_model_checkpoint_step", model=f"m{i}") == 100
                             for i in range(MODELS)), "all analysed", timeout=60)
    yield d
    rc = d.stop()
    assert rc == 0, d.log()


def test_concurrent_scrapers_and_slow_clients(big: DaemonProcess):
    d = big
    host, port = d.host_port
    base = usage(d.pid)
    _, size = _scrape(d.url)
    assert size > 8_000_000  # > tcp_wmem max (4 MB): a stalled reader blocks a write
    quiet = _burst(d.url, 50)
    print("\n" + _figures("50 concurrent, no slow clients", quiet))

    # 20 clients send half a request and stall; 3 ask for the plain 9 MB body and never
    # read it (tiny receive buffers: the server's writes block once its buffer is full)
    stalled = []
    for _ in range(20):
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n")
        stalled.append(s)
    readers = []
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect((host, port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        readers.append(s)
    time.sleep(1.0)
    held = usage(d.pid)
    assert held["threads"] >= base["threads"] + 20, (base, held)  # really holding threads
    t0 = time.monotonic()
    loaded = _burst(d.url, 50)
    print(_figures("50 concurrent, 20 stalled requests + 3 stalled readers", loaded))
    assert loaded[-1] < max(5.0, 4 * quiet[-1]), (quiet, loaded)
    assert d.request("/healthz")[0] == 200

    # the half-requests are dropped by the server after HEADER_TIMEOUT
    for s in stalled:  # a socket.timeout here means the server kept it open
        s.settimeout(max(0.1, HEADER_TIMEOUT + 5 - (time.monotonic() - t0)))
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"" or data.startswith(b"HTTP/1."), data
    closed_after = time.monotonic() - t0
    print(f"stalled half-requests closed by the server after {closed_after:.1f} s")
    assert closed_after < HEADER_TIMEOUT + 5
    for s in stalled + readers:
        s.close()
    end = time.monotonic() + 10
    while usage(d.pid)["threads"] > base["threads"] + 2 and time.monotonic() < end:
        time.sleep(0.2)
    after = usage(d.pid)
    assert after["threads"] <= base["threads"] + 2, (base, after)
    assert after["fds"] <= base["fds"] + 2, (base, after)
