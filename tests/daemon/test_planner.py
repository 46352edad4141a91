"""The planner driven in-process, with a fake clock: no threads, no sleeps.

Each test builds a model folder under ``tmp_path``, lets the planner look at it
through its own message handler and timers, and plays the worker by hand
(``take`` a job, post ``Done`` with a report). Time only moves when a test moves it.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from bnexporter.daemon.config import Analysis, Config, ModelSpec, Retry
from bnexporter.daemon.planner import DEBOUNCE, Done, Event, Planner, Reconfigure
from bnexporter.daemon.policy import Job
from bnexporter.daemon.state import ModelView, Store
from bnexporter.report import CheckpointReport, LayerReport, Summary, failed
from tests.support.imports import import_graph

SETTLE = 2.0
RETRY = Retry(initial_delay=1.0, max_delay=4.0, max_attempts=3, give_up_after=600.0)


class Clock:
    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


class Harness:
    """One planner over one model folder ``m``; ``tick`` moves both clocks."""

    def __init__(self, tmp_path: Path, **analysis: object):
        self.folder = tmp_path / "m"
        self.folder.mkdir(exist_ok=True)
        self.mono = Clock(1000.0)
        self.wall = Clock(os.stat(self.folder).st_mtime)  # files written now are "new"
        self.store = Store()
        self.cfg = self.config(**analysis)
        self.planner = Planner(self.cfg, self.store, clock=self.mono, wall=self.wall)
        self.started = False

    def config(self, **analysis: object) -> Config:
        a = Analysis(patterns=("*.safetensors",), **analysis)  # type: ignore[arg-type]
        spec = ModelSpec(index=0, path=str(self.folder), name="m", analysis=a)
        return Config(settle_seconds=SETTLE, retry=RETRY, analysis=a, models=(spec,))

    def start(self) -> None:
        self.planner._apply_config(self.cfg, first=True)
        self.started = True
        self.tick()

    def write(self, name: str, data: bytes = b"x" * 16, age: float = 0.0) -> str:
        path = self.folder / name
        path.write_bytes(data)
        if age:
            t = self.wall() - age
            os.utime(path, (t, t))
        if self.started:
            self.planner.notify(str(path), "modified")
        return str(path)

    def drain(self) -> None:
        while True:
            try:
                msg = self.planner._inbox.get_nowait()
            except queue.Empty:
                return
            self.planner._handle(msg)

    def tick(self, dt: float = 0.0) -> None:
        self.drain()  # messages posted so far arrive before time moves
        self.mono.now += dt
        self.wall.now += dt
        self.drain()
        self.planner._run_timers()
        self.drain()

    def take(self) -> Job | None:
        job = self.planner.take(0)
        self.drain()
        return job

    def finish(self, job: Job, report: CheckpointReport | None = None) -> None:
        self.planner.done(job, report or ok(job))
        self.tick()

    def fail(self, job: Job, reason: str = "truncated") -> None:
        self.finish(job, failed(job.cand.path, f"{job.cand.path}: cut short", reason))

    @property
    def view(self) -> ModelView:
        return self.store.snapshot.models["m"]


BN = LayerReport("bn", 4, 1e-5, "default:pytorch", "relu", "config")


def ok(job: Job) -> CheckpointReport:
    return CheckpointReport(path=job.cand.path, format="safetensors", step=job.cand.step,
                            error=None, summary=Summary(), bn_layers=[BN])


def name(job: Job | None) -> str | None:
    return None if job is None else os.path.basename(job.cand.path)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# -- settling ----------------------------------------------------------------------

def test_a_file_found_at_start_with_an_old_mtime_needs_no_settling(h: Harness):
    h.write("step_100.safetensors", age=60)
    h.start()
    assert name(h.take()) == "step_100.safetensors"


def test_a_new_file_waits_until_it_has_been_stable_for_the_settle_period(h: Harness):
    h.start()
    h.write("step_100.safetensors")
    h.tick(DEBOUNCE)  # the event is looked at: first seen now
    assert h.take() is None
    h.tick(SETTLE - 0.01)
    assert h.take() is None
    h.tick(0.01)  # the planner's own wake-up at first-seen + settle
    assert name(h.take()) == "step_100.safetensors"


def test_a_file_that_keeps_growing_restarts_the_settle_period(h: Harness):
    h.start()
    path = h.write("step_100.safetensors")
    h.tick(DEBOUNCE)
    h.tick(SETTLE / 2)
    h.write("step_100.safetensors", b"x" * 32)  # still being written
    h.tick(DEBOUNCE)
    h.tick(SETTLE / 2)
    assert h.take() is None  # stable for less than SETTLE since the change
    h.tick(SETTLE)
    job = h.take()
    assert job is not None and job.cand.path == path and job.cand.sig[0] == 32


def test_close_after_write_skips_the_settle_period(h: Harness):
    h.start()
    path = h.write("step_100.safetensors")
    h.planner.notify(path, "closed")
    h.tick(DEBOUNCE)
    assert name(h.take()) == "step_100.safetensors"


# -- retries, back-off and giving up ---------------------------------------------------

def test_a_retryable_failure_is_retried_with_doubling_backoff(h: Harness):
    h.write("step_100.safetensors", age=60)
    h.start()
    h.fail(h.take())  # attempt 1 failed: retry in 1 s
    assert h.take() is None
    h.tick(RETRY.initial_delay - 0.01)
    assert h.take() is None
    h.tick(0.01)
    job = h.take()
    assert name(job) == "step_100.safetensors"
    h.fail(job)  # attempt 2 failed: retry in 2 s
    h.tick(2 * RETRY.initial_delay - 0.01)
    assert h.take() is None
    h.tick(0.01)
    assert h.take() is not None
    assert h.store.snapshot.analyses["retry"] == 2
    assert h.view.up  # retries are not errors yet


def test_after_max_attempts_the_planner_gives_up_and_says_so_once(h: Harness):
    h.write("step_100.safetensors", age=60)
    h.start()
    for attempt in range(RETRY.max_attempts):
        job = h.take()
        assert job is not None, attempt
        h.fail(job)
        h.tick(RETRY.max_delay)
    assert h.take() is None
    h.tick(3600)
    assert h.take() is None  # given up: never tried again while the file is unchanged
    assert not h.view.up
    assert h.view.error is not None and "cut short" in h.view.error
    assert dict(h.view.errors) == {"truncated": 1}
    assert h.store.snapshot.errors["truncated"] == 1


def test_a_non_retryable_failure_gives_up_at_once(h: Harness):
    h.write("step_100.safetensors", age=60)
    h.start()
    h.fail(h.take(), "corrupt")
    h.tick(3600)
    assert h.take() is None
    assert not h.view.up and dict(h.view.errors) == {"corrupt": 1}


def test_a_changed_file_after_giving_up_is_tried_again(h: Harness):
    h.write("step_100.safetensors", age=60)
    h.start()
    h.fail(h.take(), "corrupt")
    h.write("step_100.safetensors", b"y" * 64, age=60)
    h.tick(DEBOUNCE)
    h.tick(SETTLE)  # a new signature after start-up settles like any new file
    job = h.take()
    assert job is not None and job.cand.sig[0] == 64
    h.finish(job)
    assert h.view.up and h.view.error is None


# -- coalescing and ordering -------------------------------------------------------------

def test_checkpoints_arriving_during_an_analysis_coalesce_to_the_newest(h: Harness):
    h.write("step_1.safetensors", age=60)
    h.start()
    first = h.take()
    assert name(first) == "step_1.safetensors"
    for step in (2, 3, 4):
        h.write(f"step_{step}.safetensors")
    h.tick(DEBOUNCE)
    h.tick(SETTLE)
    assert h.store.snapshot.queue_pending == 1  # step 4 waits; steps 2 and 3 are passed over
    assert first is not None
    h.finish(first)
    job = h.take()
    assert name(job) == "step_4.safetensors"
    assert job is not None
    h.finish(job)
    assert h.take() is None
    assert h.store.snapshot.queue_pending == 0
    assert h.view.report is not None and h.view.report.step == 4


def test_with_one_running_and_one_waiting_a_newer_arrival_is_looked_at_afterwards(h: Harness):
    """While both places of the slot are taken the planner does not look at the folder;
    the newer checkpoint starts settling once the runner finishes, so the waiting
    one is analysed first."""
    h.write("step_1.safetensors", age=60)
    h.start()
    first = h.take()
    h.write("step_2.safetensors")
    h.tick(DEBOUNCE)
    h.tick(SETTLE)
    h.write("step_3.safetensors")
    h.tick(DEBOUNCE)
    h.tick(SETTLE)
    assert first is not None
    h.finish(first)
    seen = []
    for _ in range(3):  # an idle worker takes a job at once
        job = h.take()
        if job is not None:
            seen.append(job.cand.step)
            h.finish(job)
        h.tick(SETTLE)
    assert seen == [2, 3]


def test_an_older_result_never_replaces_a_newer_export(h: Harness):
    h.write("step_3.safetensors", age=120)
    h.write("step_5.safetensors", age=60)
    h.start()
    newer = h.take()
    assert name(newer) == "step_5.safetensors"
    assert newer is not None
    h.finish(newer)
    assert h.view.report is not None and h.view.report.step == 5
    older = replace(newer, cand=replace(newer.cand, path=str(h.folder / "step_3.safetensors"),
                                        step=3))
    h.planner._handle(Done(older, ok(older)))  # e.g. a backfill result arriving late
    assert h.view.report is not None and h.view.report.step == 5


def test_an_older_checkpoint_appearing_later_is_not_analysed(h: Harness):
    h.write("step_5.safetensors", age=60)
    h.start()
    job = h.take()
    assert job is not None
    h.finish(job)
    h.write("step_3.safetensors", age=30)
    h.tick(DEBOUNCE)
    h.tick(SETTLE)
    assert h.take() is None
    assert h.view.report is not None and h.view.report.step == 5


def test_backfill_analyses_oldest_first(tmp_path: Path):
    h = Harness(tmp_path, backfill=True)
    for step in (1, 2, 3):
        h.write(f"step_{step}.safetensors", age=100 - step)
    h.start()
    seen = []
    while (job := h.take()) is not None:
        seen.append(job.cand.step)
        h.finish(job)
    assert seen == [1, 2, 3]


# -- reconfiguration ---------------------------------------------------------------------

def test_reconfiguration_drops_results_of_the_old_settings_and_analyses_again(h: Harness):
    h.write("step_100.safetensors", age=60)
    h.start()
    old = h.take()
    assert old is not None
    applied = threading.Event()
    new_cfg = h.config(bn_only=True)
    h.planner._inbox.put(Reconfigure(new_cfg, applied))
    h.tick()
    assert applied.is_set()
    h.finish(old)  # a result computed with the old settings
    assert h.view.report is None
    job = h.take()
    assert job is not None and job.generation != old.generation and job.opts.bn_only
    h.finish(job)
    assert h.view.report is not None


def test_a_model_removed_by_reconfiguration_goes_from_the_store(h: Harness):
    h.write("step_100.safetensors", age=60)
    h.start()
    assert "m" in h.store.snapshot.models
    applied = h.planner.reconfigure(replace(h.cfg, models=()))
    h.tick()
    assert applied.is_set()
    assert "m" not in h.store.snapshot.models
    assert h.take() is None


def test_events_outside_every_model_are_ignored(h: Harness, tmp_path: Path):
    h.start()
    elsewhere = tmp_path / "other.safetensors"
    elsewhere.write_bytes(b"x")
    h.planner._handle(Event(str(elsewhere)))
    h.tick(SETTLE * 2)
    assert h.take() is None


def test_the_planner_does_not_import_the_worker():
    deps = import_graph()["bnexporter.daemon.planner"]
    assert "bnexporter.daemon.worker" not in deps


def test_a_file_with_no_model_never_replaces_a_good_result(h: Harness):
    h.write("step_100.safetensors", age=60)
    h.start()
    h.finish(h.take())
    assert h.view.report is not None and h.view.report.step == 100
    h.write("step_200.safetensors")  # a stray file: arrays, but no BN layer and no kernel
    h.tick(DEBOUNCE)
    h.tick(SETTLE)
    job = h.take()
    assert name(job) == "step_200.safetensors"
    h.finish(job, CheckpointReport(path=job.cand.path, format="npz", step=200, error=None,
                                   summary=Summary()))
    assert h.view.report.step == 100 and h.view.up  # the good result stays
    h.tick(SETTLE)
    assert h.take() is None  # skipped once, not tried again


def test_a_model_with_only_a_stray_file_has_no_result_and_no_model_up(h: Harness):
    h.write("metrics.safetensors", age=60)
    h.start()
    job = h.take()
    h.finish(job, CheckpointReport(path=job.cand.path, format="npz", step=None, error=None,
                                   summary=Summary()))
    assert h.view.report is None and h.view.up and h.view.error is None
