"""In-process checks of the small pieces behind the reliability features: the web
config parser, basic auth, the rate limit, log escaping, stall detection and the
candidate filter (symlinks, non-regular files)."""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from pathlib import Path

import bcrypt
import pytest

from bnexporter.daemon.config import DEFAULT_PATTERNS
from bnexporter.daemon.files import list_candidates
from bnexporter.daemon.logsafe import SafeFormatter, escape_controls
from bnexporter.daemon.progress import StallWatch, proc_dir, sample
from bnexporter.daemon.validate import ConfigError
from bnexporter.daemon.web.auth import BasicAuth, RateLimit, parse_basic
from bnexporter.daemon.web.webconfig import _duration, allowed_san, load_web_config


def _web(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "web.yml"
    p.write_text(text)
    return p


def test_web_config_errors_are_precise(tmp_path: Path):
    cases = {
        "tls_server_config: {key_file: web.yml}\n": "missing cert_file",
        "tls_server_config:\n  cert_file: /nonexistent\n": "not a readable file",
        "basic_auth_users: [a, b]\n": "expected a mapping",
        "basic_auth_users: {'a:b': '$2y$10$" + "x" * 53 + "'}\n": "without ':'",
        "rate_limit: {interval: soon, burst: 1}\n": "expected a duration",
        "http_server_config: {headers: {X-Evil: 1}}\n": "unknown key",
        "bogus: 1\n": "bogus: unknown key",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            load_web_config(str(_web(tmp_path, text)))
        assert expected in str(info.value), (text, str(info.value))
        assert str(info.value).startswith(str(tmp_path / "web.yml"))
        assert "\n" not in str(info.value)


def test_web_config_without_tls_notes_clear_text(tmp_path: Path):
    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    web = load_web_config(str(_web(tmp_path, f"basic_auth_users: {{u: '{h}'}}\n"
                                              "rate_limit: {interval: 1m30s, burst: 3}\n")))
    assert web.users == {"u": h} and web.tls is None
    assert web.rate_limit == (90.0, 3)
    assert any("clear text" in n for n in web.notes)
    for text in ("", "# nothing yet\n", "{}\n"):  # fail closed (issue 13.4): not "no auth"
        with pytest.raises(ConfigError, match="is empty"):
            load_web_config(str(_web(tmp_path, text)))


def test_duration_and_sans():
    assert _duration("x", "500ms", "l") == 0.5
    assert _duration("x", "1h2m3s", "l") == 3723
    assert _duration("x", 2, "l") == 2.0
    cert = {"subjectAltName": (("DNS", "a.example"), ("IP Address", "10.0.0.1"))}
    assert allowed_san(cert, ("10.0.0.1",)) and not allowed_san(cert, ("b.example",))
    assert allowed_san(None, ()) and not allowed_san(None, ("a.example",))


def _header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_caches_only_successes():
    h = bcrypt.hashpw(b"secret", bcrypt.gensalt(10)).decode()
    auth = BasicAuth({"alice": h})
    t0 = time.perf_counter()
    assert auth.check(_header("alice", "secret"))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(20):
        assert auth.check(_header("alice", "secret"))
    assert (time.perf_counter() - t0) / 20 < first / 10
    assert not auth.check(_header("alice", "Secret"))
    assert not auth.check(_header("bob", "secret"))
    assert not auth.check(None) and not auth.check("Bearer x") and not auth.check("Basic %%")
    assert len(auth._ok) == 1
    assert all(b"secret" not in key for key in auth._ok)  # an HMAC, not the password
    assert parse_basic(_header("u", "p:w")) == ("u", "p:w")


def test_rate_limit_token_bucket():
    now = [0.0]
    rl = RateLimit(1.0, 3, clock=lambda: now[0])
    assert [rl.allow() for _ in range(4)] == [True, True, True, False]
    now[0] = 1.0
    assert rl.allow() and not rl.allow()


def test_log_messages_cannot_forge_lines():
    assert escape_controls("a\nb\rc\x1b[31m\x00\u2028") == "a\\nb\\rc\\x1b[31m\\x00\\u2028"
    assert escape_controls("plain ü") == "plain ü"
    fmt = SafeFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("x\nFAKE")
    except ValueError:
        rec = logging.LogRecord("n", logging.ERROR, "f", 1, "model %s", ("m\nINFO forged",),
                                exc_info=True)
        rec.exc_info = __import__("sys").exc_info()
    lines = fmt.format(rec).splitlines()
    assert lines[0] == "ERROR model m\\nINFO forged"
    assert all(line.startswith("  ") for line in lines[1:])


def test_stall_watch_sees_a_blocked_thread():
    assert sample(proc_dir(os.getpid())) is not None
    assert sample("/proc/0") is None
    blocked, tid = threading.Event(), []

    def wait() -> None:
        tid.append(threading.get_native_id())
        blocked.wait(10)  # no CPU, no reads: frozen counters

    t = threading.Thread(target=wait)
    t.start()
    while not tid:
        time.sleep(0.01)
    w = StallWatch(proc_dir(os.getpid(), tid[0]), 0.3, time.monotonic())
    assert not w.stalled(time.monotonic())
    time.sleep(0.4)
    assert w.stalled(time.monotonic())
    blocked.set()
    t.join()
    assert not StallWatch("/proc/self", 0, 0.0).stalled(100.0)  # 0: off


def test_candidates_skip_links_out_loops_and_fifos(tmp_path: Path):
    inside, outside = tmp_path / "m", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "ckpt-1.h5").write_bytes(b"x")
    (outside / "o.h5").write_bytes(b"x")
    (inside / "ckpt-2.h5").symlink_to(outside / "o.h5")
    (inside / "last.h5").symlink_to(inside / "ckpt-1.h5")
    (inside / "a.h5").symlink_to(inside / "b.h5")
    (inside / "b.h5").symlink_to(inside / "a.h5")
    os.mkfifo(inside / "ckpt-3.h5")
    skipped: dict[str, str] = {}
    found = list_candidates(str(inside), DEFAULT_PATTERNS, skipped=skipped)
    assert [c.path for c in found] == [str(inside / "ckpt-1.h5")]  # last.h5 is its alias
    assert "outside" in skipped[str(inside / "ckpt-2.h5")]
    assert "cannot be resolved" in skipped[str(inside / "a.h5")]
    assert skipped[str(inside / "ckpt-3.h5")] == "not a regular file"
    followed = list_candidates(str(inside), DEFAULT_PATTERNS, follow_symlinks=True)
    assert str(inside / "ckpt-2.h5") in {c.path for c in followed}
