"""Version, source revision and Python version: ``--version`` and ``bnexporter_build_info``.

The revision is ``$BNEXPORTER_REVISION`` when set (a container build passes the commit),
else the commit of the git checkout the package runs from (an editable install), read
from ``.git`` without running git, else ``unknown``.
"""

from __future__ import annotations

import functools
import os
import platform
import re

from bnexporter import __version__

_SHA = re.compile(r"[0-9a-f]{40}")


def _git_dir(start: str) -> str | None:
    path = os.path.join(start, ".git")
    if os.path.isfile(path):  # a worktree: "gitdir: /repo/.git/worktrees/x"
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read().strip()
        except OSError:
            return None
        return text.removeprefix("gitdir:").strip() or None
    return path if os.path.isdir(path) else None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(4096).strip()
    except (OSError, UnicodeError):
        return None


def _git_revision(git_dir: str) -> str | None:
    head = _read(os.path.join(git_dir, "HEAD"))
    if head is None:
        return None
    if not head.startswith("ref:"):
        return head if _SHA.fullmatch(head) else None
    ref = head[4:].strip()
    common = _read(os.path.join(git_dir, "commondir"))
    dirs = [git_dir] + ([os.path.join(git_dir, common)] if common else [])
    for d in dirs:
        sha = _read(os.path.join(d, ref))
        if sha and _SHA.fullmatch(sha):
            return sha
        packed = _read(os.path.join(d, "packed-refs")) if d else None
        for line in (packed or "").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref and _SHA.fullmatch(parts[0]):
                return parts[0]
    return None


@functools.lru_cache(maxsize=1)
def revision() -> str:
    env = os.environ.get("BNEXPORTER_REVISION", "").strip()
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git_dir = _git_dir(root)
    return (_git_revision(git_dir) if git_dir else None) or "unknown"


def python_version() -> str:
    return platform.python_version()


def version_text() -> str:
    """What ``bnexporter --version`` prints (node_exporter's layout)."""
    return (f"bnexporter, version {__version__} (revision: {revision()})\n"
            f"  python version:   {python_version()} ({platform.python_implementation()})\n"
            f"  platform:         {platform.system().lower()}/{platform.machine()}")
