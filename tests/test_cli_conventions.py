"""Issue 14: scan's one-line errors and exit codes, textfile output, node_exporter-style flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bnexporter import textfile
from bnexporter.daemon.demo import write_checkpoint
from bnexporter.daemon.logformat import LogfmtFormatter, rfc3339
from bnexporter.scan_cli import EXIT_FOUND, EXIT_PIPE, EXIT_UNREADABLE, EXIT_USAGE

PROMTOOL = "/usr/bin/promtool"


def _bn(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bnexporter", *args], capture_output=True,
                          text=True, timeout=120, input=stdin)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "resnet" / "ckpt-3000.h5"
    path.parent.mkdir()
    write_checkpoint(str(path), 3000)
    return path


@pytest.mark.parametrize(("flags", "says"), [
    (["--step-regex", "("], "--step-regex: not a valid regular expression"),
    (["--eps", "-1"], "--eps: must be a positive finite number"),
    (["--dead-p", "2"], "--dead-p: must be below 1"),
    (["--dead-p", "0.1", "--near-dead-p", "0.01"], "must not exceed near_dead_p"),
    (["--extreme", "nan"], "--extreme: must be a positive finite number"),
    (["--consumer", "nokind"], "--consumer 'nokind': expected PATTERN=KIND"),
    (["--consumer", "bn*=sigmoid"], "--consumer: consumer must be one of"),
    (["--eps", "abc"], "argument --eps: invalid float value"),
    (["--top", "-3"], "argument --top"),
    (["--format", "xml"], "argument --format: invalid choice"),
    (["--json", "--format", "text"], "--json and --format text"),
    (["--textfile", "/nonexistent/dir"], "--textfile /nonexistent/dir: not a directory"),
])
def test_usage_errors_are_one_line_and_exit_64(ckpt, flags, says):
    r = _bn("scan", *flags, str(ckpt))
    assert r.returncode == EXIT_USAGE, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


def test_the_config_file_rejects_the_same_values(tmp_path):
    from bnexporter.daemon.validate import ConfigError, build_config

    for values in ({"thresholds": {"dead_p": 2}}, {"eps": -1}, {"step_regex": "("}):
        with pytest.raises(ConfigError):
            build_config(values, "c.yaml", str(tmp_path))


def test_exit_codes_findings_unreadable_and_errors_printed_once(ckpt, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert _bn("scan", str(ckpt)).returncode == 0
    assert _bn("scan", "--fail-on", "dead", str(ckpt)).returncode == EXIT_FOUND
    r = _bn("scan", str(bad), str(ckpt))
    assert r.returncode == EXIT_UNREADABLE
    assert (r.stdout + r.stderr).count(str(bad)) == 1, (r.stdout, r.stderr)  # printed once
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    doc = json.loads(_bn("scan", "--json", str(bad)).stdout)
    assert doc["checkpoints"][0]["summary"] is None  # no fake zero summary


def test_quiet_on_a_closed_pipe(ckpt):
    cmd = (f"{sys.executable} -m bnexporter scan {ckpt} {ckpt} {ckpt} {ckpt} | head -1;"
           " echo rc=${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert r.stderr == "", r.stderr
    assert f"rc={EXIT_PIPE}" in r.stdout


def test_prometheus_format_and_textfile_are_promtool_clean_and_atomic(ckpt, tmp_path):
    r = _bn("scan", "--format", "prometheus", str(ckpt))
    assert r.returncode == 0, r.stderr
    assert 'bnexporter_model_dead_channels{model="resnet"}' in r.stdout
    assert "path=" not in r.stdout
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=r.stdout, text=True,
                          capture_output=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    out = tmp_path / "textfile"
    out.mkdir()
    (out / "other.prom").write_text("x 1\n")
    r = _bn("scan", "--textfile", str(out), "--model", "job-7", "--layers", "none", str(ckpt))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bnexporter_job-7.prom", "other.prom"]
    text = (out / "bnexporter_job-7.prom").read_text()
    assert 'bnexporter_model_up{model="job-7"} 1.0' in text and "bnexporter_layer_" not in text


def test_textfile_model_name_and_newest_wins(tmp_path):
    assert textfile.model_name("/ckpt/resnet/ckpt-100.h5") == "resnet"
    assert textfile.model_name("/runs/bert/checkpoint-500/model.safetensors") == "bert"
    assert textfile.file_name("a/b c") == "bnexporter_a_b_c.prom"


def test_version_names_revision_and_python():
    r = _bn("--version")
    assert r.returncode == 0
    first = r.stdout.splitlines()[0]
    assert first.startswith("bnexporter, version ") and "revision: " in first
    assert "python version:" in r.stdout


def test_run_accepts_node_exporter_flags_and_old_aliases(tmp_path):
    from bnexporter.cli import Parser
    from bnexporter.daemon.commands import add_subcommands, overrides_from
    from bnexporter.daemon.validate import load_config

    p = Parser(prog="bnexporter")
    add_subcommands(p.add_subparsers(dest="command"))
    new = p.parse_args(["run", "--watch", str(tmp_path), "--web.listen-address", ":9",
                        "--web.telemetry-path", "/m", "--log.level", "debug",
                        "--log.format", "json", "--web.config.file", "w.yml"])
    old = p.parse_args(["run", "--watch", str(tmp_path), "--listen", ":9",
                        "--log-level", "debug"])
    assert (new.listen, new.log_level) == (old.listen, old.log_level) == (":9", "debug")
    cfg = load_config(None, overrides_from(new), check_paths=False)
    assert (cfg.telemetry_path, cfg.log_format, cfg.listen) == ("/m", "json", ":9")
    r = _bn("run", "--watch", str(tmp_path), "--log.format", "xml")
    assert r.returncode == EXIT_USAGE and len(r.stderr.strip().splitlines()) == 1


def test_log_lines_are_logfmt_with_rfc3339_milliseconds():
    import logging

    assert rfc3339(0.5) == "1970-01-01T00:00:00.500Z"
    rec = logging.LogRecord("bnexporter.planner", logging.WARNING, __file__, 1,
                            'model %s: "x"', ("a\nb",), None)
    line = LogfmtFormatter().format(rec)
    assert line.startswith("time=") and " level=warning source=bnexporter.planner " in line
    assert 'msg="model a\\nb: \\"x\\""' in line and "\n" not in line


def _call(app, method: str, path: str) -> tuple[str, dict[str, str], bytes]:
    got: dict[str, object] = {}

    def start(status, headers, *_):
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path}, start))
    return str(got["status"]), dict(got["headers"]), body  # type: ignore[arg-type]


def test_routes_head_health_ready_telemetry_path_and_json(ckpt):
    from prometheus_client import CollectorRegistry

    from bnexporter.daemon.config import MetricOptions
    from bnexporter.daemon.state import ModelView, Store, WatcherView
    from bnexporter.daemon.web.app import App
    from bnexporter.scan import analyse_path

    store = Store()
    store.set_models({"m": ModelView("m", str(ckpt.parent), MetricOptions(),
                                     report=analyse_path(str(ckpt)), analysed_at=1.0)})
    store.set_watchers({"/x": WatcherView("/x", True, False)})
    ready = {"v": False}
    app = App(store, CollectorRegistry(), lambda: (True, ""), telemetry_path="/prom",
              ready=lambda: ready["v"])
    status, headers, body = _call(app, "GET", "/prom")
    assert status.startswith("200") and b"process_resident_memory_bytes" in body
    assert b'bnexporter_build_info{python_version="' in body and b'revision="' in body
    assert _call(app, "GET", "/metrics")[0].startswith("404")
    status, head_headers, head_body = _call(app, "HEAD", "/prom")
    assert status.startswith("200") and head_body == b""
    # what GET would send (process_* values move between the two calls)
    assert abs(int(head_headers["Content-Length"]) - int(headers["Content-Length"])) < 64
    for path in ("/healthz", "/-/healthy", "/"):
        assert _call(app, "HEAD", path)[0].startswith("200"), path
    assert _call(app, "GET", "/-/ready")[0].startswith("503")
    ready["v"] = True
    assert _call(app, "GET", "/-/ready")[0].startswith("200")
    doc = json.loads(_call(app, "GET", "/api/v1/models")[2])
    assert doc["models"][0]["checkpoint"]["path"] == str(ckpt)
