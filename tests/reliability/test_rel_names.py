"""Issue 13.1: names that are not UTF-8 (folder, file, tensor) never take an answer down.

Real daemon, real folders with Latin-1 bytes in their names, loopback HTTP: /metrics and
/ answer 200 for every model throughout, the odd names are shown as ``\\xNN`` (names.py),
nothing lasts after the file is gone, and with ``shard: I/2`` the planner survives such a
folder and keeps discovering later ones.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.rel_support import base_config, bn_tensors, safetensors_bytes, shared_dir
from tests.support.daemon import DaemonProcess, Scrape

pytestmark = pytest.mark.skipif(os.name != "posix", reason="byte file names")


def _ckpt(layers: list[str], seed: int = 0) -> bytes:
    return safetensors_bytes(bn_tensors(layers, seed=seed))


def _all_ok(d: DaemonProcess) -> Scrape:
    status, body, _ = d.request("/")
    assert status == 200, body[:300]
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        status, body, _ = d.request("/metrics", headers={"Accept": accept} if accept else {})
        assert status == 200, body[:300]
    return d.scrape()


@pytest.fixture
def base():
    path = shared_dir("bnexporter-names-")
    yield path
    shutil.rmtree(os.fsencode(path), ignore_errors=True)


def test_names_that_are_not_utf8(base: Path, tmp_path: Path):
    root = os.fsencode(base)
    bad_folder = os.path.join(root, b"caf\xe9")
    os.mkdir(bad_folder)
    (base / "good").mkdir()
    (base / "weird").mkdir()
    (base / "good" / "ckpt-1.safetensors").write_bytes(_ckpt(["bn1"]))
    # a checkpoint whose name has a Latin-1 byte, newest in its folder
    bad_file = os.path.join(root, b"good", b"ckpt-2-\xe9t\xe9.safetensors")
    with open(bad_file, "wb") as fh:
        fh.write(_ckpt(["bn1", "bn2"], seed=1))
    with open(os.path.join(bad_folder, b"ckpt-1.safetensors"), "wb") as fh:
        fh.write(_ckpt(["bn1"], seed=2))
    # a tensor name holding a lone surrogate (JSON "\ud800"): the layer name has it too
    tensors = bn_tensors(["bn\ud800x"], seed=3)
    (base / "weird" / "ckpt-1.safetensors").write_bytes(safetensors_bytes(tensors))

    cfg = base_config(models=[{"path": str(base) + "/{model}"}])
    d = DaemonProcess(tmp_path, cfg, check_metrics=True).start()
    try:
        s = d.wait_for(lambda s: {"good", "weird", "caf\\xe9"} <= s.models()
                       and s.get("bnexporter_model_bn_layers", model="good") == 2
                       and s.get("bnexporter_model_bn_layers", model="weird") == 1
                       and s.get("bnexporter_model_bn_layers", model="caf\\xe9") == 1,
                       "every model analysed", timeout=30)
        s = _all_ok(d)
        status, _, _ = d.request("/api/v1/models")  # the paths are there (issue 14)
        assert status == 200
        layers = {lbl["layer"] for lbl in s.series("bnexporter_layer_channels")
                  if lbl["model"] == "weird"}
        assert layers == {"bn\\ud800x"}
        _, page, _ = d.request("/")
        assert b"caf\\xe9" in page
        # the odd file goes: the older one is exported again, nothing odd lingers
        os.unlink(bad_file)
        s = d.wait_for(lambda s: s.get("bnexporter_model_bn_layers", model="good") == 1,
                       "fallback to the remaining checkpoint", timeout=20)
        _all_ok(d)
        # a folder name with a byte that is not UTF-8, created while running
        os.mkdir(os.path.join(root, b"late\xff"))
        with open(os.path.join(root, b"late\xff", b"ckpt-5.safetensors"), "wb") as fh:
            fh.write(_ckpt(["a", "b", "c"]))
        d.wait_for(lambda s: s.get("bnexporter_model_bn_layers", model="late\\xff") == 3,
                   "late odd folder", timeout=20)
        _all_ok(d)
        log = d.log()
        assert "Traceback" not in log and "internal error" not in log, log[-3000:]
        assert "\udce9" not in log
    finally:
        assert d.stop() == 0


def test_sharded_planner_survives_odd_folder_names(base: Path, tmp_path: Path):
    root = os.fsencode(base)
    names = [b"caf\xe9", b"na\xefve", b"m\xff", b"plain-1", b"plain-2", b"plain-3"]
    for raw in names:
        os.mkdir(os.path.join(root, raw))
        with open(os.path.join(root, raw, b"ckpt-1.safetensors"), "wb") as fh:
            fh.write(_ckpt(["bn1"]))
    daemons = [DaemonProcess(tmp_path, base_config(models=[{"path": str(base) + "/{model}"}],
                                                   shard=f"{i}/2")).start() for i in (0, 1)]
    try:
        want = {n.decode("utf-8", "backslashreplace") for n in names}  # the names.py rule

        def union() -> set[str]:
            out: set[str] = set()
            for d in daemons:
                s = _all_ok(d)
                out |= {m for m in s.models()
                        if (s.get("bnexporter_model_bn_layers", model=m) or 0) >= 1}
            return out

        end = time.monotonic() + 30
        while union() != want and time.monotonic() < end:
            time.sleep(0.2)
        assert union() == want
        # discovery keeps working after the odd folders (the planner thread is alive)
        for i in range(4):
            late = os.path.join(root, b"later-%d-\xe0" % i)
            os.mkdir(late)
            with open(os.path.join(late, b"ckpt-1.safetensors"), "wb") as fh:
                fh.write(_ckpt(["x", "y"], seed=i))
        want |= {f"later-{i}-\\xe0" for i in range(4)}
        end = time.monotonic() + 30
        while union() != want and time.monotonic() < end:
            time.sleep(0.2)
        assert union() == want
        for d in daemons:
            assert "Traceback" not in d.log(), d.log()[-3000:]
    finally:
        for d in daemons:
            assert d.stop() == 0


def test_names_module_rule():
    from bnexporter.daemon.names import clean, clean_tree, encode

    assert clean("caf\udce9") == "caf\\xe9"
    assert clean("bn\ud800x") == "bn\\ud800x"
    assert clean("plain é") == "plain é"
    s = "x"
    assert clean(s) is s
    assert encode("a\udcff") == b"a\\xff"
    obj = {"k\udce9": ["v\udce9", 1], "n": np.int64(1)}
    assert clean_tree(obj)["k\\xe9"][0] == "v\\xe9"
