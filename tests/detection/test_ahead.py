"""The full scan's second thread (detection/ahead.py): the same reports as one thread,
never more than one extra thread, only positional-read tensors in it, and its errors
reported like the main thread's."""

from __future__ import annotations

import dataclasses
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bnexporter import scan
from bnexporter.detection import ahead as scan_threads
from bnexporter.errors import CheckpointError
from bnexporter.scan import ScanOptions, analyse_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FILES = ["keras/k2_resnet_s400.h5", "keras/k3_small.keras", "keras/k3_small_bf16.keras",
         "torch/mobilenet_ddp.pt", "torch/mobilenet_bf16.pt", "torch/mobilenet_legacy.pt"]


def _same(a, b) -> None:
    assert a.error is None and b.error is None
    assert [dataclasses.asdict(t) for t in a.tensors] == [dataclasses.asdict(t) for t in b.tensors]
    assert [dataclasses.asdict(x) for x in a.bn_layers] == \
        [dataclasses.asdict(x) for x in b.bn_layers]
    assert a.summary == b.summary


@pytest.mark.parametrize("name", FILES)
def test_two_threads_give_the_reports_of_one(name):
    path = str(FIXTURES / name)
    one = analyse_path(path, ScanOptions(threads=1, census_enabled=False))
    two = analyse_path(path, ScanOptions(threads=2, census_enabled=False))
    _same(one, two)


def test_at_most_one_extra_thread_and_only_positional_reads(monkeypatch):
    path = str(FIXTURES / "torch/mobilenet_ddp.pt")
    started: list[str] = []
    real_start = threading.Thread.start

    def start(self):
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    where: dict[str, str] = {}
    real_scan = scan._scan_tensor

    def spy(reader, info, *a, **k):
        where[info.name] = threading.current_thread().name
        if threading.current_thread().name == "bnexporter-scan":
            assert reader.raw_extent(info.name) is not None
        return real_scan(reader, info, *a, **k)

    monkeypatch.setattr(scan, "_scan_tensor", spy)
    report = analyse_path(path, ScanOptions(threads=8, census_enabled=False))
    assert report.error is None
    assert started == ["bnexporter-scan"]
    assert "bnexporter-scan" in where.values()
    assert set(where) == {t.name for t in report.tensors}


def test_one_thread_starts_none(monkeypatch):
    started: list[str] = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name))
    for bn_only, threads in ((False, 1), (True, 2)):
        r = analyse_path(str(FIXTURES / "keras/k3_small.keras"),
                         ScanOptions(threads=threads, bn_only=bn_only, census_enabled=False))
        assert r.error is None
    assert started == []


def test_an_error_in_the_thread_is_the_reports_error(monkeypatch):
    path = str(FIXTURES / "torch/mobilenet_ddp.pt")
    real_scan = scan._scan_tensor

    def broken(reader, info, *a, **k):
        if threading.current_thread().name == "bnexporter-scan":
            raise CheckpointError(path, "file shrank while being read", "truncated", True)
        return real_scan(reader, info, *a, **k)

    monkeypatch.setattr(scan, "_scan_tensor", broken)
    r = analyse_path(path, ScanOptions(threads=2, census_enabled=False))
    assert r.error is not None and "shrank" in r.error


def test_an_error_in_the_main_thread_waits_for_the_thread(monkeypatch):
    path = str(FIXTURES / "torch/mobilenet_ddp.pt")
    alive: list[bool] = []
    real_layer = scan._analyse_layer

    def broken(*a, **k):
        raise CheckpointError(path, "cannot read a BN vector", "truncated", True)

    real_exit = scan_threads.Ahead.__exit__

    def exit_(self, *exc):
        real_exit(self, *exc)
        alive.append(self._thread is not None)

    monkeypatch.setattr(scan, "_analyse_layer", broken)
    monkeypatch.setattr(scan_threads.Ahead, "__exit__", exit_)
    r = analyse_path(path, ScanOptions(threads=2, census_enabled=False))
    assert r.error is not None and "BN vector" in r.error
    assert alive == [False]
    monkeypatch.setattr(scan, "_analyse_layer", real_layer)


def test_deflated_npz_members_stay_in_the_main_thread(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    arrays = {f"layer{i}.weight": rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
              for i in range(6)}
    arrays["layer0.weight"][2] = 0.0
    stored, deflated = tmp_path / "s.npz", tmp_path / "d.npz"
    np.savez(stored, **arrays)
    np.savez_compressed(deflated, **arrays)
    assert zipfile.ZipFile(deflated).infolist()[0].compress_type == zipfile.ZIP_DEFLATED
    where: dict[str, str] = {}
    real_scan = scan._scan_tensor

    def spy(reader, info, *a, **k):
        where[info.name] = threading.current_thread().name
        return real_scan(reader, info, *a, **k)

    monkeypatch.setattr(scan, "_scan_tensor", spy)
    for path in (stored, deflated):
        one = analyse_path(str(path), ScanOptions(threads=1, census_enabled=False))
        where.clear()
        two = analyse_path(str(path), ScanOptions(threads=2, census_enabled=False))
        _same(one, two)
        if path == deflated:
            assert set(where.values()) == {"MainThread"}
        else:
            assert "bnexporter-scan" in where.values()


@pytest.mark.parametrize("value,expected", [(None, 1), ("2", 2), ("0", 1), ("x", 1),
                                            ("-3", 1), ("4", 4)])
def test_threads_from_the_environment(monkeypatch, caplog, value, expected):
    if value is None:
        monkeypatch.delenv(scan_threads.ENV, raising=False)
    else:
        monkeypatch.setenv(scan_threads.ENV, value)
    monkeypatch.setattr(scan_threads, "_WARNED", set())
    with caplog.at_level("WARNING", logger="bnexporter"):
        assert scan_threads.configured_threads() == expected
        assert ScanOptions().threads == expected
    warned = [r.getMessage() for r in caplog.records if scan_threads.ENV in r.getMessage()]
    if value in ("0", "x", "-3"):
        assert len(warned) == 1 and repr(value) in warned[0]  # once, naming the value
    else:
        assert not warned
