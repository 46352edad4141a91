"""A real Prometheus scrapes the demo (a checkpoint a second): head series stay flat after
warm-up (issue 14). The 30-minute version: benchmarks/head_series.py --minutes 30."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
from deploy_support import PROMETHEUS, REPO

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _bench():
    spec = importlib.util.spec_from_file_location("head_series",
                                                  REPO / "benchmarks" / "head_series.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["head_series"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_head_series_flat_while_checkpoints_keep_coming():
    # .ci/run installs it: its absence is a broken setup, not a reason to pass
    assert os.access(PROMETHEUS, os.X_OK), f"{PROMETHEUS} missing (apt-get install prometheus)"
    run = _bench().measure(seconds=90, interval=0.5, scrape=1.0, warmup=30, every=5, log=False)
    rest = run.after_warmup()
    assert len(rest) >= 10, run.samples
    assert rest[-1][3] - rest[0][3] >= 20, run.samples  # checkpoints kept being analysed
    assert {s[1] for s in rest} == {rest[0][1]}, run.samples  # not one new series
