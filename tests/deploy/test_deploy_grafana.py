"""The Grafana dashboard: structure, variables, and every query parses as PromQL."""

from __future__ import annotations

import json
import subprocess

import yaml
from deploy_support import (
    DASHBOARD,
    PROMTOOL,
    contract_metrics,
    dashboard_exprs,
    metrics_in,
    substitute_grafana,
)

VARIABLES = {"model": ".+"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_model_selector_comes_from_dead_ratio_labels():
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query"
    assert model["definition"] == "label_values(bnexporter_model_dead_ratio, model)"
    assert model["multi"] and model["includeAll"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_panels_are_laid_out_and_use_the_datasource_variable():
    panels = _panels(_dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        for target in p.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", p["title"]
            assert target["refId"]


def test_required_views_are_present():
    panels = _panels(_dashboard())
    by_type: dict[str, list[dict]] = {}
    for p in panels:
        by_type.setdefault(p["type"], []).append(p)
    assert {"timeseries", "heatmap", "table", "xychart", "stat"} <= set(by_type)
    heat = by_type["heatmap"][0]
    assert "bnexporter_layer_dead_ratio" in heat["targets"][0]["expr"]
    assert heat["options"]["calculate"] is False   # one row per layer series, not buckets
    table = by_type["table"][0]
    assert table["targets"][0]["expr"].startswith("topk(")
    assert all(t["instant"] for t in table["targets"])
    xy = by_type["xychart"][0]
    assert any("bnexporter_model_checkpoint_step" in t["expr"] for t in xy["targets"])
    used = set().union(*(metrics_in(expr) for _, expr in dashboard_exprs()))
    for metric in ("bnexporter_model_dead_ratio", "bnexporter_model_near_dead_ratio",
                   "bnexporter_layer_dead_ratio", "bnexporter_model_nonfinite_values",
                   "bnexporter_model_extreme_tensors", "bnexporter_watcher_up",
                   "bnexporter_errors_total", "bnexporter_queue_pending",
                   "bnexporter_model_analysis_duration_seconds"):
        assert metric in used, metric


def test_dashboard_only_uses_contract_metrics():
    used = set().union(*(metrics_in(expr) for _, expr in dashboard_exprs()))
    assert used <= contract_metrics(), used - contract_metrics()


def test_model_panels_filter_on_the_selector():
    for title, expr in dashboard_exprs():
        if "bnexporter_model_" in expr or "bnexporter_layer_" in expr:
            assert 'model=~"$model"' in expr, title


def test_every_expr_parses_with_promtool(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = [{"record": f"dashboard:expr_{i}", "expr": substitute_grafana(expr, VARIABLES)}
             for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout


def test_promtool_parse_check_rejects_a_broken_expr(tmp_path):
    """The parse check above is real: a malformed query makes promtool fail."""
    path = tmp_path / "broken.yml"
    bad = substitute_grafana('sum by (reason) (rate(bnexporter_errors_total[$__rate_interval])',
                             VARIABLES)
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "dashboard:broken", "expr": bad}]}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True,
                       check=False)
    assert r.returncode != 0
