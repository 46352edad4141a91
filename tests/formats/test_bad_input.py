"""Every kind of bad file gets one line naming the file and the cause, and the
other files of the same scan still get analysed."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.numpy import save_file

from bnexporter.scan import analyse_path


def _good(tmp_path):
    path = str(tmp_path / "good.safetensors")
    save_file({"bn.weight": np.ones(4, np.float32), "bn.bias": np.full(4, -5.0, np.float32),
               "bn.running_mean": np.zeros(4, np.float32),
               "bn.running_var": np.ones(4, np.float32)}, path)
    return path


def _zip_bomb(path):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", "{}")
        zf.writestr("config.json", "{}")
        with zf.open("model.weights.h5", "w", force_zip64=True) as fh:
            block = b"\0" * (1 << 20)
            for _ in range(300):
                fh.write(block)


def _huge_hdf5(path):
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"bn"]
        f.attrs["keras_version"] = "2.15.0"
        g = f.create_group("bn")
        g.attrs["weight_names"] = [b"bn/gamma:0"]
        g.create_dataset("bn/gamma:0", shape=(10**12,), dtype="f4", chunks=(1024,))


BAD = {
    "empty.h5": lambda p: Path(p).write_bytes(b""),
    "random.pt": lambda p: Path(p).write_bytes(os.urandom(4096)),
    "text.safetensors": lambda p: Path(p).write_text("not a checkpoint\n"),
    "truncated.safetensors": None,  # built from the good file below
    "bomb.keras": _zip_bomb,
    "huge.h5": _huge_hdf5,
    "halfzip.pt": lambda p: Path(p).write_bytes(b"PK\x03\x04" + os.urandom(200)),
}


@pytest.fixture
def bad_files(tmp_path):
    good = _good(tmp_path)
    paths = {}
    for name, make in BAD.items():
        path = str(tmp_path / name)
        if make is None:
            data = Path(good).read_bytes()
            Path(path).write_bytes(data[: len(data) - 7])
        else:
            make(path)
        paths[name] = path
    return good, paths


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_gives_a_one_line_error_naming_the_file(bad_files, name):
    _, paths = bad_files
    report = analyse_path(paths[name])
    assert report.error is not None
    assert report.error.startswith(paths[name] + ": ")
    assert "\n" not in report.error and "Traceback" not in report.error
    assert report.error_reason


def test_nan_everywhere_is_analysed_and_counted(tmp_path):
    path = str(tmp_path / "nan.safetensors")
    save_file({"bn.weight": np.full(4, np.nan, np.float32),
               "bn.bias": np.full(4, np.inf, np.float32),
               "bn.running_mean": np.full(4, np.nan, np.float32),
               "bn.running_var": np.full(4, np.nan, np.float32)}, path)
    report = analyse_path(path)
    assert report.error is None
    assert report.summary.nonfinite == 16
    assert report.summary.dead == 0


def test_scan_cli_reports_bad_files_and_goes_on(bad_files):
    good, paths = bad_files
    argv = [sys.executable, "-m", "bnexporter", "scan", "--json", *paths.values(), good]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    by_path = {c["path"]: c for c in doc["checkpoints"]}
    assert by_path[good]["error"] is None and by_path[good]["summary"]["would_be_dead"] == 4
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err_lines) == len(paths)
    for path in paths.values():
        assert by_path[path]["error"].startswith(path)
        assert sum(path + ":" in line for line in err_lines) == 1
    assert "Traceback" not in proc.stderr


def test_scan_cli_exit_codes(tmp_path):
    good = _good(tmp_path)

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bnexporter", "scan", *a],
                              capture_output=True, text=True, timeout=60)

    assert run(good).returncode == 0
    # the lone BN's consumer is unknown: never counted dead, reported as "would be dead"
    assert run("--fail-on", "dead", good).returncode == 0
    assert run("--consumer", "bn=relu", "--fail-on", "dead", good).returncode == 1
    assert run("--fail-on", "nonfinite", good).returncode == 0
    out = run(good).stdout
    assert "dead 0" in out and "would be dead 4" in out
    assert "dead 4" in run("--consumer", "bn=relu", good).stdout


def test_zip_bomb_is_refused_from_its_headers(tmp_path):
    """A zip bomb is refused from its headers: nothing is inflated."""
    path = str(tmp_path / "bomb.keras")
    _zip_bomb(path)
    assert os.path.getsize(path) < 2 << 20
    report = analyse_path(path)
    assert "zip bomb" in report.error
