"""The census inside an analysis: sample given or dropped beside, verdicts labelled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bnexporter.scan import ScanOptions, analyse_path

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")
MNV2 = os.path.join(FIX, "keras", "mnv2_s150.h5")
SAMPLE = os.path.join(FIX, "census", "mnv2_s150.h5.inputs.npy")


def _score(report, truth_path):
    with open(truth_path) as fh:
        truth = {layer["name"]: layer for layer in json.load(fh)["layers"]}
    tp = fp = fn = 0
    for layer in report.bn_layers:
        tl = truth[layer.name]
        if tl["consumer"] not in ("relu", "relu6"):
            continue
        really = {i for i, a in enumerate(tl["active_fraction"]) if a == 0}
        tp += len(really & set(layer.dead))
        fp += len(set(layer.dead) - really)
        fn += len(really - set(layer.dead))
    return tp / (tp + fp), tp / (tp + fn)


def test_census_on_a_real_sample_finds_what_the_estimate_misses_early():
    est = analyse_path(MNV2, ScanOptions(bn_only=True))
    cen = analyse_path(MNV2, ScanOptions(bn_only=True, census=SAMPLE))
    assert {layer.evidence for layer in est.bn_layers} == {"estimate"}
    assert {layer.evidence for layer in cen.bn_layers} == {"census:sample"}
    assert cen.summary.census_layers == len(cen.bn_layers)
    _, r_est = _score(est, MNV2 + ".truth.json")
    p_cen, r_cen = _score(cen, MNV2 + ".truth.json")
    assert r_est < 0.8 and r_cen == 1.0  # 8 inputs: every truly dead channel
    assert p_cen >= 0.88  # a few rarely active channels look dead on 8 inputs
    assert cen.summary.estimate_disagreement > 0
    assert all(layer.census_positions and layer.census_positions >= 8 for layer in
               cen.bn_layers)


def test_a_sample_dropped_beside_the_checkpoint_is_used(tmp_path):
    shutil.copy(MNV2, tmp_path / "ckpt-150.h5")
    shutil.copy(SAMPLE, tmp_path / "bnexporter-census.npy")
    report = analyse_path(str(tmp_path / "ckpt-150.h5"), ScanOptions(bn_only=True))
    assert report.summary.census_layers == report.summary.bn_layers


def test_a_bad_sample_is_a_one_line_note_and_the_estimate_stands(tmp_path):
    bad = tmp_path / "s.npy"
    np.save(bad, np.full((4, 96, 96, 3), np.nan, np.float32))
    report = analyse_path(MNV2, ScanOptions(bn_only=True, census=str(bad)))
    assert report.error is None
    assert report.summary.census_layers == 0
    notes = [n for n in report.notes if n.startswith("census:")]
    assert notes and str(bad) in notes[0] and "\n" not in notes[0]
    wrong = tmp_path / "w.npy"
    np.save(wrong, np.zeros((4, 32, 32, 3), np.float32))
    report = analyse_path(MNV2, ScanOptions(bn_only=True, census=str(wrong)))
    assert report.summary.census_layers == 0 and any("census:" in n for n in report.notes)


def test_no_graph_no_census(tmp_path):
    path = os.path.join(FIX, "torch", "resnet_sd.pt")
    np.save(tmp_path / "s.npy", np.zeros((2, 3, 32, 32), np.float32))
    report = analyse_path(path, ScanOptions(bn_only=True, census=str(tmp_path / "s.npy")))
    assert report.summary.census_layers == 0
    assert any("census: no graph" in n for n in report.notes)


def test_scan_cli_census_flag(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bnexporter", "scan", "--json", "--bn-only",
                          "--census", SAMPLE, MNV2], capture_output=True, text=True,
                         timeout=120)
    doc = json.loads(out.stdout)["checkpoints"][0]
    assert {layer["evidence"] for layer in doc["bn_layers"]} == {"census:sample"}
    assert doc["summary"]["census_layers"] == 52


def test_distilled_census_is_opt_in_and_labelled(monkeypatch):
    from bnexporter.detection import distill

    monkeypatch.setattr(distill, "DEFAULT_ITERS", 40)  # the path, not the optimum
    small = os.path.join(FIX, "keras", "k3_small.keras")
    plain = analyse_path(small, ScanOptions(bn_only=True))
    assert {layer.evidence for layer in plain.bn_layers} == {"estimate"}
    report = analyse_path(small, ScanOptions(bn_only=True, distill=True, census_seconds=120))
    assert {layer.evidence for layer in report.bn_layers} == {"census:distilled"}
    assert any(n.startswith("distilled census:") for n in report.notes)


@pytest.mark.parametrize("argv,seconds", [([], 60.0), (["--distill"], 600.0),
                                          (["--distill", "--census-seconds", "30"], 30.0),
                                          (["--census-seconds", "5"], 5.0)])
def test_census_budget_of_a_one_shot_scan(argv, seconds):
    import argparse

    from bnexporter.scan_cli import add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    opts = options_from_args(p.parse_args(["x.h5", *argv]))
    assert opts.census_seconds == seconds
    assert opts.distill == ("--distill" in argv)


def test_census_budget_must_be_positive():
    import argparse

    from bnexporter.scan_cli import UsageError, add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    for bad in ("0", "-1", "nan"):
        with pytest.raises(UsageError, match="census-seconds"):
            options_from_args(p.parse_args(["x.h5", "--distill", "--census-seconds", bad]))
