"""The real daemon as a subprocess, on real folders, over real HTTP.

One daemon (module fixture) watches an inotify root, a polled root and a static
folder; each test works in its own model folder so the tests stay independent.
Every scrape is parsed with prometheus_client's parser and each distinct one is
checked with ``promtool check metrics`` (see tests.support.daemon.DaemonProcess.scrape).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from bnexporter.daemon.demo import checkpoint_bytes, write_checkpoint
from bnexporter.daemon.web.collector import has_finding
from bnexporter.scan import analyse_path
from tests.support.daemon import DaemonProcess, Scrape, write_slowly

SETTLE = 0.4


def _config(base: Path, extra_models: list[dict] | None = None) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "log_level": "debug",
        "poll_interval": 0.3,
        "rescan_interval": 3,
        "settle_seconds": SETTLE,
        "analysis_timeout": 60,
        "retry": {"initial_delay": 0.2, "max_delay": 0.5, "give_up_after": 3,
                  "max_attempts": 20},
        "models": [
            {"path": str(base / "jobs" / "{model}"), "watch": "inotify"},
            {"path": str(base / "polled" / "{model}"), "watch": "poll"},
            {"name": "static1", "path": str(base / "static1")},
            *(extra_models or []),
        ],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("e2e")
    for sub in ("jobs", "polled", "static1", "extra"):
        (base / sub).mkdir()
    # a model that exists before the daemon starts: newest by step, not by mtime
    pre = base / "jobs" / "pre"
    pre.mkdir()
    for step in (300, 100, 200):  # ckpt-200 gets the newest mtime
        write_checkpoint(str(pre / f"ckpt-{step}.h5"), step)
        time.sleep(0.02)
    write_checkpoint(str(base / "static1" / "ckpt-100.h5"), 100)
    cfg = base / "config.yaml"
    cfg.write_text(yaml.safe_dump(_config(base)))
    d = DaemonProcess(base, args=["--config", str(cfg)], env={"BNEXPORTER_TEST_HOOKS": "1"},
                      check_metrics=True)
    d.start()
    yield base, cfg, d
    rc = d.stop()
    assert rc == 0, d.log()


def _step(s: Scrape, model: str) -> float | None:
    return s.get("bnexporter_model_checkpoint_step", model=model)


def _expect_matches_scan(s: Scrape, model: str, path: Path) -> None:
    ref = analyse_path(str(path))
    assert ref.ok
    assert s.get("bnexporter_model_dead_channels", model=model) == ref.summary.dead
    assert s.get("bnexporter_model_near_dead_channels", model=model) == ref.summary.near_dead
    for layer in ref.bn_layers:  # under a {model} root only layers with findings (auto)
        got = s.get("bnexporter_layer_dead_channels", model=model, layer=layer.name)
        assert got == len(layer.dead) or (got is None and not has_finding(layer)), layer.name
    assert s.get("bnexporter_model_checkpoint_info", model=model, format=ref.format) == 1
    # no label changes per checkpoint: the path is in /api/v1/models (_info_path), not here
    assert not any("path" in x for x in s.series("bnexporter_model_checkpoint_info"))


def test_startup_analyses_newest_by_step(env):
    base, _, d = env
    s = d.wait_for(lambda s: _step(s, "pre") == 300, "pre at step 300")
    _expect_matches_scan(s, "pre", base / "jobs" / "pre" / "ckpt-300.h5")
    assert s.get("bnexporter_model_up", model="pre") == 1
    assert s.get("bnexporter_watcher_polling", root=str(base / "polled")) == 1
    assert s.get("bnexporter_watcher_polling", root=str(base / "jobs")) == 0
    assert s.types["bnexporter_analyses"] == "counter"
    status, page = d.text("/")
    assert status == 200 and "pre" in page and "<svg" in page
    assert d.text("/healthz")[0] == 200
    # a client that only takes OpenMetrics gets it from prometheus_client itself
    status, om = d.text("/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
    assert status == 200 and om.endswith("# EOF\n")
    assert "application/openmetrics-text" in d.last_headers["Content-Type"]
    names = {f.name for f in text_string_to_metric_families(om)}
    assert "bnexporter_model_dead_channels" in names
    # Prometheus's own Accept header (text accepted too) and gzip: the cached text path
    req = urllib.request.Request(d.url + "metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
                  "text/plain;version=0.0.4;q=0.3,*/*;q=0.2", "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = gzip.decompress(resp.read()).decode()
    assert Scrape(text).get("bnexporter_model_checkpoint_step", model="pre") == 300


@pytest.mark.parametrize("root", ["jobs", "polled"])
def test_slow_in_place_write_is_analysed_once_complete(env, root):
    base, _, d = env
    folder = base / root / f"slow-{root}"
    folder.mkdir()
    d.wait_for(lambda s: f"slow-{root}" in s.models(), "model discovered")
    before = d.scrape().get("bnexporter_analyses_total", outcome="error")
    path = folder / "ckpt-500.h5"
    write_slowly(path, checkpoint_bytes(500))
    s = d.wait_for(lambda s: _step(s, f"slow-{root}") == 500, "slow checkpoint analysed")
    _expect_matches_scan(s, f"slow-{root}", path)
    assert s.get("bnexporter_analyses_total", outcome="error") == before
    assert s.get("bnexporter_model_up", model=f"slow-{root}") == 1


def test_fast_arrivals_under_polling_are_not_starved(env):
    """Checkpoints arriving faster than poll + settle: the newest *complete* one is
    exported meanwhile, and the last one once the stream stops."""
    base, _, d = env
    folder = base / "polled" / "burst"
    folder.mkdir()
    errors = d.wait_for(lambda s: "burst" in s.models(), "model discovered").get(
        "bnexporter_analyses_total", outcome="error")
    seen: set[float] = set()
    for step in range(100, 2100, 100):  # 20 checkpoints, one every 0.15 s
        write_checkpoint(str(folder / f"ckpt-{step}.h5"), step)
        time.sleep(0.15)
        value = _step(d.scrape(), "burst")
        if value is not None:
            seen.add(value)
    assert seen and max(seen) < 2000, seen  # something was exported during the burst
    s = d.wait_for(lambda s: _step(s, "burst") == 2000, "the last checkpoint")
    assert s.get("bnexporter_analyses_total", outcome="error") == errors


TF = Path(__file__).resolve().parents[1] / "fixtures" / "tf"


def _info_path(d: DaemonProcess, model: str) -> str | None:
    """The exported checkpoint's path, from GET /api/v1/models."""
    status, body, _ = d.request("/api/v1/models")
    assert status == 200, body
    for m in json.loads(body)["models"]:
        if m["name"] == model and m["checkpoint"]:
            return m["checkpoint"]["path"]
    return None


def test_tf_bundle_is_analysed_as_one_unit_when_announced(env):
    """TF CheckpointManager order: shards, then .index, then the `checkpoint` state file."""
    base, _, d = env
    folder = base / "jobs" / "tfrun"
    folder.mkdir()
    d.wait_for(lambda s: "tfrun" in s.models(), "model discovered")
    src = TF / "k3_manager"
    for name in ("ckpt-1.data-00000-of-00001", "ckpt-1.index"):
        shutil.copy(src / name, folder / name)
    (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')

    def index(n: int) -> str:
        return str(folder / f"ckpt-{n}.index")

    d.wait_for(lambda s: _info_path(d, "tfrun") == index(1), "ckpt-1 analysed")
    s = d.scrape()  # the predicate read /api/v1/models after the scrape it was given
    _expect_matches_scan(s, "tfrun", folder / "ckpt-1.index")
    assert _step(s, "tfrun") == analyse_path(index(1)).step  # the step the file records
    # ckpt-2 written but not announced yet: still ckpt-1
    for name in ("ckpt-2.data-00000-of-00001", "ckpt-2.index"):
        shutil.copy(src / name, folder / name)
    time.sleep(SETTLE * 3)
    assert _info_path(d, "tfrun") == index(1)
    (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n')
    d.wait_for(lambda s: _info_path(d, "tfrun") == index(2), "ckpt-2 analysed once announced")
    # a sharded save announced before its last shard exists is not analysed until it does
    sharded = TF / "k3_sharded"
    shards = sorted(sharded.glob("ckpt-3.data-*"))
    for f in [*shards[:-1], sharded / "ckpt-3.index"]:
        shutil.copy(f, folder / f.name)
    (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\n')
    time.sleep(SETTLE * 3)
    s = d.scrape()
    assert _info_path(d, "tfrun") == index(2)
    assert s.get("bnexporter_model_up", model="tfrun") == 1
    shutil.copy(shards[-1], folder / shards[-1].name)
    d.wait_for(lambda s: _info_path(d, "tfrun") == index(3), "sharded ckpt-3 once complete")
    s = d.scrape()
    _expect_matches_scan(s, "tfrun", folder / "ckpt-3.index")


def test_renamed_into_place(env):
    base, _, d = env
    folder = base / "jobs" / "renamed"
    folder.mkdir()
    d.wait_for(lambda s: "renamed" in s.models(), "model discovered")
    tmp = folder / ".ckpt-700.h5.tmp"
    tmp.write_bytes(checkpoint_bytes(700))
    time.sleep(SETTLE * 2)
    s = d.scrape()
    assert _step(s, "renamed") is None  # temporary files are never analysed
    os.rename(tmp, folder / "ckpt-700.h5")
    s = d.wait_for(lambda s: _step(s, "renamed") == 700, "renamed checkpoint analysed")
    _expect_matches_scan(s, "renamed", folder / "ckpt-700.h5")


def test_truncated_then_completed(env):
    base, _, d = env
    folder = base / "jobs" / "trunc"
    folder.mkdir()
    d.wait_for(lambda s: "trunc" in s.models(), "model discovered")
    first = d.scrape()
    data = checkpoint_bytes(900)
    path = folder / "ckpt-900.h5"
    path.write_bytes(data[: len(data) // 2])
    d.wait_for(lambda s: (s.get("bnexporter_analyses_total", outcome="retry") or 0)
               > (first.get("bnexporter_analyses_total", outcome="retry") or 0),
               "a retry of the truncated file")
    assert _step(d.scrape(), "trunc") is None
    path.write_bytes(data)
    s = d.wait_for(lambda s: _step(s, "trunc") == 900, "completed checkpoint analysed")
    _expect_matches_scan(s, "trunc", path)
    assert s.get("bnexporter_analyses_total", outcome="error") == \
        first.get("bnexporter_analyses_total", outcome="error")
    assert s.get("bnexporter_model_up", model="trunc") == 1
    assert not s.series("bnexporter_model_checkpoint_errors_total") or all(
        x["model"] != "trunc" for x in s.series("bnexporter_model_checkpoint_errors_total"))


def test_never_readable_is_reported_once_and_old_results_stay(env):
    base, _, d = env
    folder = base / "jobs" / "broken"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-1000.h5"), 1000)
    s0 = d.wait_for(lambda s: _step(s, "broken") == 1000, "good checkpoint first")
    dead_before = s0.get("bnexporter_model_dead_channels", model="broken")
    errors_before = s0.get("bnexporter_errors_total", reason="truncated")
    data = checkpoint_bytes(1100)
    (folder / "ckpt-1100.h5").write_bytes(data[: len(data) // 3])
    s = d.wait_for(lambda s: s.get("bnexporter_model_up", model="broken") == 0,
                   "model_up 0 after giving up", timeout=12)
    assert s.get("bnexporter_errors_total", reason="truncated") == errors_before + 1
    assert s.get("bnexporter_model_checkpoint_errors_total", model="broken",
                 reason="truncated") == 1
    assert _step(s, "broken") == 1000  # previous good results stay exported
    assert s.get("bnexporter_model_dead_channels", model="broken") == dead_before
    time.sleep(1.5)  # rescans and events must not count the same file again
    s = d.scrape()
    assert s.get("bnexporter_errors_total", reason="truncated") == errors_before + 1
    assert d.log().count("giving up on " + str(folder / "ckpt-1100.h5")) == 1
    # a newer good checkpoint brings the model back up
    write_checkpoint(str(folder / "ckpt-1200.h5"), 1200)
    s = d.wait_for(lambda s: _step(s, "broken") == 1200, "recovery")
    assert s.get("bnexporter_model_up", model="broken") == 1


def test_older_checkpoint_never_replaces_newer(env):
    base, _, d = env
    folder = base / "jobs" / "order"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-2000.h5"), 2000)
    s = d.wait_for(lambda s: _step(s, "order") == 2000, "ckpt-2000")
    analysed = s.get("bnexporter_model_last_analysis_timestamp_seconds", model="order")
    write_checkpoint(str(folder / "ckpt-1500.h5"), 1500)  # later mtime, lower step
    time.sleep(SETTLE * 3)
    s = d.scrape()
    assert _step(s, "order") == 2000
    assert s.get("bnexporter_model_last_analysis_timestamp_seconds", model="order") == analysed


def test_new_and_deleted_model_folders(env):
    base, _, d = env
    folder = base / "jobs" / "appears"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-100.h5"), 100)
    s = d.wait_for(lambda s: _step(s, "appears") == 100, "new model folder analysed")
    watched = s.get("bnexporter_models_watched")
    shutil.rmtree(folder)
    s = d.wait_for(lambda s: "appears" not in s.models(), "series of a deleted folder gone")
    assert not any(lbl.get("model") == "appears" for (_, lbls) in s.samples
                   for lbl in [dict(lbls)])
    assert s.get("bnexporter_models_watched") == watched - 1


def test_reload_by_sighup_and_post(env):
    base, cfg, d = env
    extra = base / "extra"
    write_checkpoint(str(extra / "ckpt-400.h5"), 400)
    cfg.write_text(yaml.safe_dump(_config(base, [{"name": "extra", "path": str(extra)}])))
    d.send(signal.SIGHUP)
    d.wait_for(lambda s: _step(s, "extra") == 400, "model added by SIGHUP")
    cfg.write_text("models: [\n")  # broken file: reload refused, old config kept
    status, body = d.text("/-/reload", "POST")
    assert status == 500 and "invalid YAML" in body
    assert d.text("/-/reload")[0] == 405
    assert _step(d.scrape(), "extra") == 400
    cfg.write_text(yaml.safe_dump(_config(base)))
    status, body = d.text("/-/reload", "POST")
    assert status == 200, body
    s = d.wait_for(lambda s: "extra" not in s.models(), "model removed by POST /-/reload")
    assert _step(s, "pre") == 300  # the others are untouched


def test_dead_observer_is_restarted_and_counted(env):
    base, _, d = env
    s0 = d.scrape()
    restarts = s0.get("bnexporter_watcher_restarts_total")
    status, body = d.text("/-/test/crash-watcher", "POST")
    assert status == 200 and str(base / "jobs") in body
    crashed = len(body.split())
    s = d.wait_for(lambda s: s.get("bnexporter_watcher_restarts_total") == restarts + crashed,
                   "watcher restarts counted")
    assert all(v == 1 for (n, _), v in s.samples.items() if n == "bnexporter_watcher_up")
    assert d.text("/healthz")[0] == 200
    assert "watcher thread died" in d.log()
    # the restarted watcher still sees new checkpoints
    folder = base / "jobs" / "after-restart"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-100.h5"), 100)
    d.wait_for(lambda s: _step(s, "after-restart") == 100, "checkpoint after restart")


def test_flags_only_and_sigterm(tmp_path):
    folder = tmp_path / "run1"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-100.h5"), 100)
    d = DaemonProcess(tmp_path, args=["--watch", f"resnet={folder}", "--listen", "127.0.0.1:0",
                                      "--poll-interval", "0.2", "--bn-only"],
                      check_metrics=True).start()
    try:
        s = d.wait_for(lambda s: _step(s, "resnet") == 100, "flags-only daemon serves")
        assert s.get("bnexporter_model_bn_layers", model="resnet") == 4
        assert s.get("bnexporter_models_watched") == 1
    finally:
        t0 = time.monotonic()
        rc = d.stop()
    assert rc == 0, d.log()
    assert time.monotonic() - t0 < 5


def test_timeout_and_sigterm_mid_analysis(tmp_path):
    folder = tmp_path / "slowmodel"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-100.h5"), 100)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "analysis_timeout": 1,
                                   "settle_seconds": 0.2,
                                   "models": [{"name": "slow", "path": str(folder)}]}))
    d = DaemonProcess(tmp_path, args=["--config", str(cfg)], check_metrics=True,
                      env={"BNEXPORTER_TEST_HOOKS": "1", "BNEXPORTER_TEST_ANALYSIS_DELAY": "30"})
    d.start()
    try:
        s = d.wait_for(lambda s: s.get("bnexporter_errors_total", reason="timeout") == 1,
                       "analysis timed out", timeout=10)
        assert s.get("bnexporter_model_up", model="slow") == 0
        assert s.get("bnexporter_model_checkpoint_errors_total", model="slow",
                     reason="timeout") == 1
        write_checkpoint(str(folder / "ckpt-200.h5"), 200)  # starts another 30 s analysis
        time.sleep(0.8)
        assert d.text("/healthz")[0] == 200
    finally:
        t0 = time.monotonic()
        rc = d.stop()
        took = time.monotonic() - t0
    assert rc == 0, d.log()
    assert took < 4, f"SIGTERM mid-analysis took {took:.1f} s"
