"""Watchers in-process: inotify limit fallback, supervision; and the demo command."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bnexporter.daemon import watch
from bnexporter.daemon.state import Store
from tests.support.daemon import Scrape


class _FullInotify:
    """Stands in for the inotify Observer when fs.inotify.max_user_watches is exhausted."""

    def __init__(self, *a, **k):
        pass

    def schedule(self, *a, **k):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    def stop(self):
        pass

    def is_alive(self):
        return False


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_inotify_limit_falls_back_to_polling(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(watch, "Observer", _FullInotify)
    seen: list[str] = []
    store = Store()
    w = watch.Watchers(store, lambda p, k, d: seen.append(p), lambda r: None, 0.1)
    w.set_roots({str(tmp_path): "inotify"}, 0.1)
    try:
        view = store.snapshot.watchers[str(tmp_path)]
        assert view.up and view.polling and "inotify limit" in view.why
        assert "polling every 0.1 s instead" in caplog.text
        (tmp_path / "ckpt-1.h5").write_bytes(b"x")
        assert _wait(lambda: str(tmp_path / "ckpt-1.h5") in seen)  # polling sees it
    finally:
        w.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_supervisor_restarts_a_dead_observer(tmp_path: Path):
    restarted: list[str] = []
    store = Store()
    w = watch.Watchers(store, lambda p, k, d: None, restarted.append, 0.1)
    w.set_roots({str(tmp_path): "poll"}, 0.1)
    try:
        assert w.crash() == [str(tmp_path)]
        assert _wait(lambda: not w.alive(w._watches[str(tmp_path)]))
        w.check()
        assert restarted == [str(tmp_path)]
        snap = store.snapshot
        assert snap.watcher_restarts == 1 and snap.watchers[str(tmp_path)].up
        # a vanished root stays down (unhealthy) and is not restarted in a loop
        w._halt(w._watches[str(tmp_path)])
        tmp_path.rename(tmp_path.with_name(tmp_path.name + "-moved"))
        w.check()
        assert not store.snapshot.watchers[str(tmp_path)].up
        assert not store.snapshot.healthy and store.snapshot.watcher_restarts == 1
    finally:
        w.stop()


def test_demo_serves_a_dying_run(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-m", "bnexporter", "demo", "--duration", "5",
                             "--interval", "0.4", "--listen", "127.0.0.1:0", "--dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"open (http://\S+/) ", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(lines)
        deadline = time.monotonic() + 4.5
        steps = []
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url + "metrics", timeout=5) as resp:
                s = Scrape(resp.read().decode())
            step = s.get("bnexporter_model_checkpoint_step", model="demo-run")
            if step is not None and (not steps or step != steps[-1]):
                steps.append(step)
            time.sleep(0.2)
        assert len(steps) >= 3 and steps == sorted(steps), steps
        assert s.get("bnexporter_layer_info", model="demo-run", layer="block_2_project_BN",
                     consumer="add",
                     consumer_source="config") == 1
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert "demo-run" in resp.read().decode()
        rc = proc.wait(10)  # --duration ends it
        assert rc == 0
        assert len(list((tmp_path / "demo-run").glob("ckpt-*.h5"))) <= 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_demo_trainer_close_waits_for_the_write_in_progress(tmp_path: Path, monkeypatch):
    """The demo's end must not leave its writer inside h5py (a crash at exit, seen once
    in CI as the demo exiting on SIGSEGV)."""
    import threading

    from bnexporter.daemon import demo

    started, finished = threading.Event(), threading.Event()

    def slow_write(path, step, seed):
        started.set()
        time.sleep(0.6)
        Path(path).write_bytes(b"x")
        finished.set()

    monkeypatch.setattr(demo, "write_story_checkpoint", slow_write)
    trainer = demo.Trainer(str(tmp_path), interval=10.0)
    trainer.start()
    assert started.wait(5)
    trainer.close()
    assert finished.is_set()
    assert not trainer._thread.is_alive()
    demo.Trainer(str(tmp_path), interval=1.0).close()  # never started: nothing to wait for
