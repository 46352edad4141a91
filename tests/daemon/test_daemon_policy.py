"""The planner's pure decisions: settle, backoff, ordering, shards, coalescing, files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from bnexporter.daemon.config import DEFAULT_PATTERNS, Retry
from bnexporter.daemon.demo import checkpoint_bytes
from bnexporter.daemon.files import Candidate, ignored_file, ignored_path, list_candidates
from bnexporter.daemon.mounts import choose_mode, fs_type, parse_mountinfo
from bnexporter.daemon.policy import (
    Key,
    Slot,
    backoff,
    give_up,
    in_order,
    is_newer,
    newest,
    observe,
    owned,
    settled,
    shard_of,
)
from bnexporter.formats.sniff import incomplete


def test_settle_needs_a_stable_signature_for_the_whole_period():
    a = observe(None, (10, 1), now=100.0)
    assert not settled(a, 100.0, 2.0, mtime=1000.0, wall_now=1000.5)
    b = observe(a, (10, 1), now=101.0)
    assert b is a and not settled(b, 101.0, 2.0, mtime=1000.0, wall_now=1001.0)
    c = observe(b, (20, 2), now=101.9)  # grew: the clock starts again
    assert c.since == 101.9 and not settled(c, 103.0, 2.0, mtime=1001.5, wall_now=1002.6)
    assert settled(c, 103.9, 2.0, mtime=1001.5, wall_now=1003.0)


def test_settle_shortcuts_old_mtime_and_close_events():
    first = observe(None, (10, 1), now=5.0)
    assert settled(first, 5.0, 2.0, mtime=1000.0, wall_now=1010.0)  # untouched for 10 s
    assert settled(first, 5.0, 2.0, mtime=1009.9, wall_now=1010.0, closed_sig=(10, 1))
    assert not settled(first, 5.0, 2.0, mtime=1009.9, wall_now=1010.0, closed_sig=(9, 1))


def test_backoff_doubles_and_is_capped():
    r = Retry(initial_delay=2, max_delay=60)
    assert [backoff(n, r) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]


def test_give_up_after_attempts_or_time():
    r = Retry(max_attempts=3, give_up_after=100)
    assert not give_up(2, first=0, now=50, retry=r)
    assert give_up(3, first=0, now=50, retry=r)
    assert give_up(1, first=0, now=100, retry=r)


def _c(path: str, step: int | None, mtime: float) -> Candidate:
    return Candidate(path, (1, int(mtime)), mtime, step)


def test_newest_is_by_step_when_known_else_by_mtime():
    a, b, c = _c("ckpt-300", 300, 1.0), _c("ckpt-100", 100, 3.0), _c("ckpt-200", 200, 2.0)
    assert newest([a, b, c]) is a
    assert [x.path for x in in_order([a, b, c])] == ["ckpt-100", "ckpt-200", "ckpt-300"]
    last = _c("last.ckpt", None, 4.0)
    assert newest([a, b, last]) is last
    assert newest([]) is None
    assert is_newer(Key(300, 1.0), Key(200, 5.0))
    assert not is_newer(Key(200, 5.0), Key(300, 1.0))
    assert is_newer(Key(None, 5.0), Key(300, 1.0))
    assert is_newer(Key(300, 2.0), Key(300, 1.0))  # same step rewritten later


def test_shard_hash_is_stable_and_partitions():
    # crc32, not hash(): the same in every process, every Python
    assert shard_of("resnet50", 3) == 1 and shard_of("mobilenet", 3) == 0
    names = [f"job-{i}" for i in range(3000)]
    counts = [sum(owned(n, (i, 3)) for n in names) for i in range(3)]
    assert sum(counts) == len(names) and min(counts) > 900
    assert all(owned(n, (0, 1)) for n in names[:10])


def test_slot_coalesces_to_the_newest_while_running():
    s: Slot[str] = Slot()
    assert s.offer("a") is True  # hand to a worker
    assert s.start() == "a"
    assert s.offer("b") is False  # waits behind a
    assert s.offer("c") is False  # replaces b
    assert s.finish() is True
    assert s.start() == "c" and s.pending is None
    assert s.finish() is False


@pytest.mark.parametrize("name", ["tmpa1b2.h5", ".ckpt-1.h5.swp", "ckpt-1.h5.tmp",
                                  "model.safetensors.partial", "ckpt-3.index.tempstate123",
                                  "ckpt-3.data-00000-of-00001", ".hidden.pt", "x.incomplete"])
def test_temporary_files_are_ignored(name):
    assert ignored_file(name)


def test_ignored_path_and_candidates(tmp_path: Path):
    (tmp_path / "ckpt-1_temp").mkdir()
    (tmp_path / "ckpt-1_temp" / "part-0.h5").write_bytes(b"x")
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.h5").write_bytes(b"x")  # below the depth limit
    (tmp_path / "ckpt-7.h5").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "tmpabcd.h5").write_bytes(b"x")
    found = {Path(c.path).relative_to(tmp_path).as_posix(): c.step
             for c in list_candidates(str(tmp_path), DEFAULT_PATTERNS)}
    assert found == {"ckpt-7.h5": 7, "checkpoint-500/model.safetensors": 500}
    assert ignored_path(str(tmp_path / "ckpt-1_temp" / "part-0.h5"), str(tmp_path))
    assert not ignored_path(str(tmp_path / "ckpt-7.h5"), str(tmp_path))


def test_tf_bundle_is_one_unit_following_the_state_file(tmp_path: Path):
    for step in (1, 2):
        (tmp_path / f"ckpt-{step}.index").write_bytes(b"i" * step)
        (tmp_path / f"ckpt-{step}.data-00000-of-00001").write_bytes(b"d")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (c,) = list_candidates(str(tmp_path), DEFAULT_PATTERNS)
    assert c.path == str(tmp_path / "ckpt-1.index") and c.step == 1
    (tmp_path / "ckpt-1.data-00000-of-00001").write_bytes(b"dd")  # a shard changed
    (c2,) = list_candidates(str(tmp_path), DEFAULT_PATTERNS)
    assert c2.sig != c.sig


MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 253:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /mnt/shared rw,relatime - nfs4 srv:/export rw
41 40 0:51 / /mnt/shared/local\040disk rw - ext4 /dev/vdb rw
42 27 0:52 / /gcs rw - fuse.gcsfuse bucket rw
43 27 0:53 / /lustre rw - lustre mgs@tcp:/fs rw
"""


def test_mount_type_by_longest_prefix():
    mounts = parse_mountinfo(MOUNTINFO)
    assert ("/mnt/shared/local disk", "ext4") in mounts
    assert fs_type("/mnt/shared/jobs/a", mounts) == "nfs4"
    assert fs_type("/mnt/shared/local disk/x", mounts) == "ext4"
    assert fs_type("/mnt/sharedother", mounts) == "ext4"
    assert fs_type("/gcs/bucket/run", mounts) == "fuse.gcsfuse"


@pytest.mark.parametrize(("path", "mode"), [
    ("/mnt/shared/jobs", "poll"), ("/mnt/shared/local disk/jobs", "inotify"),
    ("/gcs/x", "poll"), ("/lustre/y", "poll"), ("/home/z", "inotify")])
def test_auto_mode_polls_network_and_fuse_filesystems(path, mode):
    assert choose_mode(path, "auto", MOUNTINFO)[0] == mode
    assert choose_mode(path, "inotify", MOUNTINFO) == ("inotify", "configured")


def test_zip_completeness(tmp_path: Path):
    path = tmp_path / "a.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "{}" * 1000)
        zf.comment = b"trailing comment"
    assert incomplete(str(path)) is None
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    assert incomplete(str(path))[0] == "truncated"


def test_safetensors_size_equation(tmp_path: Path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 16
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    assert incomplete(str(path)) is None
    path.write_bytes(blob[:-4])
    assert incomplete(str(path))[0] == "truncated"
    path.write_bytes(b"")
    assert incomplete(str(path)) == ("truncated", "file is empty")


def test_hdf5_end_of_file_address(tmp_path: Path):
    data = checkpoint_bytes(100)
    path = tmp_path / "ckpt-100.h5"
    path.write_bytes(data)
    assert incomplete(str(path)) is None
    path.write_bytes(data[: len(data) // 2])
    reason, message = incomplete(str(path))
    assert reason == "truncated" and "superblock" in message
