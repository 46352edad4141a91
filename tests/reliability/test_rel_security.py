"""Endpoint security: an exporter-toolkit web config (TLS, client certificates,
bcrypt basic auth), names from files escaped everywhere they are shown, and
symbolic links that do not lead the daemon out of its folders."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest
import yaml
from certs import make_pki
from rel_support import RELU_RULE, base_config, bn_tensors, safetensors_bytes, tls_client

from bnexporter.daemon.demo import write_checkpoint
from tests.support.daemon import DaemonProcess


def _step(s, model):  # type: ignore[no-untyped-def]
    return s.get("bnexporter_model_checkpoint_step", model=model)


def _hash(password: str, cost: int = 4) -> str:
    # exporter-toolkit docs and htpasswd write $2y$; bcrypt verifies it the same way
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode().replace("$2b$",
                                                                                   "$2y$")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _served_cert(host: str, port: int, ca: Path) -> bytes:
    ctx = tls_client(ca)
    with socket.create_connection((host, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        return tls.getpeercert(binary_form=True)  # type: ignore[return-value]


def test_tls_and_basic_auth(tmp_path: Path, pki):
    folder = tmp_path / "m"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-100.h5"), 100)
    web = tmp_path / "web.yml"
    web_cfg = {"tls_server_config": {"cert_file": str(pki.server_cert),
                                     "key_file": str(pki.server_key), "min_version": "TLS13"},
               "http_server_config": {"headers": {"X-Frame-Options": "deny"}},
               "basic_auth_users": {"alice": _hash("wonderland", cost=12),
                                    "bob": _hash("builder")}}
    web.write_text(yaml.safe_dump(web_cfg))
    cfg = base_config(web_config_file=str(web), models=[{"name": "m", "path": str(folder)}])
    d = DaemonProcess(tmp_path, cfg)
    d.tls = tls_client(pki.ca)
    d.start()
    try:
        assert d.url.startswith("https://")
        assert "endpoint security: TLS, basic auth (2 users)" in d.log()
        # every path wants credentials
        for path, method in (("/metrics", "GET"), ("/", "GET"), ("/healthz", "GET"),
                             ("/-/reload", "POST")):
            status, _, headers = d.request(path, method)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Basic")
        assert d.request("/metrics", auth=("alice", "wrong"))[0] == 401
        assert d.request("/metrics", auth=("mallory", "wonderland"))[0] == 401
        assert d.request("/metrics", headers={"Authorization": "Basic !!!"})[0] == 401
        # the right password; the configured header on every answer
        t0 = time.monotonic()
        status, body, headers = d.request("/healthz", auth=("alice", "wonderland"))
        first = time.monotonic() - t0
        assert status == 200 and body == b"ok\n"
        assert headers["X-Frame-Options"] == "deny"
        d.auth = ("alice", "wonderland")
        s = d.wait_for(lambda s: _step(s, "m") == 100, "analysed, scraped over TLS")
        assert s.get("bnexporter_model_up", model="m") == 1
        # verified passwords are cached: later requests skip bcrypt (cost 12: ~0.2 s)
        t0 = time.monotonic()
        for _ in range(5):
            assert d.request("/healthz")[0] == 200
        later = (time.monotonic() - t0) / 5
        assert later < first / 3, (first, later)
        # TLS only, and only the configured versions
        host, port = d.host_port
        with socket.create_connection((host, port), timeout=5) as plain:
            plain.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            try:
                answer = plain.recv(100)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"HTTP/")
        old = tls_client(pki.ca, max_version=ssl.TLSVersion.TLSv1_2)
        with socket.create_connection((host, port), timeout=5) as raw, \
                pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname=host)
        # clients that never start the handshake do not hold up anyone else
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(10)]
        t0 = time.monotonic()
        assert d.request("/metrics")[0] == 200
        assert time.monotonic() - t0 < 1
        for sock in idle:
            sock.close()
        # certificate rotation: new connections get the new certificate
        before = _served_cert(host, port, pki.ca)
        cert, key = pki.leaf("server2", "DNS:localhost,IP:127.0.0.1", "serverAuth")
        pki.server_cert.write_bytes(cert.read_bytes())
        pki.server_key.write_bytes(key.read_bytes())
        end = time.monotonic() + 5
        while _served_cert(host, port, pki.ca) == before and time.monotonic() < end:
            time.sleep(0.2)
        assert _served_cert(host, port, pki.ca) != before
        # a broken web config is refused on reload and never falls open
        web.write_text("basic_auth_users:\n  alice: not-a-hash\n")
        status, body, _ = d.request("/-/reload", "POST")
        assert status == 500 and b"basic_auth_users.alice" in body
        assert d.request("/metrics", auth=("nobody", ""))[0] == 401
        assert d.request("/metrics")[0] == 200
        # files are checked at most once a second, on new connections, and a change is
        # taken only once it has stayed the same for two checks (a writer may be mid-way)
        end = time.monotonic() + 10
        while "web config changed but is not valid" not in d.log() and time.monotonic() < end:
            assert d.request("/metrics", auth=("nobody", ""))[0] == 401  # never falls open
            time.sleep(0.3)
        d.wait_log("web config changed but is not valid", timeout=1)
    finally:
        rc = d.stop()
    assert rc == 0, d.log()


def test_client_certificates(tmp_path: Path, pki):
    folder = tmp_path / "m"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-100.h5"), 100)
    good = pki.leaf("scraper", "DNS:scraper.example")
    other = pki.leaf("intruder", "DNS:other.example")
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"tls_server_config": {
        "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(pki.ca),
        "client_allowed_sans": ["scraper.example"]}}))
    cfg = base_config(models=[{"name": "m", "path": str(folder)}])
    d = DaemonProcess(tmp_path, cfg, args=["--web.config.file", str(web)])
    d.tls = tls_client(pki.ca, *good)
    d.start()
    try:
        assert "client certificates (RequireAndVerifyClientCert)" in d.log()
        d.wait_for(lambda s: _step(s, "m") == 100, "scraped with a client certificate")
        for client in (tls_client(pki.ca), tls_client(pki.ca, *other)):
            d.tls = client
            with pytest.raises((OSError, ssl.SSLError)):
                status, _, _ = d.request("/metrics", timeout=5)
                raise AssertionError(f"answered {status} without an allowed certificate")
    finally:
        rc = d.stop()
    assert rc == 0, d.log()


def _run_fails(tmp_path: Path, web_text: str, env: dict[str, str] | None = None) -> str:
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    web = tmp_path / "web.yml"
    web.write_text(web_text)
    res = subprocess.run([sys.executable, "-m", "bnexporter", "run", "--watch", str(folder),
                          "--listen", "127.0.0.1:0", "--web.config.file", str(web)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bnexporter: {web}: "), res.stderr
    return lines[0]


def test_bad_web_configs_stop_the_start_with_one_line(tmp_path: Path, pki):
    users = f"basic_auth_users:\n  alice: '{_hash('x')}'\n"
    fake = tmp_path / "no-bcrypt" / "bcrypt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('bcrypt removed for this test')\n")
    line = _run_fails(tmp_path, users, env={"PYTHONPATH": str(fake.parent)})
    assert "needs the bcrypt package" in line and "bnexporter[auth]" in line
    tls = (f"tls_server_config:\n  cert_file: {pki.server_cert}\n"
           f"  key_file: {pki.server_key}\n")
    assert "not supported" in _run_fails(
        tmp_path, tls + f"  client_auth_type: RequestClientCert\n  client_ca_file: {pki.ca}\n")
    assert "unknown key" in _run_fails(tmp_path, tls + "  min_versoin: TLS12\n")
    assert "cannot load the certificate" in _run_fails(
        tmp_path, f"tls_server_config:\n  cert_file: {pki.ca}\n  key_file: {pki.server_key}\n")
    assert "expected a bcrypt hash" in _run_fails(tmp_path, "basic_auth_users: {a: plain}\n")


# -- names from files ------------------------------------------------------------------

EVIL_FOLDER = "<img src=x onerror=alert(1)>"
FORGED = "2030-01-01T00:00:00 ERROR bnexporter: forged line"
EVIL_LAYER = "<script>alert('x')</script>&\"q\""


def test_names_are_escaped_on_the_page_in_metrics_and_in_logs(tmp_path: Path):
    base = tmp_path / "jobs"
    base.mkdir()
    for name in (EVIL_FOLDER, "evil\n" + FORGED):
        (base / name).mkdir()
        data = safetensors_bytes(bn_tensors([EVIL_LAYER, "ok.bn"], 8, dead=3))
        (base / name / "ckpt-100.safetensors").write_bytes(data)
    cfg = base_config(models=[{"path": str(base / "{model}")}], **RELU_RULE)
    d = DaemonProcess(tmp_path, cfg).start()
    try:
        s = d.wait_for(lambda s: _step(s, EVIL_FOLDER) == 100
                       and _step(s, "evil\n" + FORGED) == 100, "both analysed")
        # the exposition escapes and the parser gets the exact names back
        assert s.get("bnexporter_layer_dead_channels", model=EVIL_FOLDER, layer=EVIL_LAYER) == 3
        status, page, _ = d.request("/")
        html = page.decode()
        assert status == 200
        assert "<script" not in html and "<img" not in html
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;q&quot;" in html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html
        log = d.log()
        assert not any(line.startswith(FORGED) for line in log.splitlines())
        assert "evil\\n" + FORGED in log  # the newline is shown, not obeyed
    finally:
        rc = d.stop()
    assert rc == 0, d.log()


# -- symbolic links --------------------------------------------------------------------

def test_symlinks_do_not_lead_out_of_the_model_folder(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_checkpoint(str(outside / "secret-900.h5"), 900)
    (outside / "deep").mkdir()
    write_checkpoint(str(outside / "deep" / "ckpt-999.h5"), 999)
    m = tmp_path / "m"
    m.mkdir()
    write_checkpoint(str(m / "ckpt-100.h5"), 100)
    (m / "last.ckpt").symlink_to(m / "ckpt-100.h5")            # inside: fine
    (m / "ckpt-900.h5").symlink_to(outside / "secret-900.h5")   # out of the folder
    (m / "ckpt-950.h5").symlink_to(m / "loop-b.h5")             # a loop
    (m / "loop-b.h5").symlink_to(m / "ckpt-950.h5")
    (m / "sub").symlink_to(outside / "deep", target_is_directory=True)
    os.mkfifo(m / "ckpt-990.h5")                                # would block a reader
    followed = tmp_path / "followed"
    followed.mkdir()
    (followed / "ckpt-900.h5").symlink_to(outside / "secret-900.h5")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "real").mkdir()
    write_checkpoint(str(jobs / "real" / "ckpt-100.h5"), 100)
    (jobs / "escape").symlink_to(outside, target_is_directory=True)
    cfg = base_config(models=[{"name": "m", "path": str(m)},
                              {"name": "followed", "path": str(followed),
                               "follow_symlinks": True},
                              {"path": str(jobs / "{model}")}])
    d = DaemonProcess(tmp_path, cfg).start()
    try:
        s = d.wait_for(lambda s: _step(s, "m") == 100 and _step(s, "followed") == 900
                       and _step(s, "real") == 100, "analysed")
        assert "escape" not in s.models()
        time.sleep(0.5)
        assert _step(d.scrape(), "m") == 100
        log = d.log()
        assert f"skipping {m / 'ckpt-900.h5'}: symlink points outside the model folder" in log
        assert f"skipping {m / 'ckpt-950.h5'}: symlink cannot be resolved" in log
        assert f"skipping {m / 'ckpt-990.h5'}: not a regular file" in log
        assert f"skipping {m / 'sub'}: symlinked folder not followed" in log
        assert not re.search(r"skipping \S*last\.ckpt", log)   # a link inside is fine
        assert not re.search(r"model m: analys\w+ \S*(ckpt-9|sub/)", log)
        assert "ckpt-999" not in log  # the linked folder was not even listed
        assert d.request("/healthz")[0] == 200
    finally:
        rc = d.stop()
    assert rc == 0, d.log()
