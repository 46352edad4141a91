"""The ``/`` page: every model at a glance, with a per-layer bar chart of dead
fractions as inline SVG. No scripts, no external assets; every name from a file
or folder is HTML-escaped."""

from __future__ import annotations

import html
import time

from bnexporter import __version__
from bnexporter.daemon.state import ModelView, Snapshot, WatcherView

MAX_CHARTS = 50        # models with a chart (the worst first); a table row for every model
MAX_BARS = 400         # layers per chart
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{padding:.25em .7em;text-align:left}
tr:nth-child(even){background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.down{color:#b00;font-weight:bold}.ok{color:#070}svg{display:block;margin:.3em 0 1.2em}
h2{font-size:1.05em;margin:1.2em 0 .2em}code{font-size:.92em}.muted{color:#777}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _row(v: ModelView, now: float) -> str:
    r = v.report
    status = '<span class="ok">up</span>' if v.up else '<span class="down">DOWN</span>'
    if r is None:
        cells = '<td colspan="6" class="muted">no checkpoint analysed yet</td>'
    else:
        s = r.summary
        step = "?" if r.step is None else r.step
        cells = (f'<td class="n">{_e(step)}</td>'
                 f'<td class="n">{_e(age(now - r.mtime if r.mtime else None))}</td>'
                 f'<td class="n">{s.dead} ({100 * s.dead_ratio:.1f}%)</td>'
                 f'<td class="n">{s.near_dead} ({100 * s.near_dead_ratio:.1f}%)</td>'
                 f'<td class="n">{s.channels} / {s.bn_layers}</td>'
                 f'<td><code>{_e(r.path)}</code></td>')
    err = f'<br><span class="down">{_e(v.error)}</span>' if v.error else ""
    return f"<tr><td><a href=\"#m-{_e(v.name)}\">{_e(v.name)}</a>{err}</td><td>{status}</td>" \
           f"{cells}</tr>"


def chart(v: ModelView) -> str:
    """Bars of dead (dark) over near-dead (light) fraction per layer, in file order."""
    r = v.report
    if r is None or not r.bn_layers:
        return ""
    layers = r.bn_layers[:MAX_BARS]
    width, height, gap = 6, 80, 1
    w = max(200, len(layers) * (width + gap))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height + 2}" '
             f'role="img" aria-label="dead fraction per layer of {_e(v.name)}">',
             f'<rect x="0" y="0" width="{w}" height="{height}" fill="#fafafa" '
             'stroke="#ddd"/>']
    for i, layer in enumerate(layers):
        x = i * (width + gap)
        near = min(1.0, layer.dead_ratio + layer.near_dead_ratio)
        tip = (f"{layer.name}: {len(layer.dead)}/{layer.channels} dead, "
               f"{len(layer.near_dead)} near-dead, consumer {layer.consumer}")
        parts.append(f"<g><title>{_e(tip)}</title>"
                     f'<rect x="{x}" y="{height * (1 - near):.1f}" width="{width}" '
                     f'height="{height * near:.1f}" fill="#f2b8a0"/>'
                     f'<rect x="{x}" y="{height * (1 - layer.dead_ratio):.1f}" '
                     f'width="{width}" height="{height * layer.dead_ratio:.1f}" fill="#b3261e"/>'
                     "</g>")
    parts.append("</svg>")
    more = (f'<p class="muted">first {MAX_BARS} of {len(r.bn_layers)} layers</p>'
            if len(r.bn_layers) > MAX_BARS else "")
    return "".join(parts) + more


def _watcher(w: WatcherView) -> str:
    how = "polling" if w.polling else "inotify"
    dead = "" if w.up else ' <span class="down">DEAD</span>'
    return f'<li><code>{_e(w.root)}</code>: {how}{dead} <span class="muted">{_e(w.why)}</span></li>'


def render(snap: Snapshot, now: float | None = None) -> str:
    now = time.time() if now is None else now
    views = [snap.models[k] for k in sorted(snap.models)]
    rows = "".join(_row(v, now) for v in views)
    worst = sorted((v for v in views if v.report is not None and v.report.bn_layers),
                   key=lambda v: (-v.report.summary.dead_ratio, v.name))  # type: ignore[union-attr]
    charts = "".join(f'<h2 id="m-{_e(v.name)}">{_e(v.name)}</h2>{chart(v)}'
                     for v in worst[:MAX_CHARTS])
    if len(worst) > MAX_CHARTS:
        charts += f'<p class="muted">charts for the {MAX_CHARTS} worst models only</p>'
    watchers = "".join(_watcher(w) for w in sorted(snap.watchers.values(),
                                                       key=lambda w: w.root))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bnexporter</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style>
</head><body>
<h1>bnexporter <span class="muted">{_e(__version__)}</span></h1>
<p><a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a> ·
{len(views)} models · {snap.queue_pending} waiting for analysis ·
analyses: {snap.analyses.get('success', 0)} ok, {snap.analyses.get('error', 0)} failed</p>
<table><thead><tr><th>model</th><th>status</th><th>step</th><th>age</th><th>dead</th>
<th>near-dead</th><th>channels / BN layers</th><th>checkpoint</th></tr></thead>
<tbody>{rows}</tbody></table>
<p class="muted">Bars: dead (dark) and near-dead (light) fraction of each BN layer's
channels, in file order; hover a bar for the layer name.</p>
{charts}
<h2>watchers</h2><ul>{watchers}</ul>
</body></html>
"""
