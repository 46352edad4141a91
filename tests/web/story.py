"""A short series of the demo's dying MobileNetV2, analysed once per test session."""

from __future__ import annotations

import os
from dataclasses import replace

from bnexporter.daemon.demo import write_story_checkpoint
from bnexporter.daemon.history import History
from bnexporter.detection.analysis import Thresholds
from bnexporter.report import CheckpointReport
from bnexporter.scan import ScanOptions, analyse_path

STEPS = (6_000, 8_800, 9_200, 9_600, 13_000, 18_000, 22_000)


def series(folder: str) -> tuple[list[CheckpointReport], History]:
    opts = ScanOptions(thresholds=replace(Thresholds(), refine=False))
    reports, history = [], History()
    for i, step in enumerate(STEPS):
        path = os.path.join(folder, f"ckpt-{step}.h5")
        write_story_checkpoint(path, step)
        os.utime(path, (1_700_000_000 + 60 * i,) * 2)
        r = analyse_path(path, opts)
        assert r.ok, r.error
        reports.append(r)
        history = history.add(r, r.mtime or 0.0)
    return reports, history
