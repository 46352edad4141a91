"""The collector against docs/metrics-contract.md, its cardinality options, the landing page."""

from __future__ import annotations

import gzip
import re
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bnexporter.daemon.config import MetricOptions
from bnexporter.daemon.demo import write_checkpoint
from bnexporter.daemon.state import ModelView, Store, WatcherView, frozen
from bnexporter.daemon.web import landing
from bnexporter.daemon.web.app import App
from bnexporter.daemon.web.collector import SnapshotCollector, select_layers
from bnexporter.daemon.web.exposition import FastText
from bnexporter.report import LayerReport
from bnexporter.scan import analyse_path
from tests.support.daemon import ROOT, Scrape

CONTRACT = ROOT / "docs" / "metrics-contract.md"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt-3000.h5"
    write_checkpoint(str(path), 3000)
    r = analyse_path(str(path))
    assert r.ok and r.summary.dead > 0
    return r


def _scrape(store: Store) -> Scrape:
    reg = CollectorRegistry()
    reg.register(SnapshotCollector(store))
    return Scrape(generate_latest(reg).decode())


def _store(*views: ModelView) -> Store:
    store = Store()
    store.set_models({v.name: v for v in views})
    store.set_watchers({"/ckpt": WatcherView("/ckpt", True, False)})
    return store


def test_every_contract_name_and_nothing_else(report):
    contract = set(re.findall(r"\bbnexporter_[a-z_]+[a-z]", CONTRACT.read_text()))
    full = MetricOptions(per_tensor=True)
    ok = ModelView("good", "/ckpt/good", full, report=report, analysed_at=1.0)
    bad = ModelView("bad", "/ckpt/bad", full, report=report, analysed_at=1.0, up=False,
                    errors=frozen({"truncated": 1}))
    s = _scrape(_store(ok, bad))
    exposed = {name for (name, _) in s.samples if name.startswith("bnexporter_")}
    assert exposed == contract, (sorted(contract - exposed), sorted(exposed - contract))
    runtime = {name for (name, _) in s.samples if not name.startswith("bnexporter_")}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
            "python_info"} <= runtime, runtime
    for name, kind in s.types.items():  # counters are exactly the *_total names
        if name.startswith("bnexporter_"):
            assert (kind == "counter") == (name + "_total" in contract), name


def test_values_match_the_report(report):
    view = ModelView("m", "/ckpt/m", MetricOptions(), report=report, analysed_at=123.0)
    s = _scrape(_store(view))
    summary = report.summary
    assert s.get("bnexporter_model_dead_channels", model="m") == summary.dead
    assert s.get("bnexporter_model_dead_ratio", model="m") == pytest.approx(summary.dead_ratio)
    assert s.get("bnexporter_model_checkpoint_step", model="m") == 3000
    assert s.get("bnexporter_model_checkpoint_timestamp_seconds", model="m") == report.mtime
    assert s.get("bnexporter_model_last_analysis_timestamp_seconds", model="m") == 123.0
    for layer in report.bn_layers:
        assert s.get("bnexporter_layer_dead_ratio", model="m", layer=layer.name) == \
            pytest.approx(layer.dead_ratio)
    assert s.get("bnexporter_layer_info", model="m", layer="bn4", consumer="add",
                 consumer_source="config") == 1
    assert not s.series("bnexporter_tensor_nonfinite_ratio")  # opt-in
    assert s.get("bnexporter_errors_total", reason="timeout") == 0  # pre-created
    assert s.get("bnexporter_watcher_up", root="/ckpt") == 1


def test_per_layer_off_keeps_model_totals(report):
    view = ModelView("m", "/x", MetricOptions(per_layer=False), report=report)
    s = _scrape(_store(view))
    assert not s.series("bnexporter_layer_dead_channels")
    assert s.get("bnexporter_model_dead_channels", model="m") == report.summary.dead


def _layer(name: str, dead: int, near: int = 0) -> LayerReport:
    return LayerReport(name, 10, 1e-3, "config", "relu", "config",
                       {"dead": list(range(dead)), "near_dead": list(range(dead, dead + near))})


def test_include_exclude_and_top_k_worst(report):
    layers = [_layer("a.bn", 1), _layer("b.bn", 5), _layer("aux.bn", 9), _layer("c.bn", 0, 3),
              _layer("d.bn", 5, 1)]
    r = replace(report, bn_layers=layers)

    def names(opts: MetricOptions) -> list[str]:
        return [x.name for x in select_layers(r, opts)]

    assert names(MetricOptions()) == ["a.bn", "b.bn", "aux.bn", "c.bn", "d.bn"]
    assert names(MetricOptions(layer_exclude="^aux")) == ["a.bn", "b.bn", "c.bn", "d.bn"]
    assert names(MetricOptions(layer_include=r"^[ab]\.")) == ["a.bn", "b.bn"]
    # the 2 worst (most dead, then near-dead), kept in file order
    assert names(MetricOptions(max_layers=2, layer_exclude="^aux")) == ["b.bn", "d.bn"]


def test_removed_model_stops_being_exported(report):
    store = _store(ModelView("gone", "/x", MetricOptions(), report=report))
    assert "gone" in _scrape(store).models()
    store.set_models({"gone": None})
    s = _scrape(store)
    assert not any(dict(lbl).get("model") == "gone" for (_, lbl) in s.samples)
    assert s.get("bnexporter_models_watched") == 0


def test_describe_is_empty():
    assert SnapshotCollector(Store()).describe() == []


def test_landing_page_escapes_names_and_draws_bars(report):
    evil = '<script>alert("x")</script>'
    layers = [replace(report.bn_layers[0], name='bn"><img src=x onerror=1>')]
    view = ModelView(evil, "/x", MetricOptions(),
                     report=replace(report, bn_layers=layers + report.bn_layers[1:]),
                     up=False, error="file <b>broken</b>")
    page = landing.render(_store(view, ModelView("empty", "/y", MetricOptions())).snapshot,
                          now=report.mtime + 10800)
    detail = landing.model_page(_store(view).snapshot, evil) or ""  # every layer, by name
    assert "<script" not in page + detail and "<img" not in page + detail
    assert "<b>broken" not in page + detail
    assert "&lt;script&gt;" in page and "bn&quot;&gt;&lt;img" in detail
    assert 'href="/model/empty"' in page  # each model has its own page
    assert detail.count('<tr id="l-') == len(report.bn_layers)
    assert "3 h" in page and "DOWN" in page and "no checkpoint analysed yet" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_fast_text_is_byte_identical_to_prometheus_client(report):
    views = [ModelView(f"m{i}", "/x", MetricOptions(per_tensor=i == 0), report=report,
                       analysed_at=float(i)) for i in range(3)]
    store = _store(*views)
    reg = CollectorRegistry()
    reg.register(SnapshotCollector(store))
    fast = FastText(store)

    def stable(body: bytes) -> bytes:  # process_ / python_ values move between two calls
        return b"\n".join(line for line in body.split(b"\n")
                          if not re.match(rb"(# (HELP|TYPE) )?(process|python)_", line))

    assert stable(fast.body()) == stable(generate_latest(reg))
    assert stable(gzip.decompress(fast.body(gzipped=True))) == stable(generate_latest(reg))
    store.set_models({"m1": replace(views[1], up=False), "m2": None})  # changes show at once
    body = fast.body()
    assert stable(body) == stable(generate_latest(reg))
    assert b'bnexporter_model_up{model="m1"} 0.0' in body and b'model="m2"' not in body


def _call(app: App, path: str, method: str = "GET") -> tuple[str, bytes]:
    out: dict[str, str] = {}
    environ = {"PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": ""}
    body = b"".join(app(environ, lambda status, headers: out.update(status=status)))
    return out["status"], body


def test_http_routes_health_and_reload(report):
    store = _store(ModelView("m", "/x", MetricOptions(), report=report))
    answers = iter([(True, "reloaded: 1 models watched"), (False, "reload failed: x: bad")])
    app = App(store, CollectorRegistry(), lambda: next(answers))
    assert _call(app, "/healthz") == ("200 OK", b"ok\n")
    store.set_watchers({"/ckpt": WatcherView("/ckpt", False, True)})
    assert _call(app, "/healthz") == ("503 Service Unavailable", b"watcher dead: /ckpt\n")
    assert _call(app, "/-/reload")[0].startswith("405")
    assert _call(app, "/-/reload", "POST") == ("200 OK", b"reloaded: 1 models watched\n")
    assert _call(app, "/-/reload", "POST")[0].startswith("500")
    assert _call(app, "/-/test/crash-watcher", "POST")[0].startswith("404")  # no test hooks
    status, body = _call(app, "/metrics")
    assert status == "200 OK" and b'bnexporter_watcher_up{root="/ckpt"} 0.0' in body


def test_a_huge_model_is_capped_and_says_so(report):
    from bnexporter.daemon.web.collector import BUILTIN_MAX_LAYERS

    n = BUILTIN_MAX_LAYERS + 500
    layers = [_layer(f"l{i}.bn", i % 3) for i in range(n)]
    big = replace(report, bn_layers=layers)
    s = _scrape(_store(ModelView("big", "/x", MetricOptions(layers="all"), report=big)))
    exported = [k for k in s.samples if k[0] == "bnexporter_layer_channels"]
    assert len(exported) == BUILTIN_MAX_LAYERS
    assert s.get("bnexporter_model_layers_capped", model="big") == 500
    s = _scrape(_store(ModelView("big", "/x", MetricOptions(layers="all", max_layers=10),
                                 report=big)))
    assert s.get("bnexporter_model_layers_capped", model="big") == n - 10
