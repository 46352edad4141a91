"""A one-minute soak in CI (the full one is ``benchmarks/soak.py --minutes 10``):
20 runs, 3 checkpoints a second overall, old files deleted, a scrape a second.
After a 20 s warm-up the daemon must not gain file descriptors, threads or
child processes, and its RSS must stay flat."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.support.daemon import ROOT

pytestmark = pytest.mark.slow  # one minute


def _soak():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


def test_short_soak_has_no_leaks():
    soak = _soak()
    res = soak.run(minutes=1.0, models=20, rate=3.0, keep=3, sample=3.0, scrape_interval=1.0,
                   warmup=20.0, progress=False)
    s = res.summary
    print(f"\nshort soak: {res.written} written, {s['analyses']} analysed; RSS "
          f"{s['rss_after_warmup_mb']} -> {s['rss_end_mb']} MB; fds {s['fds_after_warmup']}"
          f" -> {s['fds_end']}; threads {s['threads_after_warmup']} -> {s['threads_end']}; "
          f"children {s['children_after_warmup']} -> {s['children_end']}; scrape "
          f"{res.scrape_ms}")
    assert res.exit_code == 0
    assert res.scrape_failures == 0 and res.scrapes >= 40
    assert s["errors"] == 0
    assert res.written >= 150 and s["analyses"] >= 0.8 * res.written
    assert res.models_exported == 20
    assert res.lag_steps["max"] <= soak.STEP  # at most one checkpoint behind at the end
    assert s["fds_end"] <= s["fds_after_warmup"] + 1
    assert s["fds_max"] <= s["fds_after_warmup"] + 4
    assert s["threads_end"] <= s["threads_after_warmup"] + 1
    # count analyses apart from the long-lived helpers: the total number of descendants
    # at one sampled moment depends on whether an analysis happened to be running then
    # (or had exited and was not reaped yet)
    assert s["helpers_end"] <= s["helpers_after_warmup"]
    assert s["analysis_procs_end"] <= 1  # workers: 1, so one analysis at a time
    assert s["rss_drift_mb"] <= 5.0
