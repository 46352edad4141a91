"""The systemd unit: systemd-analyze verify / security in a scratch root, plus its contract."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_support import DEPLOY

UNIT = DEPLOY / "systemd" / "bnexporter.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
SYSTEM_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                     if p.is_dir()), Path("/usr/lib/systemd/system"))


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory) -> Path:
    """A scratch root with the stock units, our unit and a stub executable, so
    ``systemd-analyze --root`` can resolve dependencies without touching the host."""
    root = tmp_path_factory.mktemp("sdroot")
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    exe = root / "opt/bnexporter/bin/bnexporter"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy("/bin/kill", root / "bin/kill")
    return root


def _analyze(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, *args, f"--root={root}"], capture_output=True,
                          text=True, timeout=120, cwd=root, check=False)


def test_unit_verifies_cleanly(unit_root):
    r = _analyze(unit_root, "verify", UNIT.name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_verify_reports_a_misspelt_directive(unit_root):
    """Negative control: verify only warns on unknown keys, so the check above must be
    on empty output, and this proves a mistake does produce output."""
    bad = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilegs=yes")
    (unit_root / "etc/systemd/system/bnexporter-bad.service").write_text(bad)
    r = _analyze(unit_root, "verify", "bnexporter-bad.service")
    assert "Unknown key 'NoNewPrivilegs'" in r.stderr


def test_security_exposure_is_low(unit_root):
    r = _analyze(unit_root, "security", "--offline=yes", UNIT.name)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for bnexporter\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-500:]
    assert float(m[1]) <= 2.0, r.stdout[-2000:]


def test_hardening_directives():
    d = _directives()
    expected = {
        "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "read-only",
        "PrivateTmp": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
        "PrivateDevices": "yes", "RestrictSUIDSGID": "yes", "ProtectKernelTunables": "yes",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert "ReadWritePaths" not in d
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_unit_runs_the_documented_command_on_the_shipped_config():
    d = _directives()
    assert d["ExecStart"] == ["/opt/bnexporter/bin/bnexporter run --config "
                              "/etc/bnexporter/config.yaml"]
    read_only = d["ReadOnlyPaths"][0].split()
    assert "/etc/bnexporter" in read_only
    config = yaml.safe_load((DEPLOY / "config" / "config.yaml").read_text(encoding="utf-8"))
    for model in config["models"]:
        root = model["path"].split("{", 1)[0].rstrip("/")
        assert any(root == p or root.startswith(p + os.sep) for p in read_only), root
