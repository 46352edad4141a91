"""The overview, the per-model page and the HTML report: content, order, escaping, CSP."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest

from bnexporter.daemon.config import MetricOptions
from bnexporter.daemon.state import ModelView, Store
from bnexporter.daemon.web import landing, page
from bnexporter.detection import prune
from bnexporter.report import CLASS_NAMES
from tests.web.story import STEPS, series


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    return series(str(tmp_path_factory.mktemp("story")))


def _store(story, name="demo-run"):
    reports, history = story
    view = ModelView(name, "/ckpt/demo", MetricOptions(), report=reports[-1],
                     analysed_at=reports[-1].mtime, history=history,
                     prune=prune.plan(reports[-1]))
    store = Store()
    store.set_models({name: view, "empty": ModelView("empty", "/y", MetricOptions())})
    return store


def test_model_page_lists_every_layer_in_model_order_with_history(story):
    reports, history = story
    html = landing.model_page(_store(story).snapshot, "demo-run", now=reports[-1].mtime + 30)
    assert html is not None
    rows = re.findall(r'<tr id="l-([^"]+)"', html)
    assert rows == [x.name for x in reports[-1].bn_layers] and len(rows) == 52
    assert rows[0] == "bn_Conv1" and rows[-1] == "Conv_1_bn"
    # the heatmap: one rect per layer and checkpoint, a step axis, a text equivalent
    heat = html[html.index('<svg class="heat"'):]
    heat = heat[: heat.index("</svg>")]
    assert heat.count("<rect") == 52 * len(STEPS)
    assert f"{STEPS[-1]:,}" in heat and "training step" in heat
    assert "Heatmap as a table" in html
    # since when, how fast: the spike at 9,000 killed expand channels of blocks 7-12
    assert "Dying layers" in html and "dead since step" in html
    ch = history.change("block_11_expand_BN")
    assert ch.since is not None and 8_800 <= ch.since <= 9_600
    for name in CLASS_NAMES:
        assert page._CLASS_HEAD[name] in html
    assert "Prune plan" in html and "parameters saved" in html.lower()
    assert "checkpoint written" in html and "refreshes every" in html


def test_overview_has_every_model_with_trend_and_labelled_time(story):
    reports, _ = story
    html = landing.render(_store(story).snapshot, now=reports[-1].mtime + 7200)
    assert 'href="/model/demo-run"' in html and 'href="/model/empty"' in html
    assert "checkpoint written" in html and "2 h ago" in html
    assert 'class="spark"' in html and "decided by" in html.lower()
    assert "no checkpoint analysed yet" in html


def test_names_are_escaped_and_nothing_external(story):
    reports, history = story
    evil = '<script>alert("x")</script>'
    layers = [replace(reports[-1].bn_layers[0], name='bn"><img src=x onerror=1>'),
              *reports[-1].bn_layers[1:]]
    view = ModelView(evil, "/x", MetricOptions(), report=replace(reports[-1], bn_layers=layers),
                     history=history, up=False, error="file <b>broken</b>")
    store = Store()
    store.set_models({evil: view})
    for html in (landing.render(store.snapshot), landing.model_page(store.snapshot, evil) or ""):
        assert "<script" not in html and "<img" not in html and "<b>broken" not in html
        assert "&lt;script&gt;" in html
        assert not re.search(r'(src|href)="(https?:)?//', html)
        assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert landing.model_url(evil) == "/model/%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E"


def test_csp_allows_exactly_the_one_stylesheet(story):
    html = landing.model_page(_store(story).snapshot, "demo-run") or ""
    css = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert len(css) == 1 and "<script" not in html and " style=" not in html
    digest = base64.b64encode(hashlib.sha256(css[0].encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in page.CSP and "default-src 'none'" in page.CSP


def test_html_report_is_self_contained(story, tmp_path: Path):
    reports, _ = story
    doc = page.html_report(reports, [prune.plan(r) for r in reports])
    assert doc.count('<svg class="heat"') == 1 and 'http-equiv="refresh"' not in doc
    assert len(re.findall(r'<tr id="l-', doc)) == 52


def test_scan_html_writes_the_report(story, tmp_path: Path, capsys):
    from bnexporter.scan_cli import main
    reports, _ = story
    out = tmp_path / "report.html"
    rc = main(["--no-refine", "--bn-only", "--html", str(out), *[r.path for r in reports]])
    assert rc == 0
    doc = out.read_text()
    assert doc.count('<svg class="heat"') == 1 and "Prune plan" in doc
    rows = re.findall(r'<tr id="l-([^"]+)"', doc)
    assert rows == [x.name for x in reports[-1].bn_layers]
