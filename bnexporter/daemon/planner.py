"""Decide, per model, which checkpoint to analyse and when.

One thread owns every model's bookkeeping; watchers and workers only post
messages to it, so no decision needs a lock. Per model it keeps the newest
unit it has seen, how long that unit has been stable, its retry state, and the
one running + one waiting job (``policy.Slot``). Workers take jobs from a FIFO
of models, so one busy model cannot starve the others.
"""

from __future__ import annotations

import fnmatch
import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from bnexporter.daemon.config import Config, ModelSpec
from bnexporter.daemon.files import (
    CLOSE_NOT_FINAL,
    Candidate,
    ignored_path,
    list_candidates,
    may_matter,
    sig_of,
    stat_candidate,
)
from bnexporter.daemon.models import Target, targets, template_targets
from bnexporter.daemon.policy import (
    Job,
    Key,
    Observation,
    Slot,
    backoff,
    give_up,
    in_order,
    is_newer,
    newest,
    observe,
    settled,
)
from bnexporter.daemon.state import ModelView, Store, frozen
from bnexporter.detection import warm
from bnexporter.detection.prune import plan as prune_plan
from bnexporter.errors import RETRYABLE
from bnexporter.report import CheckpointReport

log = logging.getLogger("bnexporter.planner")

DEBOUNCE = 0.2  # seconds between an event and looking at the folder
LOOK_BACK = 3   # newest units examined per look when the newest is not complete yet


# -- the messages other threads post to the planner ----------------------------------

@dataclass(frozen=True)
class Event:
    """A watcher saw something happen at ``path`` (absolute)."""

    path: str
    kind: str = "modified"
    is_dir: bool = False


@dataclass(frozen=True)
class Done:
    """A worker finished ``job``."""

    job: Job
    report: CheckpointReport


@dataclass(frozen=True)
class Rescan:
    """Look at every model under ``root`` again (all models when None)."""

    root: str | None = None


@dataclass(frozen=True, eq=False)
class Reconfigure:
    """Apply ``cfg``; ``applied`` is set once it is in force (or failed)."""

    cfg: Config
    applied: threading.Event


@dataclass(frozen=True)
class Pending:
    """A worker took a job: publish the number of waiting jobs again."""


@dataclass(frozen=True)
class Stop:
    """Wake the loop so it sees the stop flag."""


Message = Event | Done | Rescan | Reconfigure | Pending | Stop


@dataclass
class RetryState:
    attempts: int
    first: float
    next_at: float = 0.0


@dataclass
class ModelState:
    target: Target
    generation: int
    view: ModelView
    slot: Slot[Job] = field(default_factory=Slot)
    obs: dict[str, Observation] = field(default_factory=dict)
    closed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    retries: dict[tuple[str, tuple[int, ...]], RetryState] = field(default_factory=dict)
    finished: set[tuple[str, tuple[int, ...]]] = field(default_factory=set)
    succeeded: set[tuple[str, tuple[int, ...]]] = field(default_factory=set)  # in finished
    exported: Candidate | None = None
    due: float | None = None
    cancelled: bool = False
    initial: set[tuple[str, tuple[int, ...]]] | None = None  # units present at first look
    given_up: Candidate | None = None  # newest unit that never became readable
    skipped: dict[str, str] = field(default_factory=dict)  # links etc. already logged
    blocked: bool = False  # the model folder cannot be listed (permission denied)

    @property
    def name(self) -> str:
        return self.target.name


def holds_no_model(report: CheckpointReport) -> bool:
    """No BN layer and no kernel: a stray file that matched the patterns (an .npz of
    metrics, a tokenizer .bin). It never replaces a good result; it is logged as skipped."""
    return not report.bn_layers and not any(t.role == "kernel" for t in report.tensors)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Planner:
    def __init__(self, cfg: Config, store: Store,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.cfg = cfg
        self.store = store
        self.clock, self.wall = clock, wall
        self.stop_event = threading.Event()
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._models: dict[str, ModelState] = {}
        self._timers: list[tuple[float, int, str, Any]] = []  # (when, seq, kind, key)
        self._seq = itertools.count()
        self._ready: deque[tuple[str, ModelState]] = deque()
        self._ready_cv = threading.Condition()
        self._generations = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="planner", daemon=True)
        self._discover_due: set[int] = set()
        self._by_folder: dict[str, list[ModelState]] = {}

    # -- called from other threads ------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def notify(self, path: str, kind: str = "modified", is_dir: bool = False) -> None:
        """A watcher saw something happen at ``path``."""
        self._inbox.put(Event(os.path.abspath(path), kind, is_dir))

    def rescan(self, root: str | None = None) -> None:
        self._inbox.put(Rescan(root))

    def reconfigure(self, cfg: Config) -> threading.Event:
        applied = threading.Event()
        self._inbox.put(Reconfigure(cfg, applied))
        return applied

    def done(self, job: Job, report: CheckpointReport) -> None:
        self._inbox.put(Done(job, report))

    def take(self, timeout: float) -> Job | None:
        """A worker asks for the next job (FIFO over models)."""
        with self._ready_cv:
            if not self._ready and not self.stop_event.is_set():
                self._ready_cv.wait(timeout)
            while self._ready:
                _, m = self._ready.popleft()
                job = m.slot.start()
                if job is not None and not m.cancelled:
                    break
                m.slot.running = None
            else:
                return None
        self._inbox.put(Pending())
        return job

    def stop(self) -> None:
        self.stop_event.set()
        self._inbox.put(Stop())
        with self._ready_cv:
            self._ready_cv.notify_all()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # -- the planner thread ---------------------------------------------------------
    def _run(self) -> None:
        try:
            self._apply_config(self.cfg, first=True)
        except Exception:  # e.g. a folder name nothing expected: the loop must still run
            log.exception("internal error while applying the configuration")
        next_rescan = self.clock() + self.cfg.rescan_interval
        while not self.stop_event.is_set():
            now = self.clock()
            wait = min(next_rescan, self._timers[0][0] if self._timers else now + 1.0) - now
            try:
                msg = self._inbox.get(timeout=max(0.0, min(wait, 1.0)))
                self._handle_safely(msg)
                for _ in range(1000):  # drain bursts without re-checking timers each time
                    self._handle_safely(self._inbox.get_nowait())
            except queue.Empty:
                pass
            now = self.clock()
            if now >= next_rescan:
                next_rescan = now + self.cfg.rescan_interval
                self._handle_safely(Rescan())
            self._run_timers()

    def _handle_safely(self, msg: Message) -> None:
        try:
            self._handle(msg)
        except Exception:  # one bad message must not stop all analysis
            log.exception("internal error while handling %s", type(msg).__name__)

    def _handle(self, msg: Message) -> None:
        match msg:
            case Event(path, kind, is_dir):
                self._on_event(path, kind, is_dir)
            case Done(job, report):
                self._on_done(job, report)
            case Rescan(root):
                self._on_rescan(root)
            case Reconfigure(cfg, applied):
                try:
                    self._apply_config(cfg)
                finally:
                    applied.set()
            case Pending():
                self._publish_pending()
            case Stop():
                pass

    def _run_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now and not self.stop_event.is_set():
            when, _, kind, key = heapq.heappop(self._timers)
            try:
                if kind == "discover":
                    self._discover_due.discard(key)
                    self._rediscover(key)
                    continue
                m = self._models.get(key)
                if m is None or m.due != when:
                    continue
                m.due = None
                self._evaluate(m)
            except Exception:
                log.exception("internal error while looking at %s", key)

    def _schedule(self, m: ModelState, when: float) -> None:
        if m.due is not None and m.due <= when:
            return
        m.due = when
        heapq.heappush(self._timers, (when, next(self._seq), "model", m.name))

    def _schedule_discovery(self, index: int) -> None:
        if index not in self._discover_due:
            self._discover_due.add(index)
            heapq.heappush(self._timers, (self.clock() + DEBOUNCE, next(self._seq), "discover",
                                          index))

    # -- configuration and the model set -----------------------------------------------
    def _apply_config(self, cfg: Config, first: bool = False) -> None:
        self.cfg = cfg
        wanted = targets(cfg)
        changes: dict[str, ModelView | None] = {}
        for name in list(self._models):
            if name not in wanted:
                self._remove(name)
                changes[name] = None
        for name, target in wanted.items():
            m = self._models.get(name)
            if m is not None and m.target == target:
                continue
            if m is not None:  # settings changed: keep the old numbers until re-analysed
                m.cancelled = True
                view = replace(m.view, folder=target.folder, metrics=target.analysis.metrics)
                log.info("model %s: configuration changed, analysing again", name)
            else:
                view = ModelView(name, target.folder, target.analysis.metrics)
                if not first:
                    log.info("model %s: now watched (%s)", name, target.folder)
            self._models[name] = ModelState(target, next(self._generations), view)
            changes[name] = view
            self._schedule(self._models[name], self.clock())
        if changes:
            self.store.set_models(changes)
        self._index()
        self._publish_pending()
        if first:
            log.info("%d models to watch", len(self._models))

    def _remove(self, name: str) -> None:
        m = self._models.pop(name)
        m.cancelled = True
        log.info("model %s: no longer watched", name)

    def _index(self) -> None:
        """folder -> models, so an event finds its model by walking up its path."""
        index: dict[str, list[ModelState]] = {}
        for m in self._models.values():
            index.setdefault(m.target.folder.rstrip(os.sep) or os.sep, []).append(m)
        self._by_folder = index

    def _rediscover(self, index: int) -> None:
        spec = next((s for s in self.cfg.models if s.index == index and s.template), None)
        if spec is None:
            return
        self._sync_template(spec)

    def _sync_template(self, spec: ModelSpec) -> None:
        others = {n: m.target for n, m in self._models.items()
                  if m.target.spec_index != spec.index}
        found = template_targets(self.cfg, spec, others)
        changes: dict[str, ModelView | None] = {}
        for name, m in list(self._models.items()):
            if m.target.spec_index == spec.index and name not in found:
                self._remove(name)
                changes[name] = None
        for name, target in found.items():
            if name in self._models:
                continue
            log.info("model %s: discovered at %s", name, target.folder)
            m = ModelState(target, next(self._generations),
                           ModelView(name, target.folder, target.analysis.metrics))
            self._models[name] = m
            changes[name] = m.view
            self._schedule(m, self.clock())
        if changes:
            self.store.set_models(changes)
            self._index()
            self._publish_pending()

    def _on_rescan(self, root: str | None) -> None:
        for spec in self.cfg.models:
            if spec.template and (root is None or _inside(spec.template_parts()[0], root)
                                  or _inside(root, spec.template_parts()[0])):
                self._sync_template(spec)
        now = self.clock()
        for m in self._models.values():
            if root is None or _inside(m.target.folder, root) or _inside(root, m.target.folder):
                self._schedule(m, now)

    # -- events ------------------------------------------------------------------------
    def _on_event(self, path: str, kind: str, is_dir: bool) -> None:
        now = self.clock()
        for spec in self.cfg.models:
            if not spec.template:
                continue
            base = spec.template_parts()[0]
            if _inside(path, base) and (path == base or os.path.dirname(path) == base
                                        or (is_dir and kind in ("created", "deleted", "moved"))):
                self._schedule_discovery(spec.index)
        if is_dir and kind in ("deleted", "moved"):  # a folder above models may have gone
            for m in self._models.values():
                if _inside(m.target.folder, path):
                    self._schedule(m, now + DEBOUNCE)
        probe = path
        while True:
            for m in self._by_folder.get(probe, ()):
                if (probe == path or not ignored_path(path, probe)) and (
                        is_dir or may_matter(path, m.target.analysis.patterns)):
                    if not is_dir and (kind == "moved" or (kind == "closed" and not any(
                            fnmatch.fnmatchcase(os.path.basename(path), p)
                            for p in CLOSE_NOT_FINAL))):
                        self._closed(m, path)
                    self._schedule(m, now + DEBOUNCE)
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent

    @staticmethod
    def _closed(m: ModelState, path: str) -> None:
        """Remember the signature at close-after-write or rename-into-place (writers
        rename only finished files): while it still holds, the file needs no settling."""
        try:
            st = os.stat(path)
        except OSError:
            return
        m.closed[path] = sig_of(st)

    # -- the decision ------------------------------------------------------------------
    def _evaluate(self, m: ModelState) -> None:
        if m.slot.running is not None and m.slot.pending is not None:
            return  # a newer one is already waiting; look again when the runner finishes
        a = m.target.analysis
        skipped: dict[str, str] = {}
        cands = list_candidates(m.target.folder, a.patterns, a.step_regex,
                                follow_symlinks=a.follow_symlinks, skipped=skipped)
        for path, why in skipped.items():
            if m.skipped.get(path) != why:
                log.warning("model %s: skipping %s: %s", m.name, path, why)
        m.skipped = skipped
        blocked = skipped.get(m.target.folder)
        if blocked is not None:  # e.g. permission denied: say so; keep the old results
            error = f"{m.target.folder}: {blocked}"
            if m.view.up or m.view.error != error:
                self._set_view(m, up=False, error=error)
            m.blocked = True
            return
        if m.blocked:
            m.blocked = False
            if m.given_up is None:
                self._set_view(m, up=True, error=None)
        present = {c.path for c in cands}
        live = {(c.path, c.sig) for c in cands}
        for table in (m.obs, m.closed):
            for path in [p for p in table if p not in present]:
                del table[path]
        m.retries = {k: v for k, v in m.retries.items() if k in live}
        m.finished &= live
        m.succeeded &= live
        if m.initial is None:
            m.initial = live
        if m.exported is not None and m.exported.path not in present:
            # its file is gone: the newest remaining checkpoint takes over (analysed again
            # even if it was before); with none left the model's series go
            log.info("model %s: exported checkpoint %s is gone; %s", m.name, m.exported.path,
                     "falling back to the newest remaining one" if cands else
                     "no checkpoint left, its series are dropped")
            m.exported = None
            m.finished -= m.succeeded
            m.succeeded.clear()
            if not cands and m.view.report is not None:
                self._set_view(m, report=None, analysed_at=None)
        if m.given_up is not None and (m.given_up.path, m.given_up.sig) not in live:
            m.given_up = None
        top = newest(cands)
        if top is None:
            if m.view.report is not None and not os.path.isdir(m.target.folder):
                self._set_view(m, report=None, analysed_at=None)  # folder gone: series go
            return
        if m.exported is not None and (top.path, top.sig) == (m.exported.path, m.exported.sig):
            m.given_up = None
            if not m.view.up:
                self._set_view(m, up=True, error=None)
            return
        busy = {(j.cand.path, j.cand.sig) for j in (m.slot.running, m.slot.pending) if j}
        for cand in self._pool(m, cands)[:LOOK_BACK]:
            if (cand.path, cand.sig) in busy:
                return  # already running or waiting: nothing newer is ready
            if self._ready_to_analyse(m, cand):
                opts = a.scan_options()
                if len(m.succeeded) % a.census.every:  # the census on every N-th only
                    opts = replace(opts, census_enabled=False)
                elif a.census.distill:  # each checkpoint starts from the last one's inputs
                    opts = replace(opts, distill_warm=warm.path_for(
                        a.census.cache or warm.default_dir(), m.name))
                job = Job(m.name, m.generation, cand, opts)
                with self._ready_cv:
                    if m.slot.offer(job):
                        self._ready.append((m.name, m))
                        self._ready_cv.notify()
                self._publish_pending()
                return
            # not complete yet: the newest *complete* one may be an older one; meanwhile
            # a wake-up is scheduled for this one

    def _pool(self, m: ModelState, cands: list[Candidate]) -> list[Candidate]:
        """Units that would improve on the export, in the order to try them: newest
        first, or oldest first with backfill."""
        pool = [c for c in cands if (c.path, c.sig) not in m.finished]
        if m.exported is not None:
            old = Key.of(m.exported)
            pool = [c for c in pool if is_newer(Key.of(c), old)
                    or (c.path == m.exported.path and c.sig != m.exported.sig)]
        ordered = in_order(pool)
        return ordered if m.target.analysis.backfill else ordered[::-1]

    def _ready_to_analyse(self, m: ModelState, cand: Candidate) -> bool:
        """Settled and not waiting for a retry."""
        now, wall = self.clock(), self.wall()
        obs = observe(m.obs.get(cand.path), cand.sig, now)
        m.obs[cand.path] = obs
        # an old mtime proves quiescence only for files found at the first look (start-up,
        # discovery): later, a lagging file-server clock must not skip the settle period
        mtime = cand.mtime if m.initial and (cand.path, cand.sig) in m.initial else wall
        if not settled(obs, now, self.cfg.settle_seconds, mtime, wall, m.closed.get(cand.path)):
            self._schedule(m, obs.since + self.cfg.settle_seconds)
            return False
        state = m.retries.get((cand.path, cand.sig))
        if state is not None and now < state.next_at:
            self._schedule(m, state.next_at)
            return False
        # the format's completeness check runs with the analysis, in the worker: this
        # thread never reads a checkpoint, so a read that hangs cannot stall every model
        return True

    def _failed(self, m: ModelState, cand: Candidate, reason: str, message: str) -> None:
        """One failed attempt: retry later, or give up and report it once."""
        now = self.clock()
        key = (cand.path, cand.sig)
        state = m.retries.get(key) or RetryState(0, now)
        state.attempts += 1
        retry = self.cfg.retry
        if reason in RETRYABLE and not give_up(state.attempts, state.first, now, retry):
            state.next_at = now + backoff(state.attempts, retry)
            m.retries[key] = state
            self.store.count("retry")
            log.debug("%s: not readable yet (%s), retry %d in %.1f s", cand.path, reason,
                      state.attempts, state.next_at - now)
            self._schedule(m, state.next_at)
            return
        m.retries.pop(key, None)
        m.finished.add(key)
        self.store.count("error", reason)
        errors = dict(m.view.errors)
        errors[reason] = errors.get(reason, 0) + 1
        tries = f" after {state.attempts} attempts" if state.attempts > 1 else ""
        cause = message.removeprefix(cand.path + ": ")
        log.warning("model %s: giving up on %s%s: %s [%s]", m.name, cand.path, tries, cause,
                    reason)
        if m.given_up is None or is_newer(Key.of(cand), Key.of(m.given_up)):
            m.given_up = cand
        self._set_view(m, up=False, error=message, errors=frozen(errors))

    def _on_done(self, job: Job, report: CheckpointReport) -> None:
        m = self._models.get(job.model)
        if m is None or m.generation != job.generation:
            return  # removed or reconfigured meanwhile: its slot went with its old state
        with self._ready_cv:
            if m.slot.finish():
                self._ready.append((m.name, m))
                self._ready_cv.notify()
        self._publish_pending()
        now_cand = stat_candidate(job.cand)
        changed = now_cand is not None and now_cand.sig != job.cand.sig
        if report.ok and not changed and holds_no_model(report):
            m.finished.add((job.cand.path, job.cand.sig))
            m.retries.pop((job.cand.path, job.cand.sig), None)
            log.warning("model %s: skipping %s: no BatchNorm layer and no model weights in it",
                        m.name, job.cand.path)
        elif report.ok and not changed:
            self._succeeded(m, job, report)
        elif report.ok:
            # bytes of two versions may have been mixed: never export that; the new
            # version is looked at like any other change
            log.info("model %s: %s changed while being analysed; result discarded, "
                     "analysing the new version", m.name, job.cand.path)
        elif changed:  # whatever the reader made of a moving file proves nothing
            log.debug("model %s: %s changed while being analysed (%s); looking again",
                      m.name, job.cand.path, report.error_reason)
        else:
            reason = report.error_reason or "internal"
            self._failed(m, job.cand, reason, report.error or reason)
        self._schedule(m, self.clock())

    def _succeeded(self, m: ModelState, job: Job, report: CheckpointReport) -> None:
        self.store.count("success")
        key = (job.cand.path, job.cand.sig)
        m.retries.pop(key, None)
        m.finished.add(key)
        m.succeeded.add(key)
        if m.exported is not None and is_newer(Key.of(m.exported), Key.of(job.cand)):
            log.info("model %s: %s is older than the exported checkpoint; not exported",
                     m.name, job.cand.path)
            return
        m.exported = job.cand
        plan = prune_plan(report)  # before the tensors go: it needs their shapes
        if not m.target.analysis.metrics.per_tensor:  # not exported: do not keep it in memory
            report = replace(report, tensors=[t for t in report.tensors  # but the page's few
                                              if t.anomaly or t.nonfinite][:100])
        s = report.summary
        log.info("model %s: analysed %s (step %s): %d BN layers, %d/%d ReLU-fed channels dead, "
                 "%d near-dead, %.2f s", m.name, job.cand.path,
                 report.step if report.step is not None else "?", s.bn_layers, s.dead,
                 s.relu_channels, s.near_dead, report.duration_seconds)
        history = m.view.history.add(report, self.wall())  # since when, newly dead
        if m.given_up is not None and is_newer(Key.of(m.given_up), Key.of(job.cand)):
            self._set_view(m, report=report, analysed_at=self.wall(), history=history,
                           prune=plan)
            return  # a newer one failed
        m.given_up = None
        self._set_view(m, report=report, analysed_at=self.wall(), up=True, error=None,
                       history=history, prune=plan)

    def _set_view(self, m: ModelState, **changes: Any) -> None:
        m.view = replace(m.view, **changes)
        self.store.set_models({m.name: m.view})

    def _publish_pending(self) -> None:
        with self._ready_cv:
            n = sum(1 for m in self._models.values() if m.slot.pending is not None)
        self.store.set_pending(n)
