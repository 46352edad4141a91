"""A full scan takes the first-pass statistics of each refined kernel from the
refinement's read of it (scan._read_kernel): the tensor reports must be exactly those
of a scan that reads every kernel on its own (the refinement switched off)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bnexporter import scan
from bnexporter.detection.analysis import Thresholds
from bnexporter.scan import ScanOptions, analyse_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("name", ["keras/k3_small.keras", "keras/mnv2_s450_inj.keras",
                                  "torch/mobilenet_ddp.pt", "torch/mobilenet_bf16.pt"])
def test_kernel_statistics_are_those_of_a_separate_read(name, monkeypatch):
    path = str(FIXTURES / name)
    taken: list[str] = []
    real = scan._read_kernel

    def spy(reader, kernel, buffer, scans):
        out = real(reader, kernel, buffer, scans)
        if scans is not None and kernel in scans.out:
            taken.append(kernel)
        return out

    monkeypatch.setattr(scan, "_read_kernel", spy)
    shared = analyse_path(path, ScanOptions())
    alone = analyse_path(path, ScanOptions(
        thresholds=dataclasses.replace(Thresholds(), refine=False)))
    assert shared.error is None and alone.error is None
    assert [dataclasses.asdict(t) for t in shared.tensors] == \
        [dataclasses.asdict(t) for t in alone.tensors]
    if "bf16" not in name:  # float32 kernels are read once, by the refinement
        assert taken
