"""Install the package exactly as the container image does, then run it unprivileged.

No container engine here, so this replays the image build: the build stage's COPY
sources go into a fresh folder, ``deploy/install.sh`` (the script the Dockerfile runs)
installs them into a fresh virtualenv, and the daemon is started as ``nobody`` with
``setpriv`` (or as the current user when not root), with HOME=/tmp and
PYTHONDONTWRITEBYTECODE=1 like the image. It must serve /healthz and /metrics, pass the
image's health check script, and write nothing into its installation (read-only root).
Needs the network (or a pip index / cache) for the runtime dependencies.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_ckpt import LayerState, ModelState, write_checkpoint
from deploy_support import DEPLOY, REPO, free_port, http_get, scrape_value, wait_http

pytestmark = pytest.mark.e2e

NOBODY = 65534
BASE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def _build_stage_sources() -> list[str]:
    """Sources the Dockerfile's build stage copies into /src (before install.sh runs)."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    build = text.split("FROM ", 2)[1]
    sources: list[str] = []
    for line in build.splitlines():
        if line.startswith("COPY ") and "--from" not in line and "install.sh" not in line:
            sources += line.split()[1:-1]
    return sources


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if not p.is_symlink()}


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="bnexporter-install-"))   # not under a 0700 parent
    try:
        base.chmod(0o755)
        src = base / "src"
        src.mkdir()
        for rel in _build_stage_sources():
            item = REPO / rel
            if item.is_dir():
                shutil.copytree(item, src / rel,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(item, src / rel)
        env = {**os.environ, "PYTHON": BASE_PYTHON}
        env.pop("VIRTUAL_ENV", None)
        r = subprocess.run(["sh", str(DEPLOY / "install.sh"), str(src), str(base / "venv")],
                           env=env, capture_output=True, text=True, timeout=900, check=False)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert re.search(r"bnexporter, version \d", r.stdout), r.stdout[-500:]
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_install_sh_is_what_the_dockerfile_runs():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "COPY deploy/install.sh /usr/local/bin/bnexporter-install" in text
    assert 'RUN ["/usr/local/bin/bnexporter-install", "/src", "/opt/bnexporter"]' in text
    assert os.stat(DEPLOY / "install.sh").st_mode & stat.S_IXUSR
    assert set(_build_stage_sources()) >= {"pyproject.toml", "bnexporter"}


def test_installed_daemon_runs_unprivileged_and_serves(installed):
    venv = installed / "venv"
    data = installed / "data" / "demo"
    data.mkdir(parents=True)
    for d in (installed / "data", data):
        d.chmod(0o755)
    before = _snapshot(venv)
    port = free_port()
    cmd = [str(venv / "bin" / "bnexporter"), "run", "--watch", f"demo={data}",
           "--listen", f"127.0.0.1:{port}"]
    as_root = os.geteuid() == 0
    if as_root:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               "--no-new-privs", *cmd]
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    log = installed / "daemon.log"
    proc = subprocess.Popen(cmd, cwd="/tmp", env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", 120, proc)
        uid = next(int(line.split()[1]) for line in
                   Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert uid != 0 and (uid == NOBODY or not as_root)

        health = subprocess.run([str(venv / "bin" / "python"), str(DEPLOY / "healthcheck.py")],
                                env={"BNEXPORTER_HEALTHCHECK_URL": f"{base}/healthz"},
                                capture_output=True, text=True, timeout=30, check=False)
        assert health.returncode == 0, health.stderr

        ckpt = write_checkpoint(data / "ckpt-40.h5", ModelState([LayerState(dead=8),
                                                                  LayerState()]))
        ckpt.chmod(0o644)
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            _, text = http_get(f"{base}/metrics")
            if scrape_value(text, "bnexporter_model_dead_ratio", model="demo") == 0.25:
                break
            time.sleep(0.3)
        assert scrape_value(text, "bnexporter_model_dead_ratio", model="demo") == 0.25, \
            text[-2000:]
        assert scrape_value(text, "bnexporter_build_info") == 1
        status, page = http_get(f"{base}/")
        assert status == 200 and "/metrics" in page
    except BaseException:
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode is not None
    after = _snapshot(venv)
    written = sorted(set(after) - set(before)) + \
        sorted(p for p in before if p in after and after[p] != before[p])
    assert not written, f"the daemon wrote into its installation: {written[:10]}"
