"""The daemon's warm start for the distilled census (detection/warm.py, measured.py)."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from bnexporter.detection import warm
from bnexporter.errors import CheckpointError
from bnexporter.scan import ScanOptions, analyse_path

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def test_model_names_get_their_own_file_inside_the_cache(tmp_path):
    cache = str(tmp_path)
    names = ["a/b", "a_b", "../../etc/passwd", "ü", "x" * 500]
    paths = [warm.path_for(cache, n) for n in names]
    assert len(set(paths)) == len(names)
    for p in paths:
        assert os.path.dirname(p) == cache
        assert len(os.path.basename(p)) < 120


def test_round_trip_and_missing_file(tmp_path):
    path = warm.path_for(str(tmp_path / "c"), "job")
    assert warm.load(path, (4, 4, 3)) is None  # creates the private directory
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o700
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)
    assert warm.save(path, x, 0.125) is None
    got, loss = warm.load(path, (4, 4, 3))
    np.testing.assert_array_equal(got, x)
    assert loss == 0.125
    assert not [f for f in os.listdir(tmp_path / "c") if f.startswith(".warm-")]


def test_a_directory_others_can_write_is_refused(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    path = warm.path_for(str(folder), "job")
    with pytest.raises(CheckpointError, match="writable by others"):
        warm.load(path, None)
    assert "writable by others" in (warm.save(path, np.zeros((1, 2), np.float32), 0.0) or "")
    assert not os.listdir(folder)


@pytest.mark.parametrize("content,match", [
    (b"PK\x03\x04 not really a zip", "corrupt"),
    (b"garbage", "neither"),
])
def test_a_broken_file_is_an_error_not_a_crash(tmp_path, content, match):
    path = warm.path_for(str(tmp_path / "c"), "job")
    os.makedirs(os.path.dirname(path), mode=0o700)
    with open(path, "wb") as fh:
        fh.write(content)
    with pytest.raises(CheckpointError, match=match):
        warm.load(path, (4, 4, 3))


def test_kept_inputs_of_another_shape_are_refused(tmp_path):
    path = warm.path_for(str(tmp_path / "c"), "job")
    assert warm.save(path, np.zeros((2, 5, 5, 3), np.float32), 0.1) is None
    with pytest.raises(CheckpointError, match="does not match the model input"):
        warm.load(path, (4, 4, 3))


@pytest.fixture
def short_distillation(monkeypatch):
    """40 steps from noise, 10 from kept inputs: the paths, not the optimum, are tested."""
    from bnexporter.detection import distill

    monkeypatch.setattr(distill, "DEFAULT_ITERS", 40)
    monkeypatch.setattr(distill, "DEFAULT_WARM_ITERS", 10)


def test_second_checkpoint_starts_warm_from_the_first(tmp_path, short_distillation):
    """A budget too short for a cold start: the first checkpoint keeps the estimate (no
    verdict from half-optimised inputs) and the second continues from its inputs."""
    small = os.path.join(FIX, "keras", "k3_small.keras")
    path = warm.path_for(str(tmp_path / "cache"), "k3")
    opts = ScanOptions(bn_only=True, distill=True, census_seconds=0.3, distill_warm=path)
    first = analyse_path(small, opts)
    note = next(n for n in first.notes if n.startswith("distilled census:"))
    assert "(cold)" in note and "time budget reached" in note, first.notes
    assert any("the estimate decides (the next checkpoint continues" in n
               for n in first.notes), first.notes
    assert {layer.evidence for layer in first.bn_layers} == {"estimate"}
    opts = replace(opts, census_seconds=60)
    x1, loss1 = warm.load(path, None)
    second = analyse_path(small, opts)
    note = next(n for n in second.notes if n.startswith("distilled census:"))
    assert "(warm)" in note, second.notes
    x2, loss2 = warm.load(path, None)
    assert x2.shape == x1.shape and not np.array_equal(x1, x2)
    assert loss2 <= max(4 * loss1, 0.05)
    assert {layer.evidence for layer in second.bn_layers} == {"census:distilled"}


def test_an_unusable_cache_falls_back_to_a_cold_start(tmp_path, short_distillation):
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    small = os.path.join(FIX, "keras", "k3_small.keras")
    report = analyse_path(small, ScanOptions(bn_only=True, distill=True, census_seconds=60,
                                             distill_warm=warm.path_for(str(folder), "k3")))
    notes = [n for n in report.notes if n.startswith("distilled census:")]
    assert any("warm start refused" in n and "starting from noise" in n for n in notes), notes
    assert any("(cold)" in n for n in notes)
    assert any("not kept" in n for n in notes)
    assert {layer.evidence for layer in report.bn_layers} == {"census:distilled"}
