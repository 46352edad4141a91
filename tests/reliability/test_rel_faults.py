"""Faults the daemon must survive, each simulated for real where this machine allows:
a stuck read (fanotify permission mark: the opener sits in state D like on a dead
NFS server), SIGTERM mid-analysis, the watched folder deleted and recreated,
permission denied (daemon run as another uid), the inotify watch limit (another
process of the same uid holds every allowed watch), and a full /tmp (a tiny full
tmpfs over /tmp and /var/tmp in a private mount namespace)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rel_support import (
    NOBODY,
    base_config,
    descendants,
    exists,
    shared_dir,
)
from stuck_io import StuckOpen, available

from bnexporter.daemon.demo import checkpoint_bytes, write_checkpoint
from tests.support.daemon import DaemonProcess

SETPRIV = shutil.which("setpriv")
UNSHARE = shutil.which("unshare")


def _step(s, model):  # type: ignore[no-untyped-def]
    return s.get("bnexporter_model_checkpoint_step", model=model)


def _as_user(uid: int) -> list[str]:
    assert SETPRIV, "setpriv (util-linux) is needed to run the daemon as another user"
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


# -- a read that never returns ---------------------------------------------------------

@pytest.mark.parametrize(("isolation", "workers"), [("process", 1), ("process", 2),
                                                     ("thread", 1)])
def test_stuck_read_times_out_and_other_models_go_on(tmp_path: Path, isolation: str,
                                                     workers: int):
    why = available()
    if why is not None:
        pytest.skip(f"fanotify permission events unavailable here ({why})")
    stuck, busy = tmp_path / "stuck", tmp_path / "busy"
    stuck.mkdir()
    busy.mkdir()
    write_checkpoint(str(busy / "ckpt-100.h5"), 100)
    cfg = base_config(stall_timeout=2, analysis_timeout=60, workers=workers,
                      isolation=isolation, models=[{"name": "stuck", "path": str(stuck)},
                                                   {"name": "busy", "path": str(busy)}])
    hidden = stuck / ".ckpt-100.h5"  # ignored until renamed into place
    hidden.write_bytes(checkpoint_bytes(100))
    with StuckOpen(str(hidden)):
        d = DaemonProcess(tmp_path, cfg).start()
        try:
            d.wait_for(lambda s: _step(s, "busy") == 100, "busy analysed", timeout=15)
            os.rename(hidden, stuck / "ckpt-100.h5")  # the mark stays with the inode
            t_stuck = time.monotonic()
            d.wait_log(r"model stuck: analysing ")
            time.sleep(0.2)  # the child is now blocked in open()
            write_checkpoint(str(busy / "ckpt-200.h5"), 200)
            t0 = time.monotonic()
            # meanwhile scrapes and health answer at once
            assert d.request("/healthz")[0] == 200 and time.monotonic() - t0 < 1
            d.wait_for(lambda s: _step(s, "busy") == 200, "busy step 200", timeout=10)
            wait = time.monotonic() - t0
            s = d.wait_for(lambda s: s.get("bnexporter_errors_total", reason="timeout") == 1,
                           "the stuck checkpoint reported as timeout", timeout=15)
            stalled = time.monotonic() - t_stuck
            print(f"\n{isolation}, {workers} worker(s): the other model's checkpoint exported "
                  f"after {wait:.1f} s; stuck one reported after {stalled:.1f} s")
            # one worker: the other model waits at most one stall_timeout; two: not at all
            assert wait < (1.5 if workers > 1 else 2 + 3), wait
            assert stalled < 2 + 5
            assert s.get("bnexporter_model_checkpoint_errors_total", model="stuck",
                         reason="timeout") == 1
            assert s.get("bnexporter_model_up", model="stuck") == 0
            assert s.get("bnexporter_model_up", model="busy") == 1
            assert "no progress for 2 s" in d.log()
            # a new checkpoint of the stuck model is analysed normally
            write_checkpoint(str(stuck / "ckpt-200.h5"), 200)
            s = d.wait_for(lambda s: _step(s, "stuck") == 200, "stuck model recovers")
            assert s.get("bnexporter_model_up", model="stuck") == 1
            assert s.get("bnexporter_errors_total", reason="timeout") == 1  # reported once
        finally:
            rc = d.stop()
    assert rc == 0, d.log()


# -- SIGTERM ----------------------------------------------------------------------------

def test_sigterm_mid_analysis_exits_quickly_and_leaves_no_process(tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    write_checkpoint(str(folder / "ckpt-100.h5"), 100)
    d = DaemonProcess(tmp_path, base_config(models=[{"name": "m", "path": str(folder)}]),
               env={"BNEXPORTER_TEST_HOOKS": "1", "BNEXPORTER_TEST_ANALYSIS_DELAY": "60"})
    d.start()
    d.wait_log(r"model m: analysing ")
    # multiprocessing's resource tracker, the forkserver and the analysis child below it
    end = time.monotonic() + 10
    while time.monotonic() < end and len(descendants(d.pid)) < 3:
        time.sleep(0.05)
    kids = descendants(d.pid)
    assert len(kids) == 3, f"no analysis running: {kids}\n{d.log()}"
    time.sleep(0.3)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    rc = d.wait_exit(10)
    took = time.monotonic() - t0
    assert rc == 0, d.log()
    print(f"\nSIGTERM mid-analysis: exit {rc} after {took:.2f} s, {len(kids)} children gone")
    assert took < 3, f"SIGTERM mid-analysis took {took:.1f} s"
    end = time.monotonic() + 3
    while time.monotonic() < end and any(exists(p) for p in kids):
        time.sleep(0.05)
    assert not [p for p in kids if exists(p)], "child processes outlived the daemon"
    assert "SIGTERM: stopping" in d.log()


# -- the watched folder goes away --------------------------------------------------------

def test_watched_folder_deleted_and_recreated(tmp_path: Path):
    folder, other = tmp_path / "gone", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    write_checkpoint(str(folder / "ckpt-100.h5"), 100)
    write_checkpoint(str(other / "ckpt-100.h5"), 100)
    cfg = base_config(watch="inotify", models=[{"name": "gone", "path": str(folder)},
                                               {"name": "other", "path": str(other)}])
    d = DaemonProcess(tmp_path, cfg).start()
    try:
        d.wait_for(lambda s: _step(s, "gone") == 100 and _step(s, "other") == 100, "start")
        shutil.rmtree(folder)
        s = d.wait_for(lambda s: s.get("bnexporter_watcher_up", root=str(folder)) == 0,
                       "watcher of the deleted folder down")
        s = d.wait_for(lambda s: _step(s, "gone") is None, "series of the gone model dropped")
        # nothing unreadable, and no checkpoint any more: no model_up (issue 14), not 0
        assert s.get("bnexporter_model_up", model="gone") in (1, None)
        assert d.request("/healthz")[0] == 503
        write_checkpoint(str(other / "ckpt-200.h5"), 200)  # the rest goes on
        d.wait_for(lambda s: _step(s, "other") == 200, "other model still analysed")
        folder.mkdir()
        write_checkpoint(str(folder / "ckpt-300.h5"), 300)
        s = d.wait_for(lambda s: _step(s, "gone") == 300, "recreated folder analysed")
        assert s.get("bnexporter_watcher_up", root=str(folder)) == 1
        assert s.get("bnexporter_watcher_restarts_total") >= 1
        assert d.request("/healthz")[0] == 200
        # the new watcher sees new files (not only the rescan)
        write_checkpoint(str(folder / "ckpt-400.h5"), 400)
        d.wait_for(lambda s: _step(s, "gone") == 400, "events after recreation", timeout=4)
        assert "folder is gone" in d.log()
    finally:
        rc = d.stop()
    assert rc == 0, d.log()


# -- permission denied --------------------------------------------------------------------

def test_permission_denied_as_non_root():
    base = shared_dir()
    try:
        locked, private, fine = base / "locked", base / "private", base / "fine"
        for p in (locked, private, fine):
            p.mkdir()
            p.chmod(0o755)
        write_checkpoint(str(locked / "ckpt-100.h5"), 100)
        write_checkpoint(str(private / "ckpt-100.h5"), 100)
        write_checkpoint(str(fine / "ckpt-100.h5"), 100)
        locked.chmod(0o700)                         # root's: the daemon cannot list it
        (private / "ckpt-100.h5").chmod(0o600)      # root's: the daemon cannot read it
        cfg = base_config(watch="inotify", models=[
            {"name": "locked", "path": str(locked)}, {"name": "private", "path": str(private)},
            {"name": "fine", "path": str(fine)}])
        d = DaemonProcess(base, cfg, prefix=_as_user(NOBODY)).start()
        try:
            s = d.wait_for(lambda s: _step(s, "fine") == 100
                           and s.get("bnexporter_errors_total", reason="io") == 1,
                           "fine analysed, the unreadable file given up", timeout=15)
            assert s.get("bnexporter_watcher_up", root=str(locked)) == 0
            assert s.get("bnexporter_model_up", model="locked") == 0  # said, not silent
            assert s.get("bnexporter_model_up", model="private") == 0
            assert s.get("bnexporter_model_checkpoint_errors_total", model="private",
                         reason="io") == 1
            log = d.log()
            assert "cannot watch: Permission denied" in log
            assert f"skipping {locked}: cannot list: Permission denied" in log
            assert "Permission denied" in log.split("giving up on", 1)[1]
            assert d.request("/healthz")[0] == 503
            # access granted: the watcher comes up, both models are analysed
            locked.chmod(0o755)
            write_checkpoint(str(private / "ckpt-200.h5"), 200)
            s = d.wait_for(lambda s: _step(s, "locked") == 100 and _step(s, "private") == 200,
                           "both analysed once readable")
            assert s.get("bnexporter_watcher_up", root=str(locked)) == 1
            assert s.get("bnexporter_model_up", model="locked") == 1
            assert s.get("bnexporter_model_up", model="private") == 1
            assert d.request("/healthz")[0] == 200
        finally:
            rc = d.stop()
        assert rc == 0, d.log()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- inotify watch limit ------------------------------------------------------------------

_HOG = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    folder = sys.argv[1]
    names = [os.path.join(folder, n).encode() for n in os.listdir(folder)]
    fds, watches = [], 0
    while True:  # every file in every new instance until the kernel says ENOSPC
        fd = libc.inotify_init1(0o2000000)
        if fd < 0:
            print("instances exhausted", ctypes.get_errno(), flush=True); break
        fds.append(fd)
        full = False
        for n in names:
            if libc.inotify_add_watch(fd, n, 0x2) < 0:
                full = ctypes.get_errno() == 28; break
            watches += 1
        if full:
            break
    print(f"ready {watches} watches {len(fds)} instances", flush=True)
    sys.stdin.read()
""")


def test_inotify_watch_limit_falls_back_to_polling():
    uid = NOBODY + 1
    base = shared_dir(owner=uid)
    hog = None
    try:
        files = base / "hog"
        files.mkdir()
        max_watches = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
        max_instances = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
        per = max_watches // (max_instances - 8) + 1
        for i in range(per):
            (files / f"f{i}").touch()
        hog = subprocess.Popen([*_as_user(uid), sys.executable, "-c", _HOG, str(files)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = hog.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("ready"), line
        model = base / "model"
        model.mkdir()
        os.chown(model, uid, uid)
        cfg = base_config(watch="inotify", poll_interval=0.3,
                          models=[{"name": "m", "path": str(model)}])
        d = DaemonProcess(base, cfg, prefix=_as_user(uid)).start()
        try:
            s = d.wait_for(lambda s: s.get("bnexporter_watcher_polling", root=str(model)) == 1,
                           "fallback to polling")
            assert s.get("bnexporter_watcher_up", root=str(model)) == 1
            assert "inotify limit reached (inotify watch limit reached" in d.log()
            assert "polling every 0.3 s instead" in d.log()
            write_checkpoint(str(model / "ckpt-100.h5"), 100)
            d.wait_for(lambda s: _step(s, "m") == 100, "checkpoint seen by polling")
            assert d.request("/healthz")[0] == 200
        finally:
            rc = d.stop()
        assert rc == 0, d.log()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait(5)
        shutil.rmtree(base, ignore_errors=True)


# -- /tmp full ----------------------------------------------------------------------------

_FILL_TMP = textwrap.dedent("""
    set -e
    # a checkout or interpreter under /tmp (KEEP: its top-level entry) stays visible
    if [ -n "$KEEP" ]; then
        mkdir -p /dev/shm/bnx-orig-tmp && mount --bind /tmp /dev/shm/bnx-orig-tmp
    fi
    mount -t tmpfs -o size=64k,nr_inodes=32,mode=1777 tmpfs /tmp
    if [ -n "$KEEP" ]; then
        mkdir "/tmp/$KEEP" && mount --bind "/dev/shm/bnx-orig-tmp/$KEEP" "/tmp/$KEEP"
    fi
    mount --bind /tmp /var/tmp
    dd if=/dev/zero of=/tmp/fill bs=4k 2>/dev/null || true
    i=0; while touch /tmp/f$i 2>/dev/null; do i=$((i+1)); done
    cd /tmp
    exec "$@"
""")


def _kept_tmp_entry() -> str:
    """The top-level /tmp entry holding the interpreter or this checkout, if any."""
    for p in (os.path.realpath(sys.executable), os.path.realpath(__file__)):
        if p.startswith("/tmp/"):
            return p.split("/")[2]
    return ""


def _private_tmp_works() -> str | None:
    if UNSHARE is None:
        return "unshare not installed"
    res = subprocess.run([UNSHARE, "--mount", "--propagation", "private", "sh", "-c",
                          "mount -t tmpfs tmpfs /tmp"], capture_output=True, text=True)
    return None if res.returncode == 0 else res.stderr.strip()


def test_tmp_full_falls_back_to_threads_and_recovers():
    why = _private_tmp_works()
    keep = _kept_tmp_entry()
    base = Path(f"/dev/shm/bnexporter-rel-{os.getpid()}")  # not under the full /tmp
    base.mkdir()
    try:
        folder = base / "m"
        folder.mkdir()
        write_checkpoint(str(folder / "ckpt-100.h5"), 100)
        cfg = base_config(models=[{"name": "m", "path": str(folder)}])
        if why is None:
            prefix = ["env", f"KEEP={keep}", UNSHARE, "--mount", "--propagation", "private",
                      "sh", "-c", _FILL_TMP, "sh"]
            d = DaemonProcess(base, cfg, prefix=prefix)
        else:  # no mount namespaces here: make tempfile find no usable folder instead
            print(f"private /tmp unavailable ({why}); simulating with a missing tempdir")
            d = DaemonProcess(base, cfg, launcher=[sys.executable, "-c", (
                "import runpy, sys, tempfile; tempfile.tempdir = '/nonexistent/tmp-full'; "
                "sys.argv[0] = 'bnexporter'; runpy.run_module('bnexporter', "
                "run_name='__main__')")])
        d.start()
        try:
            d.wait_for(lambda s: _step(s, "m") == 100, "analysed despite /tmp full")
            log = d.log()
            assert "cannot start an analysis process" in log
            assert "No usable temporary directory" in log or "No space left" in log
            write_checkpoint(str(folder / "ckpt-200.h5"), 200)
            d.wait_for(lambda s: _step(s, "m") == 200, "still analysing in threads")
            if why is None:  # free /tmp (as seen by the daemon) and processes come back
                for name in os.listdir(f"/proc/{d.pid}/root/tmp"):
                    if name != keep:
                        os.unlink(f"/proc/{d.pid}/root/tmp/{name}")
                time.sleep(5.5)
                write_checkpoint(str(folder / "ckpt-300.h5"), 300)
                d.wait_for(lambda s: _step(s, "m") == 300, "analysed after /tmp freed")
                d.wait_log("analysis processes work again", timeout=5)
                assert descendants(d.pid), "no forkserver after /tmp was freed"
        finally:
            rc = d.stop()
        assert rc == 0, d.log()
    finally:
        shutil.rmtree(base, ignore_errors=True)
