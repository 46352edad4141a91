"""The ``/`` page (every model at a glance) and ``/model/<name>`` (one model in full).

The overview has a row per model: status, step, when its checkpoint was written, the
dead and near-dead share with a sparkline over the history, what is newly dead,
the worst layers and what decided it; then, for the worst models, the dying layers
and the heatmap. The HTML itself is in ``page.py`` (no scripts, no external assets,
a strict CSP, every name escaped); the page reloads itself every ``REFRESH`` seconds.
"""

from __future__ import annotations

import time
from urllib.parse import quote

from bnexporter.daemon.state import ModelView, Snapshot, WatcherView
from bnexporter.daemon.web.page import (
    age,
    decided_by,
    document,
    dying_table,
    e,
    heat_legend,
    heatmap,
    model_body,
    pct,
    sparkline,
    step_text,
    when,
)

MAX_CHARTS = 6         # models shown with dying layers and heatmap (the worst first)
REFRESH = 10           # seconds between reloads of the page

__all__ = ["MAX_CHARTS", "age", "model_page", "model_url", "render"]


def model_url(name: str) -> str:
    return "/model/" + quote(name, safe="")


def _row(v: ModelView, now: float) -> str:
    r = v.report
    status = '<span class="badge up">up</span>' if v.up else \
        '<span class="badge down">DOWN</span>'
    link = f'<a href="{e(model_url(v.name))}"><strong>{e(v.name)}</strong></a>'
    err = f'<div class="small dead">{e(v.error)}</div>' if v.error else ""
    if r is None:
        return (f"<tr><td>{link}{err}</td><td>{status}</td>"
                '<td colspan="7" class="muted">no checkpoint analysed yet</td></tr>')
    s, h = r.summary, v.history
    worst = ", ".join(f"<code>{e(x.name)}</code> {len(x.dead)}/{x.channels}"
                      for x in r.worst_layers(3) if x.dead)
    newly = h.newly_dead
    return (f"<tr><td>{link}{err}</td><td>{status}</td>"
            f'<td class="n">{e(step_text(r.step))}</td>'
            f'<td class="n">{when(r.mtime, now)}</td>'
            f'<td class="n"><span class="dead">{pct(s.dead_ratio)}</span> '
            f'<span class="muted small">{s.dead}</span></td>'
            f'<td class="n"><span class="near">{pct(s.near_dead_ratio)}</span> '
            f'<span class="muted small">{s.near_dead}</span></td>'
            f"<td>{sparkline(h.points, 110, 24, f'{v.name}: ')}</td>"
            f'<td class="n">{"+" + str(newly) if newly else "0"}</td>'
            f'<td class="small">{worst or "-"}<div class="muted wide">'
            f"{e(decided_by(r))}</div></td></tr>")


def _card(v: ModelView) -> str:
    r = v.report
    assert r is not None
    return (f'<h2 id="m-{e(v.name)}"><a href="{e(model_url(v.name))}">{e(v.name)}</a> '
            f'<span class="muted small">step {e(step_text(r.step))}, '
            f"{pct(r.summary.dead_ratio)} dead</span></h2>"
            + dying_table(r, v.history, limit=6)
            + f'<div class="scroll">{heatmap(r, v.history, compact=True)}</div>'
            + f'<p class="small"><a href="{e(model_url(v.name))}">every layer by name, the '
            "heatmap with labels, the prune plan and the anomalous tensors</a></p>")


def _watcher(w: WatcherView) -> str:
    how = "polling" if w.polling else "inotify"
    dead = "" if w.up else ' <span class="badge down">DEAD</span>'
    return f'<li><code>{e(w.root)}</code>: {how}{dead} <span class="muted">{e(w.why)}</span></li>'


def _nav(snap: Snapshot) -> str:
    return ('<a href="/">overview</a><a href="/metrics">/metrics</a>'
            '<a href="/healthz">/healthz</a>'
            f'<span class="v">{len(snap.models)} models, {snap.queue_pending} waiting, '
            f"analyses {snap.analyses.get('success', 0)} ok / "
            f"{snap.analyses.get('error', 0)} failed</span>")


def render(snap: Snapshot, now: float | None = None) -> str:
    now = time.time() if now is None else now
    views = [snap.models[k] for k in sorted(snap.models)]
    rows = "".join(_row(v, now) for v in views)
    worst = sorted((v for v in views if v.report is not None and v.report.bn_layers),
                   key=lambda v: (-v.report.summary.dead_ratio, v.name))  # type: ignore[union-attr]
    cards = "".join(_card(v) for v in worst[:MAX_CHARTS])
    if len(worst) > MAX_CHARTS:
        cards += (f'<p class="muted">details for the {MAX_CHARTS} worst models here; every '
                  "model has its own page (the links above)</p>")
    if cards:
        cards = heat_legend() + cards
    watchers = "".join(_watcher(w) for w in sorted(snap.watchers.values(),
                                                       key=lambda w: w.root))
    body = f"""<h2>Models</h2>
<div class="scroll"><table><thead><tr><th>model</th><th>status</th><th class="n">step</th>
<th class="n">checkpoint written</th><th class="n">dead</th><th class="n">near-dead</th>
<th>trend</th><th class="n">newly dead</th><th>worst layers &middot; decided by</th></tr></thead>
<tbody>{rows}</tbody></table></div>
<p class="small muted">Dead / near-dead: share of the channels of BN layers that feed a ReLU.
Trend: dead (solid) and dead + near-dead (dashed) over the checkpoints kept. Newly dead:
channels dead now that were not at the previous checkpoint. Checkpoint written: the file's
modification time.</p>
{cards}
<h2>Watchers</h2><ul>{watchers}</ul>"""
    return document("bnexporter", body, REFRESH, _nav(snap))


def model_page(snap: Snapshot, name: str, now: float | None = None) -> str | None:
    """The page of one model, or None when the daemon does not watch it."""
    v = snap.models.get(name)
    if v is None:
        return None
    now = time.time() if now is None else now
    body = model_body(v.name, v.report, v.history, v.prune, now, up=v.up, error=v.error,
                      errors=dict(v.errors), analysed_at=v.analysed_at, folder=v.folder)
    return document(f"{v.name} - bnexporter", body, REFRESH, _nav(snap))
