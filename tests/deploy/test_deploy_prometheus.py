"""Alert rules and scrape config: promtool checks, unit tests, and proof the unit tests bite."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_support import DEPLOY, PROMTOOL, RULES, contract_metrics, metrics_in

PROM_DIR = DEPLOY / "prometheus"
UNIT_TESTS = sorted((PROM_DIR / "tests").glob("*.test.yml"))
REQUIRED_ALERTS = {
    "BnexporterDeadChannelsHigh", "BnexporterDyingChannelsRising", "BnexporterNonFiniteWeights",
    "BnexporterBatchNormLayerCollapsed", "BnexporterCheckpointStale",
    "BnexporterCheckpointUnreadable", "BnexporterAnalysisErrors", "BnexporterWatcherDown",
}


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, check=False)


def test_rules_pass_promtool_check():
    r = _promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout


def test_rules_cover_the_required_alerts_with_severity_and_summary():
    rules = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert set(rules) >= REQUIRED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    # the dead-fraction alert waits; the non-finite alert fires at once
    assert rules["BnexporterDeadChannelsHigh"].get("for")
    assert "for" not in rules["BnexporterNonFiniteWeights"]


def test_rules_only_use_contract_metrics():
    used = metrics_in(RULES.read_text(encoding="utf-8"))
    assert used, "no bnexporter metric found in the rules"
    assert used <= contract_metrics(), used - contract_metrics()


def test_promtool_unit_tests_pass():
    assert UNIT_TESTS, "no promtool unit tests found"
    r = _promtool("test", "rules", *map(str, UNIT_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(UNIT_TESTS)


def test_every_alert_has_unit_tests_that_expect_it_and_expect_silence():
    tested: dict[str, set[str]] = {}
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                kind = "fires" if check["exp_alerts"] else "silent"
                tested.setdefault(check["alertname"], set()).add(kind)
    for rule in _rules():
        if "alert" in rule:
            assert tested.get(rule["alert"]) == {"fires", "silent"}, rule["alert"]


def _run_tests_with(rules: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the shipped unit tests against a modified copy of the rules."""
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    it = iter(rules)
    for group in doc["groups"]:
        group["rules"] = [next(it) for _ in group["rules"]]
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "bnexporter.rules.yml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    for path in UNIT_TESTS:
        shutil.copy(path, tmp_path / "tests" / path.name)
    return _promtool("test", "rules", *(f"tests/{p.name}" for p in UNIT_TESTS), cwd=tmp_path)


def _mutants():
    rules = _rules()
    for i, rule in enumerate(rules):
        name = rule.get("alert")
        if not name:
            continue
        always = {**copy.deepcopy(rule), "expr": "vector(1)"}
        always.pop("for", None)
        yield pytest.param(i, always, id=f"{name}-always-firing")
        yield pytest.param(i, {**copy.deepcopy(rule), "expr": "vector(1) == 0"},
                           id=f"{name}-never-firing")
        if "for" in rule:
            no_wait = copy.deepcopy(rule)
            no_wait.pop("for")
            yield pytest.param(i, no_wait, id=f"{name}-without-for")


@pytest.mark.parametrize(("index", "mutant"), list(_mutants()))
def test_unit_tests_catch_a_broken_rule(index, mutant, tmp_path):
    """Fires too early, never fires, or skips its ``for``: some unit test must fail."""
    rules = _rules()
    rules[index] = mutant
    r = _run_tests_with(rules, tmp_path)
    assert r.returncode != 0, f"unit tests still pass with {mutant}"
    assert f"alertname: {mutant['alert']}" in r.stdout + r.stderr


def test_unmodified_copy_passes_through_the_same_harness(tmp_path):
    r = _run_tests_with(_rules(), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheusrule_is_generated_from_the_rules_file():
    script = PROM_DIR / "render_prometheusrule.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    generated = yaml.safe_load((DEPLOY / "kubernetes" / "prometheusrule.yaml").read_text())
    assert generated["kind"] == "PrometheusRule"
    assert generated["spec"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))


def test_render_check_detects_a_stale_prometheusrule(tmp_path, monkeypatch):
    sys.path.insert(0, str(PROM_DIR))
    try:
        import render_prometheusrule as render
    finally:
        sys.path.remove(str(PROM_DIR))
    stale = tmp_path / "prometheusrule.yaml"
    stale.write_text(render.render(RULES.read_text()).replace("> 0.2", "> 0.3"))
    monkeypatch.setattr(render, "TARGET", stale)
    assert render.main(["--check"]) == 1
    assert render.main([]) == 0
    assert render.main(["--check"]) == 0


def test_example_prometheus_config_is_valid(tmp_path):
    """promtool checks the example; Debian's build lacks kubernetes_sd_configs, so that one
    block is swapped for a static target and everything else (relabelling) is still checked."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    swapped = 0
    for job in config["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
            job["static_configs"] = [{"targets": ["10.0.0.1:10842"]}]
            swapped += 1
    assert swapped == 1
    assert config["rule_files"] == ["bnexporter.rules.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    shutil.copy(RULES, tmp_path / "bnexporter.rules.yml")
    r = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]]
    assert "localhost:10842" in targets
