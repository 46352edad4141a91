"""Shared helpers for the deployment tests: paths, ports, HTTP polling, the metric contract."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONTRACT = REPO / "docs" / "metrics-contract.md"
RULES = DEPLOY / "prometheus" / "bnexporter.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "bnexporter-dashboard.json"
DEFAULT_PORT = 10842

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

_METRIC = re.compile(r"\bbnexporter_[a-z0-9_]+\b")
# Words that look like metric names in PromQL / docs but are not metrics.
_NOT_METRICS = {"bnexporter_"}


def contract_metrics() -> set[str]:
    """Metric names listed in docs/metrics-contract.md."""
    return set(_METRIC.findall(CONTRACT.read_text(encoding="utf-8"))) - _NOT_METRICS


def metrics_in(text: str) -> set[str]:
    return set(_METRIC.findall(text)) - _NOT_METRICS


def scrape_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in an exposition-format scrape, or None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return sample.value
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0, method: str = "GET") -> tuple[int, str]:
    """Status and body; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None,
              want: int = 200) -> str:
    """Poll ``url`` until it answers ``want``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} came up")
        try:
            status, body = http_get(url, timeout=2)
            if status == want:
                return body
            last = status
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} not answering {want} after {timeout}s (last: {last})")


def prom_query(base: str, query: str, **params: Any) -> list[dict]:
    """Instant query through Prometheus's HTTP API; the ``result`` list."""
    qs = urllib.parse.urlencode({"query": query, **params})
    status, body = http_get(f"{base}/api/v1/query?{qs}")
    data = json.loads(body)
    if status != 200 or data.get("status") != "success":
        raise AssertionError(f"query {query!r} failed: {status} {body[:300]}")
    return data["data"]["result"]


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Terminate a process we started, then kill it if it does not exit."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


_GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range", "${__rate_interval}",
                      "${__interval}", "${__range}")


def dashboard_exprs(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel, rows included."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel.get("title", ""), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def substitute_grafana(expr: str, variables: dict[str, str] | None = None,
                       interval: str = "1m") -> str:
    """Replace Grafana's built-in and template variables so Prometheus can run the query."""
    for name in _GRAFANA_INTERVALS:
        expr = expr.replace(name, interval)
    for name, value in (variables or {}).items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    if "$" in expr:
        raise ValueError(f"unsubstituted variable in {expr!r}")
    return expr
