"""The per-model page in a real headless Chromium: served by the daemon's HTTP app,
its DOM has a row per BN layer and the heatmap, and its screenshot is styled (the CSP
lets the one stylesheet through). Needs ``chromium`` (CI installs it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bnexporter.daemon.config import MetricOptions
from bnexporter.daemon.state import ModelView, Store
from bnexporter.daemon.web.app import App, HTTPServer
from bnexporter.detection import prune
from tests.web.story import STEPS, series

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    # .ci/run installs it: its absence is a broken setup, not a reason to pass
    assert CHROMIUM is not None, "chromium missing (apt-get install chromium)"
    profile = tempfile.mkdtemp(prefix="bnexporter-chromium-")
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", *args],
            capture_output=True, timeout=120, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reports, history = series(str(tmp_path_factory.mktemp("story")))
    store = Store()
    store.set_models({"demo-run": ModelView("demo-run", "/ckpt/demo", MetricOptions(),
                                            report=reports[-1], analysed_at=reports[-1].mtime,
                                            history=history, prune=prune.plan(reports[-1]))})
    http = HTTPServer("127.0.0.1", 0, App(store, CollectorRegistry(), lambda: (True, "")))
    http.start()
    yield f"http://127.0.0.1:{http.port}", reports
    http.stop()


def test_dom_has_every_layer_row_and_the_heatmap(server):
    url, reports = server
    dom = _chromium("--dump-dom", url + "/model/demo-run").stdout.decode()
    rows = re.findall(r'<tr id="l-([^"]+)"', dom)
    assert rows == [x.name for x in reports[-1].bn_layers] and len(rows) == 52
    heat = dom[dom.index('class="heat"'):]
    assert heat[: heat.index("</svg>")].count("<rect") == 52 * len(STEPS)
    assert "Dying layers" in dom and "dead since step" in dom
    overview = _chromium("--dump-dom", url + "/").stdout.decode()
    assert 'href="/model/demo-run"' in overview and 'class="spark"' in overview


def _png_size_and_colours(data: bytes) -> tuple[int, int, int]:
    """Width, height and the number of distinct bytes in the first rows (stdlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat, pos = b"", 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    return width, height, len(set(raw[: width * 4 * 200]))


@pytest.mark.parametrize("size", ["1280,900", "390,844"])
def test_screenshot_is_styled_at_laptop_and_phone_width(server, tmp_path: Path, size: str):
    url, _ = server
    out = tmp_path / "page.png"
    _chromium(f"--screenshot={out}", f"--window-size={size}", url + "/model/demo-run")
    width, height, colours = _png_size_and_colours(out.read_bytes())
    assert (width, height) == tuple(int(x) for x in size.split(","))
    # the dark header bar and the coloured cards: many distinct values, not a blank page
    assert colours > 40
    if os.environ.get("BNEXPORTER_SCREENSHOTS"):
        shutil.copy(out, Path(os.environ["BNEXPORTER_SCREENSHOTS"]) / f"model-{width}.png")
