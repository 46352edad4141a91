"""Configuration: the example file, precise one-line errors, flags, check-config."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bnexporter.daemon import validate
from bnexporter.daemon.commands import check_config
from bnexporter.daemon.config import DEFAULT_PORT
from bnexporter.daemon.validate import ConfigError, Overrides, build_config, load_config
from tests.support.daemon import ROOT

EXAMPLE = ROOT / "config.example.yaml"


def test_example_config_loads_and_documents_every_key():
    cfg = load_config(str(EXAMPLE), check_paths=False)
    assert cfg.listen == f"0.0.0.0:{DEFAULT_PORT}"
    assert [m.name for m in cfg.models] == ["resnet50", None]
    resnet, jobs = cfg.models
    assert resnet.analysis.thresholds.near_dead_p == 0.02
    assert resnet.analysis.consumer_rules[0] == ("*.bn2", "add")
    assert jobs.template and jobs.template_parts() == ("/shared/jobs", "checkpoints")
    assert jobs.analysis.bn_only and jobs.analysis.metrics.max_layers == 20
    assert jobs.watch == "poll" and cfg.watch == "auto"
    text = EXAMPLE.read_text()
    keys = {*validate.TOP_KEYS, *validate.MODEL_KEYS, *validate.THRESHOLD_KEYS,
            *validate.METRIC_KEYS, *validate.RETRY_KEYS, "rules", "presets"}
    missing = sorted(k for k in keys if not re.search(rf"^\s*-?\s*{k}:", text, re.M))
    assert not missing, f"config.example.yaml does not document {missing}"


def test_example_defaults_match_the_code():
    """The example says 'every key, with its default': the global part must equal the defaults."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["models"] = [{"name": "x", "path": "/x"}]
    from_example = build_config(raw, "example", "/", check_paths=False)
    defaults = build_config({"models": [{"name": "x", "path": "/x"}]}, "d", "/",
                            check_paths=False)
    assert from_example.to_dict() == defaults.to_dict()


def test_effective_config_round_trips():
    cfg = load_config(str(EXAMPLE), check_paths=False)
    again = build_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), "x", "/",
                         check_paths=False)
    assert again.to_dict() == cfg.to_dict()


def _error(tmp_path: Path, doc: object, check_paths: bool = True) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_config(str(path), check_paths=check_paths)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg.replace(str(path), "config.yaml")


def test_error_messages_are_precise(tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    (tmp_path / "afile").write_text("x")
    three = [{"path": str(ok)}, {"name": "b", "path": str(ok)},
             {"name": "c", "path": str(tmp_path / "missing")}]
    assert _error(tmp_path, {"models": three}) == \
        "config.yaml: models[2].path: not a directory (does not exist)"
    assert _error(tmp_path, {"models": [{"path": str(tmp_path / "afile")}]}) == \
        "config.yaml: models[0].path: not a directory"
    assert _error(tmp_path, {"tresholds": {}, "models": []}) == \
        "config.yaml: tresholds: unknown key (did you mean 'thresholds'?)"
    assert _error(tmp_path, {"models": [{"path": str(ok), "thresholds": {"dead_p": 2}}]}) == \
        "config.yaml: models[0].thresholds.dead_p: must be below 1, got 2"
    assert _error(tmp_path, {"thresholds": {"dead_p": 0.2}, "models": []}) == \
        "config.yaml: thresholds.dead_p: must not exceed near_dead_p (0.05)"
    assert _error(tmp_path, {"metrics": {"layer_include": "bn("}, "models": []}).startswith(
        "config.yaml: metrics.layer_include: not a valid regular expression")
    assert _error(tmp_path, {"shard": "3/2", "models": []}) == \
        "config.yaml: shard: need 0 <= I < N, got 3/2"
    assert _error(tmp_path, {"listen": "localhost", "models": []}) == \
        "config.yaml: listen: expected HOST:PORT, got 'localhost'"
    assert _error(tmp_path, {"workers": 0, "models": []}) == \
        "config.yaml: workers: must be >= 1, got 0"
    assert _error(tmp_path, {"watch": "fanotify", "models": []}) == \
        "config.yaml: watch: must be one of auto, inotify, poll, got 'fanotify'"
    assert _error(tmp_path, {"models": [{"name": "a", "path": str(ok)},
                                        {"name": "a", "path": str(tmp_path)}]}) == \
        "config.yaml: models[1].name: duplicate model name 'a' (also models[0])"
    assert _error(tmp_path, {"models": [{"path": str(tmp_path / "x{model}")}]}) == \
        "config.yaml: models[0].path: {model} must be a whole folder name, e.g. " \
        "/jobs/{model}/checkpoints"
    assert _error(tmp_path, {"consumers": {"rules": {"*.bn2": "sum"}}, "models": []}) == \
        "config.yaml: consumers.rules['*.bn2']: consumer must be one of relu, relu6, add, " \
        "linear, silu, hardswish, other, unknown, got 'sum'"
    assert _error(tmp_path, {"models": [{"name": "a"}]}) == \
        "config.yaml: models[0]: missing key 'path'"
    assert _error(tmp_path, {"models": []}) == \
        "config.yaml: no models to watch (give --watch DIR or a models: list)"
    assert _error(tmp_path, "models:\n  - path: [\n") .startswith("config.yaml:3:1: invalid YAML")


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"path": "runs/a"}, {"path": "runs/{model}"}]}))
    monkeypatch.chdir("/")
    cfg = load_config(str(path))
    assert cfg.models[0].path == str(tmp_path / "runs" / "a")
    assert cfg.models[0].name == "a"
    assert cfg.models[1].template_parts()[0] == str(tmp_path / "runs")


def test_flags_override_the_file_and_add_models(tmp_path):
    (tmp_path / "m").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"listen": ":1", "poll_interval": 5, "models": []}))
    ov = Overrides(watch=[f"named={tmp_path / 'm'}", str(tmp_path / "m")], listen="[::1]:9",
                   poll_interval=0.5, shard="1/3", bn_only=True, watch_mode="poll", workers=2)
    cfg = load_config(str(path), ov)
    assert (cfg.listen, cfg.poll_interval, cfg.shard, cfg.watch, cfg.workers) == \
        ("[::1]:9", 0.5, (1, 3), "poll", 2)
    assert [m.name for m in cfg.models] == ["named", "m"]
    assert all(m.analysis.bn_only for m in cfg.models)
    with pytest.raises(ConfigError, match=r"^command line: --shard: need 0 <= I < N, got 5/2$"):
        load_config(None, Overrides(watch=[str(tmp_path / "m")], shard="5/2"))
    with pytest.raises(ConfigError, match=r"--watch /nonexistent.path: not a directory"):
        load_config(None, Overrides(watch=["/nonexistent"]))


def test_check_config_prints_the_effective_configuration(tmp_path, capsys):
    (tmp_path / "jobs" / "a").mkdir(parents=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": [{"path": str(tmp_path / "jobs" / "{model}")}],
                                    "metrics": {"max_layers": 5}}))
    assert check_config(str(path)) == 0
    out = capsys.readouterr().out
    doc = yaml.safe_load(out)
    assert doc["metrics"]["max_layers"] == 5 and doc["settle_seconds"] == 2
    assert doc["models"][0]["metrics"]["max_layers"] == 5  # inherited by the model
    assert "watches now: a" in out


def test_check_config_cli_bad_file_is_one_line_no_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "x", "path": str(tmp_path / "no")}]}))
    res = subprocess.run([sys.executable, "-m", "bnexporter", "check-config", "--strict",
                          str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"bnexporter: {path}: models[0].path: not a directory " \
                                 "(does not exist)"
    # without --strict a folder missing on this machine is a warning (run still refuses)
    res = subprocess.run([sys.executable, "-m", "bnexporter", "check-config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == f"bnexporter: warning: {path}: models[0].path: " \
        f"{tmp_path / 'no'}: not a directory here (bnexporter run refuses to start until it " \
        "exists)"
    path.write_text(yaml.safe_dump({"models": [{"name": "x", "path": str(tmp_path)}],
                                    "log_level": "loud"}))
    res = subprocess.run([sys.executable, "-m", "bnexporter", "check-config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stdout == ""


def test_check_config_passes_on_the_shipped_example():
    example = ROOT / "config.example.yaml"
    res = subprocess.run([sys.executable, "-m", "bnexporter", "check-config", str(example)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "valid" in res.stdout
