"""End to end: bnexporter daemon + a real Prometheus with the shipped rules and dashboard.

Real checkpoints in which channels die are written into a watched folder; everything is
asserted through Prometheus's HTTP API. The latency from a checkpoint's completion (the
atomic rename) to the dead-fraction alert becoming pending is measured; set
BNEXPORTER_E2E_REPORT=path to also get the figures as JSON (docs/deploy.md quotes them);
BNEXPORTER_E2E_WATCH=poll measures the polling watcher that shared volumes need.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_ckpt import LayerState, ModelState, write_checkpoint
from deploy_support import (
    PROMETHEUS,
    PROMTOOL,
    REPO,
    RULES,
    dashboard_exprs,
    free_port,
    http_get,
    prom_query,
    scrape_value,
    substitute_grafana,
    wait_http,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRAPE_INTERVAL = 1.0
EVAL_INTERVAL = 1.0
SETTLE_SECONDS = 2.0   # the daemon default
POLL_INTERVAL = 0.5
WATCH_MODE = os.environ.get("BNEXPORTER_E2E_WATCH", "auto")
WAIT = 90.0   # generous: 2 shared cores, a process per analysis


@dataclass
class Stack:
    root: Path            # watched folder: one sub-folder per model
    exporter: str         # http://127.0.0.1:port
    prometheus: str
    figures: dict[str, Any] = field(default_factory=dict)


def _start(cmd: list[str], log: Path, **kw: Any) -> subprocess.Popen:
    """Start a process in its own session so teardown can stop its children too."""
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the process group of a process this test started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # leftovers (analysis workers) of the group
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=15)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("e2e")
    root = work / "checkpoints"
    root.mkdir()
    exporter_port, prom_port = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{exporter_port}",
        "watch": WATCH_MODE,
        "poll_interval": POLL_INTERVAL,
        "settle_seconds": SETTLE_SECONDS,
        "retry": {"initial_delay": 0.2, "max_delay": 0.5, "max_attempts": 2,
                  "give_up_after": 2},
        "models": [{"path": f"{root}/{{model}}"}],
    }
    (work / "bnexporter.yaml").write_text(yaml.safe_dump(config))
    prom_config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL:g}s",
                   "scrape_timeout": f"{SCRAPE_INTERVAL:g}s",
                   "evaluation_interval": f"{EVAL_INTERVAL:g}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "bnexporter",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(prom_config))

    procs: list[subprocess.Popen] = []
    logs = {"bnexporter": work / "bnexporter.log", "prometheus": work / "prometheus.log"}
    try:
        daemon = _start([sys.executable, "-m", "bnexporter", "run", "--config",
                         str(work / "bnexporter.yaml")], logs["bnexporter"], cwd=REPO,
                        env={**os.environ, "BNEXPORTER_TEST_HOOKS": "1"})
        procs.append(daemon)
        exporter = f"http://127.0.0.1:{exporter_port}"
        wait_http(f"{exporter}/healthz", WAIT, daemon)
        prom = _start([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                       f"--storage.tsdb.path={work / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{prom_port}",
                       "--log.level=warn"], logs["prometheus"], cwd=work)
        procs.append(prom)
        prometheus = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prometheus}/-/ready", WAIT, prom)
        s = Stack(root=root, exporter=exporter, prometheus=prometheus)
        s.figures.update(scrape_interval_s=SCRAPE_INTERVAL, evaluation_interval_s=EVAL_INTERVAL,
                         settle_seconds=SETTLE_SECONDS, watch=WATCH_MODE,
                         poll_interval_s=POLL_INTERVAL)
        yield s
        report = os.environ.get("BNEXPORTER_E2E_REPORT")
        if report:
            Path(report).write_text(json.dumps(s.figures, indent=2) + "\n")
        print("\ne2e figures:", json.dumps(s.figures))
    except BaseException:
        for name, log in logs.items():
            print(f"--- {name} log (tail) ---\n{_tail(log)}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            _stop_group(proc)
    for proc in procs:
        assert proc.poll() is not None


def _wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT,
              every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def _value(s: Stack, query: str) -> float | None:
    result = prom_query(s.prometheus, query)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def _alerts(s: Stack, name: str, model: str | None = None) -> list[dict]:
    _, body = http_get(f"{s.prometheus}/api/v1/alerts")
    return [a for a in json.loads(body)["data"]["alerts"]
            if a["labels"]["alertname"] == name
            and (model is None or a["labels"].get("model") == model)]


def _write(s: Stack, model: str, step: int, state: ModelState) -> float:
    """Write a checkpoint; return the monotonic time at which it became complete."""
    folder = s.root / model
    folder.mkdir(exist_ok=True)
    write_checkpoint(folder / f"ckpt-{step}.h5", state, seed=step)
    return time.monotonic()


def _step_seen(s: Stack, model: str, step: int) -> Callable[[], bool]:
    return lambda: _value(s, f'bnexporter_model_checkpoint_step{{model="{model}"}}') == step


def test_series_arrive_with_the_checkpoint_values(stack):
    alpha = ModelState([LayerState(near_dead=2), LayerState(near_dead=1)])
    _write(stack, "alpha", 100, alpha)
    _write(stack, "beta", 100, ModelState())
    _wait_for("alpha step 100 in Prometheus", _step_seen(stack, "alpha", 100))
    _wait_for("beta step 100 in Prometheus", _step_seen(stack, "beta", 100))

    def val(q: str) -> float | None:
        return _value(stack, q)

    assert val('bnexporter_model_channels{model="alpha"}') == 32
    assert val('bnexporter_model_bn_layers{model="alpha"}') == 2
    assert val('bnexporter_model_dead_ratio{model="alpha"}') == 0
    assert val('bnexporter_model_near_dead_channels{model="alpha"}') == 3
    assert math.isclose(val('bnexporter_model_near_dead_ratio{model="alpha"}'), 3 / 32)
    assert val('bnexporter_model_nonfinite_values{model="alpha"}') == 0
    assert val('bnexporter_model_up{model="alpha"}') == 1
    assert val('bnexporter_layer_near_dead_channels{model="alpha",layer="bn1"}') == 2
    assert val('bnexporter_layer_channels{model="alpha",layer="bn2"}') == 16
    info = prom_query(stack.prometheus, 'bnexporter_layer_info{model="alpha"}')
    assert {(i["metric"]["layer"], i["metric"]["consumer"]) for i in info} == \
        {("bn1", "relu"), ("bn2", "relu")}
    fmt = prom_query(stack.prometheus, 'bnexporter_model_checkpoint_info{model="alpha"}')
    assert fmt[0]["metric"]["format"] == "keras2-h5" and "path" not in fmt[0]["metric"]
    assert val("bnexporter_models_watched") == 2
    assert val("count(bnexporter_watcher_up == 1)") >= 1
    assert val('up{job="bnexporter"}') == 1
    # the checkpoint's mtime, as seen by Prometheus, is the file's
    mtime = (stack.root / "alpha" / "ckpt-100.h5").stat().st_mtime
    assert abs(val('bnexporter_model_checkpoint_timestamp_seconds{model="alpha"}') - mtime) < 1


def test_real_scrape_passes_promtool_check_metrics(stack):
    status, body = http_get(f"{stack.exporter}/metrics")
    assert status == 200
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dead_fraction_alert_pending_only_above_threshold(stack):
    # 4 of 32 dead (12.5%): below the 20% threshold, no alert
    _write(stack, "alpha", 200, ModelState([LayerState(dead=4), LayerState()]))
    _wait_for("alpha step 200", _step_seen(stack, "alpha", 200))
    assert _value(stack, 'bnexporter_model_dead_ratio{model="alpha"}') == 4 / 32
    quiet_until = time.monotonic() + 4 * EVAL_INTERVAL
    while time.monotonic() < quiet_until:
        assert not _alerts(stack, "BnexporterDeadChannelsHigh"), "alert below the threshold"
        time.sleep(0.2)

    # 10 of 32 dead (31.25%): pending at the next evaluation (for: 10m, so not firing yet)
    done = _write(stack, "alpha", 300, ModelState([LayerState(dead=6, near_dead=3),
                                                   LayerState(dead=4)]))
    seen: dict[str, float] = {}

    def progress() -> bool:
        if "exporter" not in seen:
            _, text = http_get(f"{stack.exporter}/metrics")
            if scrape_value(text, "bnexporter_model_checkpoint_step", model="alpha") == 300:
                seen["exporter"] = time.monotonic()
        if "prometheus" not in seen and _step_seen(stack, "alpha", 300)():
            seen["prometheus"] = time.monotonic()
        alerts = _alerts(stack, "BnexporterDeadChannelsHigh", "alpha")
        if alerts:
            seen["alert"] = time.monotonic()
            seen["state"] = alerts[0]["state"]
            seen["value"] = float(alerts[0]["value"])
        return "alert" in seen

    _wait_for("BnexporterDeadChannelsHigh for alpha", progress, every=0.05)
    assert seen["state"] == "pending"
    assert seen["value"] == 10 / 32
    assert not _alerts(stack, "BnexporterDeadChannelsHigh", "beta")
    stack.figures["dead_alert_pending_latency_s"] = round(seen["alert"] - done, 2)
    assert seen["exporter"] <= seen["prometheus"] <= seen["alert"]
    stack.figures["exporter_metrics_latency_s"] = round(seen["exporter"] - done, 2)
    stack.figures["prometheus_series_latency_s"] = round(seen["prometheus"] - done, 2)
    # settle + analysis + one scrape + one evaluation, with slack for 2 shared cores
    assert seen["alert"] - done < 30


def test_nonfinite_and_collapsed_alerts_fire_at_once(stack):
    assert not _alerts(stack, "BnexporterNonFiniteWeights")
    assert not _alerts(stack, "BnexporterBatchNormLayerCollapsed")
    done = _write(stack, "beta", 200, ModelState([LayerState(), LayerState(collapsed=True)],
                                                 nan_in_kernel=7))
    firing = _wait_for("BnexporterNonFiniteWeights firing for beta",
                       lambda: [a for a in _alerts(stack, "BnexporterNonFiniteWeights", "beta")
                                if a["state"] == "firing"], every=0.05)
    stack.figures["nonfinite_alert_firing_latency_s"] = round(time.monotonic() - done, 2)
    assert float(firing[0]["value"]) == 7
    assert firing[0]["labels"]["severity"] == "critical"
    collapsed = _wait_for("BnexporterBatchNormLayerCollapsed for beta",
                          lambda: _alerts(stack, "BnexporterBatchNormLayerCollapsed", "beta"))
    assert collapsed[0]["state"] == "firing" and float(collapsed[0]["value"]) == 1
    assert not _alerts(stack, "BnexporterNonFiniteWeights", "alpha")


def test_unreadable_checkpoint_is_reported(stack):
    folder = stack.root / "gamma"
    folder.mkdir()
    (folder / "ckpt-1.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))
    _wait_for("bnexporter_model_up{model=gamma} == 0",
              lambda: _value(stack, 'bnexporter_model_up{model="gamma"}') == 0)
    errors = _wait_for("an error counted", lambda: _value(
        stack, "sum(bnexporter_errors_total)") or None)
    assert errors >= 1
    assert _value(stack, 'bnexporter_model_up{model="alpha"}') == 1


def test_crashed_watcher_is_restarted_and_counted(stack):
    status, _ = http_get(f"{stack.exporter}/-/test/crash-watcher", method="POST")
    assert status == 200
    _wait_for("a watcher restart counted in Prometheus",
              lambda: (_value(stack, "sum(bnexporter_watcher_restarts_total)") or 0) >= 1)
    _wait_for("every watcher up again", lambda: _value(
        stack, "min(bnexporter_watcher_up)") == 1)
    status, _ = http_get(f"{stack.exporter}/healthz")
    assert status == 200
    # checkpoints written after the restart are still picked up
    _write(stack, "alpha", 310, ModelState([LayerState(dead=6, near_dead=3), LayerState(dead=4)]))
    _wait_for("alpha step 310", _step_seen(stack, "alpha", 310))


def test_every_dashboard_query_returns_data(stack):
    # rate() over 1m needs two scrapes of each counter: long since done by now
    empty = []
    for title, expr in dashboard_exprs():
        query = substitute_grafana(expr, {"model": ".+"})
        if not prom_query(stack.prometheus, query):
            empty.append(f"{title}: {query}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_deleted_model_goes_stale(stack):
    assert _value(stack, 'bnexporter_model_dead_ratio{model="beta"}') is not None
    shutil.rmtree(stack.root / "beta")
    _wait_for("beta series to go stale", lambda: not prom_query(
        stack.prometheus, '{__name__=~"bnexporter_(model|layer)_.*",model="beta"}'))
    # its alerts resolve, the other models stay
    _wait_for("beta alerts to resolve",
              lambda: not _alerts(stack, "BnexporterNonFiniteWeights", "beta"))
    assert _value(stack, 'bnexporter_model_dead_ratio{model="alpha"}') == 10 / 32
    assert _alerts(stack, "BnexporterDeadChannelsHigh", "alpha")
