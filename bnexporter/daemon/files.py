"""Which files in a model folder are checkpoints, and in what order they came.

A TF bundle (``prefix.index`` + ``prefix.data-*`` shards, announced by the
``checkpoint`` state file) is one unit: its ``.index`` is the candidate, its
signature covers every shard, and where a state file exists only the prefix it
names counts (older prefixes are history, partial saves are not announced yet).

Only regular files are candidates: a FIFO, socket or device named ``x.pt`` that
anyone can drop into a shared folder would block or feed an endless read.
Symbolic links are followed only to a file inside the model folder (Lightning's
``last.ckpt``) unless ``follow_symlinks: true``: a link must not make the daemon
read, or report on, files outside what it was asked to watch.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from bnexporter.steps import step_from_name

MAX_DEPTH = 3  # model folder + 2 levels (HF "checkpoint-500/", Lightning "checkpoints/")
_DATA_SHARD = re.compile(r"\.data-\d+-of-\d+$")
# HDF5 writers without file locking (NFS, Lustre) may close and re-open a file while
# saving: its close-after-write is no proof of a finished file (issue 13.6)
CLOSE_NOT_FINAL = ("*.h5", "*.hdf5")


def may_matter(path: str, patterns: Iterable[str]) -> bool:
    """Whether a file event at ``path`` can change a model's candidates: a checkpoint
    name, a TF data shard or state file. A log appended 50 times a second beside
    10,000 files must not make the planner list the folder 50 times a second."""
    name = os.path.basename(path)
    return (name == "checkpoint" or bool(_DATA_SHARD.search(name))
            or any(fnmatch.fnmatchcase(name, p) for p in patterns))


def sig_of(st: os.stat_result) -> tuple[int, ...]:
    """One version of a file: size and mtime, and inode and ctime, so that a file replaced
    by another of the same size and mtime (renamed over it, ``cp -p``, ``os.utime``) is a
    new version; ctime is set by the kernel on every change and cannot be set back."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True)
class Candidate:
    path: str
    sig: tuple[int, ...]   # changes whenever any byte of the unit may have changed
    mtime: float           # newest mtime of the unit's files
    step: int | None       # from the name (or step_regex)


def ignored_file(name: str) -> bool:
    """Temporary and partial files that writers rename or delete later."""
    return (name.startswith((".", "tmp")) or name.endswith((".tmp", ".partial", ".incomplete",
                                                             ".lock", ".swp"))
            or ".tempstate" in name or bool(_DATA_SHARD.search(name)))


def ignored_dir(name: str) -> bool:
    """TF writes shards into ``<prefix>_temp/``; Keras/Lightning use ``tmp*``."""
    return name.startswith((".", "tmp")) or name.endswith("_temp") or name == "__pycache__"


def ignored_path(path: str, folder: str) -> bool:
    """True when any component of ``path`` below ``folder`` is temporary."""
    rel = os.path.relpath(path, folder)
    if rel.startswith(".."):
        return False
    parts = rel.split(os.sep)
    return any(ignored_dir(p) for p in parts[:-1]) or ignored_file(parts[-1])


def _newest_tf_prefix(folder: str) -> str | None:
    try:  # optional: TF bundles are supported only when their reader is present
        from bnexporter.formats.tf_bundle import newest_prefix
    except ImportError:
        return None
    return newest_prefix(folder)


def _tf_unit(entries: dict[str, os.DirEntry[str]], index: os.DirEntry[str]) -> tuple[
        tuple[int, ...], float]:
    prefix = index.name[: -len(".index")]
    sig: list[int] = []
    newest = 0.0
    for name in sorted(n for n in entries if n == index.name or n.startswith(prefix + ".data-")):
        st = entries[name].stat()
        sig += sig_of(st)
        newest = max(newest, st.st_mtime)
    return tuple(sig), newest


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_refused(entry: os.DirEntry[str], boundary: str) -> str | None:
    """Why a symlink is not followed (``None``: its target is a file in the folder)."""
    try:
        target = os.path.realpath(entry.path, strict=True)
    except OSError as exc:  # dangling, or a loop (ELOOP)
        return f"symlink cannot be resolved ({exc.strerror or exc})"
    if not _inside(target, boundary):
        return f"symlink points outside the model folder (to {target})"
    return None


def list_candidates(folder: str, patterns: Iterable[str], step_regex: str | None = None,
                    max_depth: int = MAX_DEPTH, follow_symlinks: bool = False,
                    skipped: dict[str, str] | None = None) -> list[Candidate]:
    """Every checkpoint unit under ``folder`` (files that vanish mid-walk are skipped).

    Matching entries left out for safety (links, non-regular files) and folders
    that cannot be listed (``folder`` itself included) are put in ``skipped``
    (path -> why) so the caller can say so once.
    """
    pats = tuple(patterns)
    out: list[Candidate] = []
    boundary = os.path.realpath(folder)
    notes: dict[str, str] = {} if skipped is None else skipped
    links: dict[str, str] = {}   # candidate that is a symlink -> its target
    stack = [(folder, 1)]
    while stack:
        current, depth = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = {e.name: e for e in it}
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):  # gone is normal; unreadable is not
                notes[current] = f"cannot list: {exc.strerror or exc}"
            continue
        tf_keep: str | None = None
        if "checkpoint" in entries:
            prefix = _newest_tf_prefix(current)
            tf_keep = os.path.basename(prefix) + ".index" if prefix else ""
        for name, entry in entries.items():
            try:
                link = entry.is_symlink()
                if link and not follow_symlinks and os.path.isdir(entry.path):
                    if depth < max_depth and not ignored_dir(name):
                        notes[entry.path] = "symlinked folder not followed"
                    continue
                if entry.is_dir(follow_symlinks=follow_symlinks):
                    if depth < max_depth and not ignored_dir(name):
                        stack.append((entry.path, depth + 1))
                    continue
                announced = bool(tf_keep) and name == tf_keep  # ".index": an empty prefix
                if (ignored_file(name) and not announced) or \
                        not any(fnmatch.fnmatchcase(name, p) for p in pats):
                    continue
                if link and not follow_symlinks:
                    why = _link_refused(entry, boundary)
                    if why is not None:
                        notes[entry.path] = why
                        continue
                if not stat.S_ISREG(entry.stat().st_mode):
                    notes[entry.path] = "not a regular file"
                    continue
                if name.endswith(".index"):
                    if tf_keep is not None and name != tf_keep:
                        continue
                    sig, mtime = _tf_unit(entries, entry)
                else:
                    st = entry.stat()
                    sig, mtime = sig_of(st), st.st_mtime
            except OSError:
                continue
            if link:
                links[entry.path] = os.path.realpath(entry.path)
            out.append(Candidate(entry.path, sig, mtime, step_from_name(entry.path, step_regex)))
    if links:  # Lightning's last.ckpt -> epoch=3-step=1500.ckpt: keep the name with the step
        real = {os.path.realpath(c.path) for c in out if c.path not in links}
        out = [c for c in out if c.path not in links or links[c.path] not in real]
    return out


def stat_candidate(c: Candidate) -> Candidate | None:
    """The same unit re-read from disk (None when it is gone)."""
    folder = os.path.dirname(c.path)
    try:
        with os.scandir(folder) as it:
            entries = {e.name: e for e in it}
        entry = entries.get(os.path.basename(c.path))
        if entry is None:
            return None
        if c.path.endswith(".index"):
            sig, mtime = _tf_unit(entries, entry)
        else:
            st = entry.stat()
            sig, mtime = sig_of(st), st.st_mtime
    except OSError:
        return None
    return Candidate(c.path, sig, mtime, c.step)
