"""The container recipe: hadolint, its structure, the ignore file and the health check."""

from __future__ import annotations

import fnmatch
import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from deploy_support import DEFAULT_PORT, DEPLOY, REPO, free_port

DOCKERFILE = DEPLOY / "Dockerfile"
IGNORE = DEPLOY / "Dockerfile.dockerignore"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HADOLINT, "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_hadolint_passes():
    r = _hadolint(DOCKERFILE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_is_really_linting(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    r = _hadolint(bad)
    assert r.returncode != 0 and "DL3007" in r.stdout


def test_image_installs_with_install_sh_and_runs_unprivileged():
    ins = _instructions()
    runs = [arg for word, arg in ins if word == "RUN"]
    assert any("bnexporter-install" in r for r in runs)
    assert ("COPY", "deploy/install.sh /usr/local/bin/bnexporter-install") in ins
    froms = [arg for word, arg in ins if word == "FROM"]
    assert len(froms) == 2 and "slim" in (DOCKERFILE.read_text().split("PYTHON_IMAGE=")[1]
                                          .split()[0])
    # the last USER is numeric and not root, so runAsNonRoot can verify it
    user = [arg for word, arg in ins if word == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert ("EXPOSE", str(DEFAULT_PORT)) in ins
    env = " ".join(arg for word, arg in ins if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env
    health = next(arg for word, arg in ins if word == "HEALTHCHECK")
    assert "healthcheck.py" in health and "curl" not in health and "wget" not in health
    assert ("ENTRYPOINT", '["bnexporter"]') in ins
    assert ("CMD", '["run", "--config", "/etc/bnexporter/config.yaml"]') in ins


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's last-match-wins rule with ``!`` exceptions (enough for our patterns)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pat) or
                  (pat.startswith("**/") and fnmatch.fnmatchcase(parts[-1], pat[3:]))
                  for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_ignore_file_keeps_exactly_what_the_build_copies():
    patterns = [line.strip() for line in IGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for word, arg in _instructions():
        if word == "COPY" and not arg.startswith("--from"):
            sources += arg.split()[:-1]
    assert "bnexporter" in sources and "deploy/install.sh" in sources
    for src in sources:
        path = REPO / src
        files = [path] if not path.is_dir() else [p for p in path.rglob("*.py")]
        for f in files:
            rel = str(f.relative_to(REPO))
            assert not _ignored(rel, patterns), f"{rel} is copied but ignored"
    for rel in ("tests/deploy/test_deploy_docker.py", ".git/HEAD", "benchmarks/data/x.h5",
                "bnexporter/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(rel, patterns), f"{rel} should stay out of the build context"


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "exit_code"), [(200, 0), (503, 1)])
def test_healthcheck_script_follows_healthz(status, exit_code):
    handler = type("H", (_Handler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
        r = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], timeout=20,
                           env={"BNEXPORTER_HEALTHCHECK_URL": url}, capture_output=True,
                           check=False)
        assert r.returncode == exit_code, r.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_fails_when_nothing_listens():
    url = f"http://127.0.0.1:{free_port()}/healthz"
    r = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], timeout=20,
                       env={"BNEXPORTER_HEALTHCHECK_URL": url}, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 1 and "healthcheck:" in r.stderr
