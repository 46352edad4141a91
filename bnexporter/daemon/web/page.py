"""The HTML of one model: what the daemon serves at ``/model/<name>`` and what
``bnexporter scan --html`` writes to a file.

Plain HTML and inline SVG, one stylesheet whose hash the Content-Security-Policy
names, no scripts, no external assets: the page works without JavaScript, opens
offline and every name from a file or folder is HTML-escaped. Colours are the
Okabe-Ito set (dead: vermillion, near-dead: orange) and a viridis ramp for the
heatmap, so they stay apart with every common colour-vision deficiency; every chart
has a text equivalent (an ``aria-label`` summary and a table under ``<details>``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Sequence
from datetime import datetime, timezone

from bnexporter import __version__
from bnexporter.daemon.history import History, Point, rate_per_1000_steps
from bnexporter.detection.prune import PrunePlan
from bnexporter.report import CHANNEL_CLASSES, RELU_LIKE, CheckpointReport, LayerReport

DEAD, NEAR, OK, GRID = "#d55e00", "#e69f00", "#0072b2", "#d9d9d9"
# viridis, light (a few dead) to dark (all dead); exactly 0 is the neutral ZERO
RAMP = ("#fde725", "#b5de2b", "#6ece58", "#35b779", "#1f9e89", "#26828e", "#31688e",
        "#3e4989", "#482878", "#440154")
ZERO, ABSENT = "#f2f2f2", "#ffffff"
MAX_HEAT_COLUMNS = 64
MAX_INDICES = 24      # channel indices shown per cell before "+N more"

CSS = """
:root{--dead:#d55e00;--near:#e69f00;--ok:#0072b2;--muted:#5f6368;--line:#dadce0}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#202124;
background:#fff}
header{background:#202124;color:#fff;padding:.7em 1.2em;display:flex;flex-wrap:wrap;gap:.4em 1.4em;
align-items:baseline}
header h1{font-size:1.15em;margin:0}header a{color:#8ab4f8}header .v{color:#bdc1c6;font-size:.85em}
main{padding:0 1.2em 2em;max-width:1500px}
h2{font-size:1.2em;margin:1.6em 0 .4em}h3{font-size:1.02em;margin:1.2em 0 .3em}
a{color:#1a5fb4}code{font-size:.9em;word-break:break-all}
.muted{color:var(--muted)}.small{font-size:.86em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.92em}
th,td{padding:.28em .6em;text-align:left;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#f8f9fa;position:sticky;top:0;font-weight:600;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.hot td{background:#fff4ec}tr.warm td{background:#fffaf0}
.badge{display:inline-block;padding:0 .5em;border-radius:.7em;font-size:.85em;font-weight:600}
.up{background:#e6f4ea;color:#0d652d}.down{background:#fce8e6;color:#a50e0e}
.dead{color:var(--dead);font-weight:600}.near{color:#8a5a00}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(11.5em,1fr));gap:.7em;
margin:.8em 0}
.card{border:1px solid var(--line);border-radius:8px;padding:.55em .8em}
.card .k{font-size:.8em;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.card .val{font-size:1.45em;font-weight:650;font-variant-numeric:tabular-nums}
.alert{border-left:5px solid var(--dead);background:#fff4ec;padding:.6em .9em;margin:1em 0}
.calm{border-left:5px solid var(--ok);background:#eef5fb;padding:.6em .9em;margin:1em 0}
.err{border-left:5px solid #a50e0e;background:#fce8e6;padding:.5em .9em;margin:.6em 0}
.legend{display:flex;flex-wrap:wrap;gap:.3em 1em;align-items:center;font-size:.85em;margin:.3em 0}
.sw{display:inline-block;width:1.1em;height:.8em;vertical-align:-.05em;border:1px solid #bbb}
td code{white-space:nowrap}
details{margin:.4em 0 1em}summary{cursor:pointer;color:#1a5fb4}
svg text{font-family:system-ui,sans-serif}
figure{margin:.4em 0}figcaption{font-size:.86em;color:var(--muted)}
@media (max-width:700px){body{font-size:14px}main{padding:0 .6em 1.5em}
.cards{grid-template-columns:repeat(2,1fr)}th,td{padding:.22em .4em}.wide{display:none}}
"""
# hex swatches for the legend: classes, since the CSP allows no inline styles
for _i, _c in enumerate((*RAMP, ZERO, DEAD, NEAR, OK)):
    CSS += f".c{_i}{{background:{_c}}}"
_SW = {c: f"c{i}" for i, c in enumerate((*RAMP, ZERO, DEAD, NEAR, OK))}

CSP = ("default-src 'none'; style-src 'sha256-"
       + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
       + "'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = (("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
           ("Referrer-Policy", "no-referrer"))


def e(value: object) -> str:
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


def clock(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def when(t: float | None, now: float) -> str:
    """``<time>`` with the age as text and the absolute UTC time as its title."""
    if t is None:
        return "-"
    iso = datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
    return f'<time datetime="{iso}" title="{e(clock(t))}">{age(now - t)} ago</time>'


def pct(x: float) -> str:
    return f"{100 * x:.1f} %" if x < 0.1 and x != 0 else f"{100 * x:.0f} %" if x else "0 %"


def step_text(step: int | None) -> str:
    return "?" if step is None else f"{step:,}"


def heat_colour(fraction: float | None) -> str:
    if fraction is None:
        return ABSENT
    if fraction <= 0:
        return ZERO
    return RAMP[min(len(RAMP) - 1, int(fraction * len(RAMP)))]


def document(title: str, body: str, refresh: int | None = None, nav: str = "") -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    note = (f'<span class="v">refreshes every {refresh} s</span>' if refresh else
            f'<span class="v">written {e(clock(time.time()))}</span>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">{meta}
<meta name="referrer" content="no-referrer"><style>{CSS}</style></head><body>
<header><h1>bnexporter</h1><span class="v">{e(__version__)}</span>{nav}{note}</header>
<main>{body}</main></body></html>
"""


# -- charts ----------------------------------------------------------------------------
def sparkline(points: Sequence[Point], width: int = 120, height: int = 28,
              label: str = "") -> str:
    """Dead (solid vermillion) and dead + near-dead (dashed orange) ratio over the history."""
    if not points:
        return ""
    top = max(0.05, max(p.dead_ratio + p.near_dead_ratio for p in points))
    n = len(points)

    def path(values: list[float]) -> str:
        if n == 1:
            y = height - 2 - (height - 4) * values[0] / top
            return f"M0 {y:.1f} L{width} {y:.1f}"
        return " ".join(f"{'M' if i == 0 else 'L'}{i * width / (n - 1):.1f} "
                        f"{height - 2 - (height - 4) * v / top:.1f}"
                        for i, v in enumerate(values))

    dead = [p.dead_ratio for p in points]
    both = [p.dead_ratio + p.near_dead_ratio for p in points]
    first, last = points[0], points[-1]
    text = (f"{label}dead {pct(first.dead_ratio)} at step {step_text(first.step)} to "
            f"{pct(last.dead_ratio)} at step {step_text(last.step)}; dead or near-dead "
            f"{pct(both[0])} to {pct(both[-1])}, over {n} checkpoints")
    return (f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} '
            f'{height}" role="img" aria-label="{e(text)}"><title>{e(text)}</title>'
            f'<line x1="0" y1="{height - 1}" x2="{width}" y2="{height - 1}" stroke="{GRID}"/>'
            f'<path d="{path(both)}" fill="none" stroke="{NEAR}" stroke-width="1.5" '
            f'stroke-dasharray="3 2"/>'
            f'<path d="{path(dead)}" fill="none" stroke="{DEAD}" stroke-width="2"/></svg>')


def _heat_points(history: History) -> list[Point]:
    return list(history.points[-MAX_HEAT_COLUMNS:])


def heatmap(report: CheckpointReport, history: History, compact: bool = False) -> str:
    """Dead fraction per layer (rows, model order) over the analyses kept (columns)."""
    layers = report.bn_layers
    points = _heat_points(history)
    if not layers or not points:
        return ""
    cols = len(points)
    row_h = 6 if compact else (12 if len(layers) <= 80 else 8)
    cell_w = max(5, min(22, (560 if compact else 860) // max(cols, 1)))
    label_w = 0 if compact else min(260, 7 * max(len(x.name) for x in layers) + 10)
    top = 4
    grid_w = cols * cell_w
    h = top + row_h * len(layers) + 34
    w = label_w + grid_w + 8
    columns = [p.dead for p in points]
    parts = [f'<svg class="heat" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-labelledby="heat-title">']
    first, last = points[0], points[-1]
    dying = sum(1 for x in layers if x.dead)
    summary = (f"Heatmap of the dead fraction of {len(layers)} BN layers over {cols} checkpoints"
               f" (steps {step_text(first.step)} to {step_text(last.step)}); {dying} layers "
               "have dead channels now. The same numbers are in the table below it.")
    parts.append(f'<title id="heat-title">{e(summary)}</title>')
    for r, layer in enumerate(layers):
        y = top + r * row_h
        if not compact:
            cls = ' fill="#a33a00" font-weight="600"' if layer.dead else ' fill="#3c4043"'
            parts.append(f'<text x="{label_w - 6}" y="{y + row_h - 2.5}" font-size='
                         f'"{min(11, row_h - 1)}" text-anchor="end"{cls}>{e(layer.name)}</text>')
        for c, dead in enumerate(columns):
            d = dead.get(layer.name)
            frac = None if d is None else d / layer.channels if layer.channels else 0.0
            tip = (f"{layer.name}, step {step_text(points[c].step)}: "
                   + ("absent" if d is None else f"{d}/{layer.channels} dead"))
            parts.append(f'<rect x="{label_w + c * cell_w}" y="{y}" width="{cell_w - 1}" '
                         f'height="{row_h - 1}" fill="{heat_colour(frac)}"><title>{e(tip)}'
                         '</title></rect>')
    # x axis: steps at a few ticks
    ay = top + row_h * len(layers) + 4
    parts.append(f'<line x1="{label_w}" y1="{ay}" x2="{label_w + grid_w}" y2="{ay}" '
                 'stroke="#9aa0a6"/>')
    ticks = sorted({0, cols - 1, *range(0, cols, max(1, cols // (3 if compact else 6)))})
    last_x = -100.0
    for c in ticks:
        x = label_w + c * cell_w + cell_w / 2
        if x - last_x < 48 and c != cols - 1:
            continue
        if c == cols - 1 and x - last_x < 48 and last_x > 0:
            parts.pop()
            parts.pop()
        last_x = x
        anchor = "end" if c == cols - 1 and cols > 1 else "middle" if c else "start"
        parts.append(f'<line x1="{x}" y1="{ay}" x2="{x}" y2="{ay + 4}" stroke="#9aa0a6"/>')
        parts.append(f'<text x="{x}" y="{ay + 15}" font-size="10.5" text-anchor="{anchor}" '
                     f'fill="#3c4043">{e(step_text(points[c].step))}</text>')
    parts.append(f'<text x="{label_w + grid_w / 2}" y="{ay + 28}" font-size="10.5" '
                 'text-anchor="middle" fill="#5f6368">training step of the checkpoint</text>')
    parts.append("</svg>")
    return "".join(parts)


def heat_legend() -> str:
    steps = "".join(f'<span class="sw {_SW[c]}"></span>' for c in RAMP)
    return (f'<div class="legend"><span><span class="sw {_SW[ZERO]}"></span> no dead channel'
            f'</span><span>dead fraction: 0 {steps} 100 %</span>'
            '<span class="muted">one row per BN layer (model order), one column per '
            'checkpoint</span></div>')


def heat_table(report: CheckpointReport, history: History) -> str:
    """The heatmap's text equivalent: dead channels per layer and checkpoint."""
    points = _heat_points(history)
    if not points:
        return ""
    shown = points if len(points) <= 16 else [*points[:: max(1, len(points) // 15)][:-1],
                                              points[-1]]
    head = "".join(f'<th class="n">{e(step_text(p.step))}</th>' for p in shown)
    dead = [p.dead for p in shown]
    rows = "".join(
        f"<tr><td><code>{e(x.name)}</code></td>"
        + "".join(f'<td class="n">{"-" if (v := d.get(x.name)) is None else v}</td>'
                  for d in dead) + "</tr>"
        for x in report.bn_layers)
    more = "" if shown is points else f" ({len(shown)} of the {len(points)} checkpoints)"
    return (f"<details><summary>Heatmap as a table: dead channels per layer and step{more}"
            f'</summary><div class="scroll"><table><thead><tr><th>layer</th>{head}</tr>'
            f"</thead><tbody>{rows}</tbody></table></div></details>")


def bar(layer: LayerReport, width: int = 90) -> str:
    dead, near = layer.dead_ratio, layer.near_dead_ratio
    text = f"{len(layer.dead)} of {layer.channels} dead, {len(layer.near_dead)} near-dead"
    return (f'<svg width="{width}" height="10" role="img" aria-label="{e(text)}">'
            f'<rect width="{width}" height="10" fill="#eceff1"/>'
            f'<rect width="{width * dead:.1f}" height="10" fill="{DEAD}"/>'
            f'<rect x="{width * dead:.1f}" width="{width * near:.1f}" height="10" '
            f'fill="{NEAR}"/></svg>')


# -- sections ------------------------------------------------------------------------
def indices(ix: Sequence[int]) -> str:
    if not ix:
        return ""
    shown = ", ".join(str(i) for i in ix[:MAX_INDICES])
    more = f" <span class=\"muted\">+{len(ix) - MAX_INDICES} more</span>" \
        if len(ix) > MAX_INDICES else ""
    return f"{shown}{more}"


def since_text(history: History, layer: LayerReport) -> str:
    ch = history.change(layer.name)
    if not layer.dead or ch.since is None:
        return ""
    return ("" if ch.since_exact else "&le; ") + step_text(ch.since)


def decided_by(report: CheckpointReport) -> str:
    s = report.summary
    by: dict[str, int] = {}
    for x in report.bn_layers:
        by[x.evidence] = by.get(x.evidence, 0) + 1
    names = {"estimate": "weights-only estimate", "census:sample": "census over your sample",
             "census:distilled": "census over distilled inputs"}
    how = ", ".join(f"{names.get(k, k)} ({n} layers)" if len(by) > 1 else names.get(k, k)
                    for k, n in sorted(by.items())) or "weights-only estimate"
    refined = sum(1 for x in report.bn_layers if x.producer and x.evidence == "estimate")
    extra = f", refined from the producer kernel for {refined} layers" if refined else ""
    return (f"{how}{extra}; consumer known or inferred for {pct(s.consumer_coverage)} "
            "of BN layers")


def verdict(report: CheckpointReport, history: History) -> str:
    s = report.summary
    newly = history.newly_dead
    layers_new = sum(1 for x in report.bn_layers if history.change(x.name).newly_dead)
    rate = rate_per_1000_steps(history)
    speed = f"; {rate:+.2f} points per 1,000 steps over the history" if rate is not None \
        else ""
    dying = [x for x in report.bn_layers if x.dead]
    if not s.dead and not s.near_dead:
        return (f'<div class="calm"><strong>No dead or near-dead channel</strong> in '
                f"{s.bn_layers} BN layers at step {step_text(report.step)}.</div>")
    starts = [st for x in dying if (st := history.change(x.name).since) is not None]
    first = min(starts, default=None)
    since = f", the first since step {step_text(first)}" if first is not None else ""
    new = (f" <strong>{newly} channels newly dead</strong> in {layers_new} layers since the "
           "previous checkpoint." if newly else " No channel newly dead since the previous "
           "checkpoint.")
    back = f" {history.revived} came back." if history.revived else ""
    return (f'<div class="alert"><strong class="dead">{pct(s.dead_ratio)} of ReLU-fed channels'
            f" dead</strong> ({s.dead} of {s.relu_channels}) in {len(dying)} of "
            f"{s.bn_layers} BN layers{since}{speed}.{new}{back} Near-dead: {s.near_dead} "
            f"({pct(s.near_dead_ratio)}).</div>")


def cards(report: CheckpointReport, history: History, now: float,
          analysed_at: float | None) -> str:
    s = report.summary
    items = [("step", step_text(report.step)),
             ("dead", f'<span class="dead">{pct(s.dead_ratio)}</span>'),
             ("near-dead", f'<span class="near">{pct(s.near_dead_ratio)}</span>'),
             ("newly dead", str(history.newly_dead)),
             ("checkpoint written", when(report.mtime, now)),
             ("analysed", when(analysed_at, now) if analysed_at else "-")]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{k}</div><div class="val">{v}</div></div>'
        for k, v in items) + "</div>"


def dying_table(report: CheckpointReport, history: History, limit: int = 12) -> str:
    rows = [x for x in report.bn_layers if x.dead or history.change(x.name).newly_dead]
    if not rows:
        return ""
    rows.sort(key=lambda x: (-len(history.change(x.name).newly_dead), -x.dead_ratio))
    body = []
    for x in rows[:limit]:
        ch = history.change(x.name)
        rate = rate_per_1000_steps(history, x.name)
        body.append(
            f'<tr><td><a href="#l-{e(x.name)}"><code>{e(x.name)}</code></a></td>'
            f'<td class="n">{len(x.dead)} / {x.channels}</td><td>{bar(x)}</td>'
            f'<td class="n">{since_text(history, x)}</td>'
            f'<td class="n">{"+" + str(len(ch.newly_dead)) if ch.newly_dead else ""}</td>'
            f'<td class="n">{"" if rate is None else f"{rate:+.1f}"}</td></tr>')
    more = (f'<p class="muted small">{len(rows) - limit} more layers with dead channels in '
            "the full table</p>" if len(rows) > limit else "")
    return ("<h2>Dying layers</h2>"
            '<div class="scroll"><table><thead><tr><th>layer</th><th class="n">dead</th>'
            '<th>dead / near-dead</th><th class="n">dead since step</th>'
            '<th class="n">newly dead</th><th class="n">channels / 1,000 steps</th></tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>{more}")


_CLASS_HEAD = {"dead": "dead", "near_dead": "near-dead", "would_be_dead": "would be dead",
               "collapsed_gamma": "collapsed &gamma;", "dead_input": "dead input",
               "constant": "constant", "saturated": "saturated"}


def layer_table(report: CheckpointReport, history: History) -> str:
    classes = [c for c, _ in CHANNEL_CLASSES]
    head = "".join(f'<th class="n" title="{e(doc)}">{_CLASS_HEAD.get(c, e(c))}</th>'
                   for c, doc in CHANNEL_CLASSES)
    rows = []
    for i, x in enumerate(report.bn_layers):
        ch = history.change(x.name)
        hot = "hot" if x.dead else "warm" if x.near_dead else ""
        counts = "".join(f'<td class="n">{len(x.classes.get(c, ())) or ""}</td>'
                         for c in classes)
        consumer = e(x.consumer)
        if x.consumer not in RELU_LIKE:
            consumer = f'<span class="muted">{consumer}</span>'
        rows.append(
            f'<tr id="l-{e(x.name)}" class="{hot}"><td class="n muted">{i + 1}</td>'
            f"<td><code>{e(x.name)}</code>"
            + (' <span class="muted small">(never updated)</span>' if x.never_updated else "")
            + f'</td><td>{consumer} <span class="muted small wide">{e(x.consumer_source)}'
            f'</span></td><td class="n">{x.channels}</td>{counts}<td>{bar(x, 60)}</td>'
            f'<td class="n">{since_text(history, x)}</td>'
            f'<td class="small">{indices(ch.newly_dead)}</td>'
            f'<td class="small">{indices(ch.revived)}</td></tr>')
    return ('<div class="scroll"><table class="layers"><thead><tr><th class="n">#</th>'
            '<th>BN layer</th><th>consumer</th><th class="n">channels</th>'
            f'{head}<th>dead / near-dead</th><th class="n">dead since step</th>'
            "<th>newly dead (channel indices)</th><th>came back</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def prune_table(plan: PrunePlan | None) -> str:
    if plan is None:
        return ""
    rows = [p for p in plan.layers if p.remove or p.fold or p.tied]
    if not rows:
        return '<p class="muted">Nothing to remove: no dead or constant channel.</p>'
    body = "".join(
        f"<tr><td><code>{e(p.layer)}</code></td><td class=\"n\">{len(p.remove) or ''}</td>"
        f"<td class=\"n\">{len(p.fold) or ''}</td><td class=\"n\">{len(p.tied) or ''}</td>"
        f'<td class="n">{p.params_saved:,}</td>'
        f"<td class=\"small\">{e(', '.join(p.next_layers)) or '-'} "
        f'<span class="muted">({e(p.next_source)})</span></td>'
        f"<td class=\"small\">{e('; '.join(p.notes))}</td></tr>" for p in rows)
    notes = "".join(f"<li>{e(n)}</li>" for n in plan.notes)
    return (f"<p><strong>{plan.channels_removable} channels</strong> can be removed or folded, "
            f"saving <strong>{plan.params_saved:,} parameters</strong>. Remove: the producing "
            "filter, the BN channel and the next layer's input slice of a dead channel. Fold: "
            "a constant channel's value goes into the next layer's bias. Tied: the channel "
            "feeds a residual sum and is shared by the whole group.</p>"
            '<div class="scroll"><table><thead><tr><th>BN layer</th><th class="n">remove</th>'
            '<th class="n">fold</th><th class="n">tied</th><th class="n">parameters saved</th>'
            "<th>next layers</th><th>notes</th></tr></thead>"
            f'<tbody>{body}</tbody></table></div><ul class="small muted">{notes}</ul>')


def tensor_table(report: CheckpointReport) -> str:
    bad = [t for t in report.tensors if t.anomaly or t.nonfinite or t.dead_filters]
    if not bad:
        scanned = "BN tensors only were scanned" if report.bn_only else \
            f"{report.summary.tensors} tensors scanned"
        return f'<p class="muted">No tensor with an anomaly ({scanned}).</p>'
    rows = "".join(
        f"<tr><td><code>{e(t.name)}</code></td><td>{e(t.role)}</td>"
        f"<td>{e(t.anomaly or ('non-finite' if t.nonfinite else 'zero filters'))}</td>"
        f'<td class="n">{t.nonfinite or ""}</td><td class="n">{t.max_abs:.3g}</td>'
        f"<td class=\"small\">{e(t.anomaly_detail or '')}"
        f"{(' filters ' + indices(t.dead_filters)) if t.dead_filters else ''}</td></tr>"
        for t in bad[:100])
    return ('<div class="scroll"><table><thead><tr><th>tensor</th><th>role</th><th>anomaly'
            '</th><th class="n">NaN/Inf</th><th class="n">max |w|</th><th>detail</th></tr>'
            f"</thead><tbody>{rows}</tbody></table></div>")


def errors_block(error: str | None, errors: dict[str, int] | None = None) -> str:
    out = f'<div class="err"><strong>Newest checkpoint unreadable:</strong> {e(error)}</div>' \
        if error else ""
    if errors:
        out += ('<p class="small">Checkpoints given up on, by reason: '
                + ", ".join(f"<code>{e(k)}</code> {v}" for k, v in sorted(errors.items()))
                + "</p>")
    return out


def model_body(name: str, report: CheckpointReport | None, history: History,
               plan: PrunePlan | None, now: float, *, up: bool = True,
               error: str | None = None, errors: dict[str, int] | None = None,
               analysed_at: float | None = None, folder: str | None = None) -> str:
    status = '<span class="badge up">up</span>' if up else \
        '<span class="badge down">DOWN</span>'
    out = [f'<h2 id="m-{e(name)}">{e(name)} {status}</h2>']
    if folder:
        out.append(f'<p class="small muted">watching <code>{e(folder)}</code></p>')
    out.append(errors_block(error, errors))
    if report is None:
        out.append('<p class="muted">No checkpoint analysed yet.</p>')
        return "".join(out)
    out.append(cards(report, history, now, analysed_at))
    out.append(verdict(report, history))
    out.append(f'<p class="small">{sparkline(history.points, 160, 30)} '
               f'<span class="muted">dead (solid) and dead + near-dead (dashed) share of '
               f"ReLU-fed channels over the last {len(history.points)} checkpoints. Decided "
               f"by: {e(decided_by(report))}.</span></p>")
    out.append(f'<p class="small muted">checkpoint <code>{e(report.path)}</code>, format '
               f"{e(report.format)}, {report.summary.bn_layers} BN layers, "
               f"{report.summary.channels:,} channels, written {e(clock(report.mtime))}, "
               f"analysed in {report.duration_seconds:.2f} s</p>")
    out.append(dying_table(report, history))
    out.append("<h2>Dead fraction per layer over time</h2>")
    out.append(heat_legend())
    out.append(f'<figure><div class="scroll">{heatmap(report, history)}</div><figcaption>'
               "Each cell: the share of the layer's channels that were dead at that "
               "checkpoint (hover for the count).</figcaption></figure>")
    out.append(heat_table(report, history))
    out.append("<h2>Every BN layer, in model order</h2>")
    out.append(f'<div class="legend"><span><span class="sw {_SW[DEAD]}"></span> dead</span>'
               f'<span><span class="sw {_SW[NEAR]}"></span> near-dead</span><span '
               'class="muted">dead since: the step from which the layer has had dead channels '
               "without a break (&le;: already at the first checkpoint kept); newly dead: "
               "since the previous checkpoint</span></div>")
    out.append(layer_table(report, history))
    out.append("<h2>Prune plan</h2>")
    out.append(prune_table(plan))
    out.append("<h2>Tensors with anomalies</h2>")
    out.append(tensor_table(report))
    if report.notes:
        out.append('<ul class="small muted">' + "".join(f"<li>{e(n)}</li>"
                                                        for n in report.notes[:10]) + "</ul>")
    return "".join(out)


# -- the file ``bnexporter scan --html`` writes ----------------------------------------
def _series_name(reports: Sequence[CheckpointReport]) -> str:
    import os
    folders = {os.path.basename(os.path.dirname(os.path.abspath(r.path))) for r in reports}
    if len(reports) > 1 and len(folders) == 1:
        return folders.pop() or reports[-1].path
    return os.path.basename(reports[-1].path)


def html_report(reports: Sequence[CheckpointReport],
                plans: Sequence[PrunePlan | None] | None = None,
                now: float | None = None) -> str:
    """One self-contained page: a section per model (checkpoints with the same BN
    layers are one series, in step order, so several give the heatmap); unreadable
    files are listed with their reason."""
    now = time.time() if now is None else now
    plan_of = {id(r): p for r, p in zip(reports, plans or [None] * len(reports), strict=True)}
    groups: dict[tuple[str, ...], list[CheckpointReport]] = {}
    for r in reports:
        if r.ok:
            groups.setdefault(tuple(x.name for x in r.bn_layers), []).append(r)
    sections = []
    for series in groups.values():
        series.sort(key=lambda r: (r.step is None, r.step or 0, r.mtime or 0.0))
        history = History()
        for r in series:
            history = history.add(r, r.mtime or now, limit=max(len(series), 1))
        newest = series[-1]
        sections.append(model_body(_series_name(series), newest, history, plan_of[id(newest)],
                                   now, analysed_at=None))
    bad = [r for r in reports if not r.ok]
    if bad:
        sections.append("<h2>Unreadable checkpoints</h2>" + "".join(
            f'<div class="err"><code>{e(r.path)}</code>: {e(r.error)} '
            f'<span class="muted">[{e(r.error_reason)}]</span></div>' for r in bad))
    toc = ""
    if len(groups) > 1:
        toc = "<p>" + " &middot; ".join(
            f'<a href="#m-{e(_series_name(s))}">{e(_series_name(s))}</a>'
            for s in groups.values()) + "</p>"
    n = len(reports)
    return document(f"bnexporter report: {n} checkpoint{'s' if n != 1 else ''}",
                    toc + "".join(sections))
