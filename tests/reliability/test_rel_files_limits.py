"""Issue 13.6 and 13.7 on the real daemon: changing files (an HDF5 saved in place in
several open/close sessions, a checkpoint replaced by one of the same size and mtime, a
deleted checkpoint) and visibility (a stopped forkserver, an inotify queue overflow, a
busy log file beside 10,000 unrelated files)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import h5py
import pytest
from rel_support import RELU_RULE, base_config, bn_tensors, descendants, safetensors_bytes

from bnexporter.daemon.demo import write_checkpoint
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.slow


def _cfg(folder: Path, **extra) -> dict:
    return base_config(log_level="info", models=[{"name": "m", "path": str(folder)}],
                       **RELU_RULE, **extra)


def _in_place_h5(src: Path, dst: Path, pause: float) -> None:
    """Copy an HDF5 checkpoint the way an in-place writer without file locking saves:
    attributes first, then one layer group per open/close session."""
    with h5py.File(src, "r") as a:
        with h5py.File(dst, "w", locking=False) as b:
            for k, v in a.attrs.items():
                b.attrs[k] = v
            for g in a:
                for k, v in a[g].attrs.items():
                    b.require_group(g).attrs[k] = v
        for g in a:
            for child in a[g]:
                time.sleep(pause)
                with h5py.File(dst, "a", locking=False) as b:
                    a.copy(a[g][child], b[g], name=child)


def test_changing_files(tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    final = tmp_path / "final.h5"
    write_checkpoint(str(final), 200)
    with h5py.File(final, "r") as f:
        n_groups = sum(len(f[g]) for g in f)
    st_path = folder / "ckpt-100.safetensors"
    st_path.write_bytes(safetensors_bytes(bn_tensors(["bn1", "bn2"], dead=2)))
    d = DaemonProcess(tmp_path, _cfg(folder, settle_seconds=1.0)).start()
    try:
        d.wait_for(lambda s: s.get("bnexporter_model_dead_channels", model="m") == 4, "first")
        # replaced by another file of the same size and mtime: analysed again
        st = st_path.stat()
        other = safetensors_bytes(bn_tensors(["bn1", "bn2"], dead=3))
        assert len(other) == st.st_size
        tmp = folder / ".tmp-x"
        tmp.write_bytes(other)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, st_path)
        d.wait_for(lambda s: s.get("bnexporter_model_dead_channels", model="m") == 6,
                   "same size + mtime replacement re-analysed", timeout=20)
        # an HDF5 saved in place in several sessions (pauses shorter than settle_seconds):
        # only the finished file is ever exported
        seen: list[float | None] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                s = d.scrape()
                if s.get("bnexporter_model_checkpoint_step", model="m") == 200:
                    seen.append(s.get("bnexporter_model_bn_layers", model="m"))
                time.sleep(0.05)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        _in_place_h5(final, folder / "ckpt-200.h5", pause=0.4)
        d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="m") == 200,
                   "in-place HDF5 exported", timeout=30)
        time.sleep(1)
        stop.set()
        t.join(5)
        assert seen and len(set(seen)) == 1, seen  # never a partial version
        assert n_groups >= 4
        # the exported checkpoint deleted: the remaining one is exported again
        (folder / "ckpt-200.h5").unlink()
        d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="m") == 100,
                   "fallback to the remaining checkpoint", timeout=20)
        st_path.unlink()  # and none left: the model's series go
        d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="m") is None,
                   "series dropped", timeout=20)
    finally:
        assert d.stop() == 0


def _forkserver(pid: int) -> int:
    for p in descendants(pid):
        try:
            if b"forkserver" in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
        except OSError:
            pass
    raise AssertionError("no forkserver")


def test_stopped_forkserver_is_seen_and_resumed(tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "ckpt-1.safetensors").write_bytes(safetensors_bytes(bn_tensors(["bn1"])))
    d = DaemonProcess(tmp_path, _cfg(folder)).start()
    try:
        d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="m") == 1, "first")
        fs = _forkserver(d.pid)
        os.kill(fs, signal.SIGSTOP)
        t0 = time.monotonic()
        (folder / "ckpt-2.safetensors").write_bytes(safetensors_bytes(bn_tensors(["a", "b"])))
        d.wait_for(lambda s: s.get("bnexporter_worker_pool_up") == 0, "pool down", timeout=10)
        status, body, _ = d.request("/healthz")
        assert status == 503 and b"forkserver" in body, body
        d.wait_log("forkserver .* is stopped")
        s = d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="m") == 2,
                       "analysed after the watchdog resumed it", timeout=30)
        print(f"stopped forkserver: analysis resumed after {time.monotonic() - t0:.1f} s")
        assert (s.get("bnexporter_worker_stalls_total", what="forkserver") or 0) >= 1
        d.wait_for(lambda s: s.get("bnexporter_worker_pool_up") == 1, "pool up")
        assert d.request("/healthz")[0] == 200
    finally:
        with_pid = d.alive()
        assert d.stop() == 0 or not with_pid


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_overflow_rescan_and_busy_log(tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "ckpt-1.safetensors").write_bytes(safetensors_bytes(bn_tensors(["bn1"])))
    for i in range(10_000):
        (folder / f"f{i:05d}.txt").touch()
    limit = Path("/proc/sys/fs/inotify/max_queued_events")
    old = limit.read_text()
    try:  # read when the daemon's inotify instance is made; restored right after
        limit.write_text("64\n")
    except OSError:
        pytest.skip("cannot lower fs.inotify.max_queued_events")
    try:
        d = DaemonProcess(tmp_path, _cfg(folder, rescan_interval=300, watch="inotify")).start()
        d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="m") == 1,
                   "first")
    finally:
        limit.write_text(old)
    try:
        # a log appended 50 times a second: the planner must not list 10,000 files each time
        log = folder / "train.log"
        c0, t0 = _cpu(d.pid), time.monotonic()
        with open(log, "a") as fh:
            for i in range(250):
                fh.write(f"line {i}\n")
                fh.flush()
                time.sleep(0.02)
        share = (_cpu(d.pid) - c0) / (time.monotonic() - t0)
        print(f"busy log beside 10,000 files: {share * 100:.1f} % of a core")
        assert share < 0.06, share
        # overflow: a burst of events larger than the queue while a checkpoint arrives
        d.send(signal.SIGSTOP)  # hold the reader so the kernel queue overflows for sure
        for i in range(300):
            (folder / f"burst{i}.txt").write_text("x")
        (folder / "ckpt-2.safetensors").write_bytes(safetensors_bytes(bn_tensors(["a", "b"])))
        d.send(signal.SIGCONT)
        t0 = time.monotonic()
        s = d.wait_for(lambda s: s.get("bnexporter_model_checkpoint_step", model="m") == 2,
                       "checkpoint found after the overflow", timeout=15)
        print(f"after an overflow: exported in {time.monotonic() - t0:.1f} s")
        assert (s.get("bnexporter_watcher_overflows_total", root=str(folder)) or 0) >= 1
    finally:
        assert d.stop() == 0
