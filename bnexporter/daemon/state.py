"""The immutable snapshot that ``/metrics`` and ``/`` read.

Writers (the planner, the watch supervisor) build a new ``Snapshot`` under a
lock and swap one reference; readers take the reference once and never lock,
so a scrape can never see half an update nor block an analysis.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from bnexporter.daemon.config import MetricOptions
from bnexporter.daemon.history import History
from bnexporter.detection.prune import PrunePlan
from bnexporter.errors import REASONS
from bnexporter.report import CheckpointReport

OUTCOMES = ("success", "error", "retry")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class ModelView:
    name: str
    folder: str
    metrics: MetricOptions
    report: CheckpointReport | None = None   # last good analysis
    analysed_at: float | None = None         # wall time it finished
    up: bool = True
    error: str | None = None                 # the message that made up = 0
    errors: Mapping[str, int] = field(default_factory=lambda: _EMPTY)  # reason -> count
    history: History = field(default_factory=History)  # the last analyses (history.py)
    prune: PrunePlan | None = None           # what could be removed (detection/prune.py)


@dataclass(frozen=True)
class WatcherView:
    root: str
    up: bool
    polling: bool
    why: str = ""


@dataclass(frozen=True)
class Snapshot:
    models: Mapping[str, ModelView] = field(default_factory=lambda: _EMPTY)
    models_version: int = 0  # bumps when anything in ``models`` changes
    analyses: Mapping[str, int] = field(default_factory=lambda: frozen(dict.fromkeys(OUTCOMES,
                                                                                      0)))
    errors: Mapping[str, int] = field(default_factory=lambda: frozen(dict.fromkeys(REASONS, 0)))
    watchers: Mapping[str, WatcherView] = field(default_factory=lambda: _EMPTY)
    watcher_restarts: int = 0
    queue_pending: int = 0
    version: int = 0

    @property
    def healthy(self) -> bool:
        return all(w.up for w in self.watchers.values())


class Store:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snapshot = Snapshot()

    def update(self, fn: Callable[[Snapshot], Snapshot]) -> Snapshot:
        """Apply ``fn`` to the current snapshot and publish the result atomically."""
        with self._lock:
            new = fn(self.snapshot)
            new = replace(new, version=self.snapshot.version + 1)
            self.snapshot = new
            return new

    # -- helpers for the common writes -------------------------------------------
    def set_models(self, changes: Mapping[str, ModelView | None]) -> None:
        def fn(s: Snapshot) -> Snapshot:
            models = dict(s.models)
            for name, view in changes.items():
                if view is None:
                    models.pop(name, None)
                else:
                    models[name] = view
            return replace(s, models=frozen(models), models_version=s.models_version + 1)
        self.update(fn)

    def count(self, outcome: str, reason: str | None = None) -> None:
        def fn(s: Snapshot) -> Snapshot:
            analyses = dict(s.analyses)
            analyses[outcome] = analyses.get(outcome, 0) + 1
            errors = dict(s.errors)
            if reason is not None:
                errors[reason] = errors.get(reason, 0) + 1
            return replace(s, analyses=frozen(analyses), errors=frozen(errors))
        self.update(fn)

    def set_watchers(self, watchers: Mapping[str, WatcherView], restarts: int = 0) -> None:
        self.update(lambda s: replace(s, watchers=frozen(watchers),
                                      watcher_restarts=s.watcher_restarts + restarts))

    def set_pending(self, n: int) -> None:
        if n != self.snapshot.queue_pending:
            self.update(lambda s: replace(s, queue_pending=n))
