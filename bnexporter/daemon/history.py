"""The last analyses of one model: what answers "since when?" and "how fast?".

Per model the daemon keeps the last ``LIMIT`` analyses (a ``Point`` each: step,
checkpoint time, analysis time, the model's dead / near-dead ratio and per BN layer
the dead and near-dead counts) and, from the newest two, per layer:

- ``since``: the step from which the layer has had dead channels without a break
  (``since_exact`` is False when it already had some at the first analysis kept:
  then the truth is "at or before ``since``");
- ``newly_dead``: channel indices dead now and not dead in the previous analysis;
- ``revived``: channel indices dead in the previous analysis and not now.

Memory, per model: each point costs ~190 bytes plus 4 bytes per BN layer (two
uint16 counts; uint32 when a layer has more than 65,535 channels), the layer-name
tuple is shared by all points while the layers stay the same, and the previous
analysis' dead indices are the lists of the report the view holds anyway. A
150-layer model with ``LIMIT = 64`` points: 64 x (190 + 600) B ~ 50 KB; 1,000 such
models ~ 50 MB. A step lower than the newest point's (a restarted run) starts a new
history; the same checkpoint analysed again replaces its point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from bnexporter.report import CheckpointReport

LIMIT = 64  # analyses kept per model


@dataclass(frozen=True)
class Point:
    step: int | None
    mtime: float | None          # when the checkpoint file was written
    analysed_at: float           # when its analysis finished
    dead_ratio: float
    near_dead_ratio: float
    layers: tuple[str, ...]      # BN layer names, model order (shared between points)
    counts: bytes                # dead counts per layer, then near-dead counts (uint16/32)
    wide: bool = False           # counts are uint32

    def _array(self) -> np.ndarray:
        return np.frombuffer(self.counts, np.uint32 if self.wide else np.uint16)

    @property
    def dead(self) -> dict[str, int]:
        a = self._array()
        return dict(zip(self.layers, (int(x) for x in a[: len(self.layers)]), strict=True))

    @property
    def near_dead(self) -> dict[str, int]:
        a = self._array()
        return dict(zip(self.layers, (int(x) for x in a[len(self.layers):]), strict=True))

    @classmethod
    def of(cls, report: CheckpointReport, analysed_at: float,
           layers: tuple[str, ...]) -> Point:
        dead = [len(layer.dead) for layer in report.bn_layers]
        near = [len(layer.near_dead) for layer in report.bn_layers]
        wide = max([*dead, *near, 0]) > 0xFFFF
        counts = np.asarray(dead + near, np.uint32 if wide else np.uint16).tobytes()
        s = report.summary
        return cls(report.step, report.mtime, analysed_at, s.dead_ratio, s.near_dead_ratio,
                   layers, counts, wide)


@dataclass(frozen=True)
class LayerChange:
    since: int | None = None       # first step of the current run of dead channels
    since_exact: bool = False      # False: already dead when the history began
    newly_dead: tuple[int, ...] = ()
    revived: tuple[int, ...] = ()


_NONE = LayerChange()
_EMPTY: Mapping[str, LayerChange] = MappingProxyType({})
_NO_DEAD: Mapping[str, list[int]] = MappingProxyType({})


@dataclass(frozen=True)
class History:
    points: tuple[Point, ...] = ()
    changes: Mapping[str, LayerChange] = field(default_factory=lambda: _EMPTY)
    # the newest analysis' dead indices per layer (the report's own lists, not copies)
    last_dead: Mapping[str, list[int]] = field(default_factory=lambda: _NO_DEAD)
    # dead at the first analysis of this history: their ``since`` is a bound only
    restarted: bool = False

    def change(self, layer: str) -> LayerChange:
        return self.changes.get(layer, _NONE)

    @property
    def newly_dead(self) -> int:
        return sum(len(c.newly_dead) for c in self.changes.values())

    @property
    def revived(self) -> int:
        return sum(len(c.revived) for c in self.changes.values())

    @property
    def last(self) -> Point | None:
        return self.points[-1] if self.points else None

    def add(self, report: CheckpointReport, analysed_at: float, limit: int = LIMIT) -> History:
        """This history with ``report`` (a successful analysis) as its newest point."""
        points = self.points
        prev = points[-1] if points else None
        base = self
        if prev is not None and prev.step is not None and report.step is not None \
                and report.step < prev.step:
            base, points, prev = History(restarted=True), (), None  # a new run
        same = prev is not None and prev.step == report.step and prev.mtime == report.mtime
        if same:
            points = points[:-1]  # the same checkpoint again: replace, do not repeat
        names = tuple(layer.name for layer in report.bn_layers)
        if points and points[-1].layers == names:
            names = points[-1].layers  # share the tuple
        point = Point.of(report, analysed_at, names)
        last_dead = MappingProxyType({layer.name: layer.dead for layer in report.bn_layers})
        if same:  # what changed was measured against the analysis before it: keep that
            return History((*points, point)[-limit:], base.changes, last_dead, base.restarted)
        first = not points
        changes: dict[str, LayerChange] = {}
        for layer in report.bn_layers:
            now = layer.dead
            old_change = base.change(layer.name)
            before = base.last_dead.get(layer.name)
            if before is None:
                newly: tuple[int, ...] = ()
                revived: tuple[int, ...] = ()
            else:
                old = set(before)
                newly = tuple(i for i in now if i not in old)
                cur = set(now)
                revived = tuple(i for i in before if i not in cur)
            if not now:
                changes[layer.name] = LayerChange(None, False, newly, revived)
            elif old_change.since is not None and before:
                changes[layer.name] = LayerChange(old_change.since, old_change.since_exact,
                                                  newly, revived)
            else:
                exact = not first and before is not None
                changes[layer.name] = LayerChange(report.step, exact, newly, revived)
        points = (*points, point)[-limit:]
        return History(points, MappingProxyType(changes), last_dead, base.restarted)


def rate_per_1000_steps(history: History, layer: str | None = None) -> float | None:
    """Dead channels gained per 1,000 steps over the history (a layer, or the model's
    dead ratio in percentage points when ``layer`` is None); None without two steps."""
    pts = [p for p in history.points if p.step is not None]
    if len(pts) < 2 or pts[-1].step == pts[0].step:
        return None
    a, b = pts[0], pts[-1]
    span = (b.step or 0) - (a.step or 0)
    if layer is None:
        return 1000.0 * 100.0 * (b.dead_ratio - a.dead_ratio) / span
    da, db = a.dead.get(layer), b.dead.get(layer)
    if da is None or db is None:
        return None
    return 1000.0 * (db - da) / span
