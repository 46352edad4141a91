"""Issue 13.4 and 13.5: the web config fails closed; passwords are checked without a
user-name oracle and a flood of wrong ones cannot hold valid scrapes.

Real daemon, TLS + basic auth on loopback.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from pathlib import Path

import bcrypt
import pytest
import yaml
from certs import make_pki
from rel_support import base_config, bn_tensors, safetensors_bytes, tls_client

from bnexporter.daemon.web.auth import VERIFY_WAIT
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.slow


def _hash(pw: str, cost: int) -> str:
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(cost)).decode()


def _start(tmp_path: Path, web_cfg: dict, pki) -> tuple[DaemonProcess, Path]:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "ckpt-1.safetensors").write_bytes(safetensors_bytes(bn_tensors(["bn1"])))
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump(web_cfg))
    cfg = base_config(log_level="info", web_config_file=str(web),
                      models=[{"name": "m", "path": str(folder)}])
    d = DaemonProcess(tmp_path, cfg)
    d.tls = tls_client(pki.ca)
    d.start()
    return d, web


def _settle(d: DaemonProcess, auth: tuple[str, str]) -> None:
    """Connections for 3 s: the file is checked (at most once a second) on new ones."""
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        d.request("/healthz", auth=auth)
        time.sleep(0.3)


def test_web_config_fails_closed(tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    good = {"tls_server_config": {"cert_file": str(pki.server_cert),
                                  "key_file": str(pki.server_key)},
            "basic_auth_users": {"prom": _hash("pw", 4)}}
    d, web = _start(tmp_path, good, pki)
    good_text = web.read_text()
    tls_only = yaml.safe_dump({"tls_server_config": good["tls_server_config"]})
    try:
        assert d.request("/metrics", auth=("prom", "pw"))[0] == 200
        for n, text in enumerate(["", "# being rewritten\n", tls_only, "tls_server_config:\n"
                                  "  cert_file: " + str(pki.server_cert) + "\n  key_f"]):
            web.write_text(text)
            _settle(d, ("prom", "pw"))  # two checks a second apart, then applied or refused
            if n == 2:  # and an explicit reload with the partial file
                d.send(signal.SIGHUP)
                d.wait_log("SIGHUP: reloading", count=1)
                time.sleep(0.5)
            assert d.request("/metrics")[0] == 401, text  # still TLS, still auth
            status, body, _ = d.request("/metrics", auth=("prom", "pw"))
            assert status == 200
            assert b"bnexporter_web_config_last_reload_successful 0.0" in body, text
        log = d.log()
        assert "is empty" in log and "would turn basic auth off" in log
        web.write_text(good_text.replace("prom:", "prom2:"))
        _settle(d, ("prom2", "pw"))
        status, body, _ = d.request("/metrics", auth=("prom2", "pw"))
        assert status == 200 and b"bnexporter_web_config_last_reload_successful 1.0" in body
        assert d.request("/metrics", auth=("prom", "pw"))[0] == 401
    finally:
        assert d.stop() == 0


def _timed(d: DaemonProcess, user: str, pw: str) -> tuple[int, float]:
    t0 = time.monotonic()
    status = d.request("/healthz", auth=(user, pw), timeout=20)[0]
    return status, time.monotonic() - t0


def test_no_user_name_oracle_and_flood(tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    web_cfg = {"tls_server_config": {"cert_file": str(pki.server_cert),
                                     "key_file": str(pki.server_key)},
               "basic_auth_users": {"alice": _hash("right", 12), "bob": _hash("bobs", 12),
                                    "carol": _hash("carols", 12)}}
    d, _ = _start(tmp_path, web_cfg, pki)
    try:
        real = [_timed(d, "alice", f"wrong-{i}") for i in range(5)]
        unknown = [_timed(d, f"nobody{i}", f"wrong-{i}") for i in range(5)]
        assert all(s == 401 for s, _ in real + unknown)
        r, u = statistics.median(t for _, t in real), statistics.median(t for _, t in unknown)
        print(f"wrong password, real user {r * 1000:.0f} ms, unknown user {u * 1000:.0f} ms")
        assert 0.7 < r / u < 1.4, (r, u)
        assert _timed(d, "bob", "bobs")[0] == 200  # bob is cached from now on
        # a flood of distinct wrong passwords from 16 clients
        stop = threading.Event()

        def flood(k: int) -> None:
            i = 0
            while not stop.is_set():
                d.request("/metrics", auth=("alice", f"guess-{k}-{i}"), timeout=20)
                i += 1

        threads = [threading.Thread(target=flood, args=(k,), daemon=True) for k in range(16)]
        for t in threads:
            t.start()
        try:
            time.sleep(2)
            cached = [_timed(d, "bob", "bobs") for _ in range(5)]
            fresh = _timed(d, "carol", "carols")  # valid, never verified before
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        print(f"under the flood: cached {max(t for _, t in cached):.3f} s, "
              f"uncached {fresh[1]:.3f} s ({fresh[0]})")
        assert all(s == 200 and t < 1.0 for s, t in cached), cached
        assert fresh[0] in (200, 503) and fresh[1] < VERIFY_WAIT + 1.5, fresh
        _, body, _ = d.request("/metrics", auth=("bob", "bobs"))
        assert b'bnexporter_auth_verifications_total{result="busy"}' in body
        assert _timed(d, "carol", "carols")[0] == 200  # after the flood
    finally:
        assert d.stop() == 0
