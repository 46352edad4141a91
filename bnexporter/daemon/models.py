"""From configuration to the concrete set of models this replica watches.

A named folder is one model. A ``{model}`` template's models are the
subfolders of its base (with the template's suffix inside them) that exist
right now; they are re-listed on events and on every rescan. With ``shard: I/N``
only the models whose name hashes to I are kept.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from bnexporter.daemon import names
from bnexporter.daemon.config import Analysis, Config, ModelSpec
from bnexporter.daemon.files import ignored_dir
from bnexporter.daemon.policy import owned

log = logging.getLogger("bnexporter.models")


@dataclass(frozen=True)
class Target:
    """One concrete model: a name, a folder and its effective settings."""

    name: str
    folder: str
    analysis: Analysis
    spec_index: int  # the ModelSpec it came from


def _escapes(entry: os.DirEntry[str], base: str) -> bool:
    """A symlinked subfolder whose target is not below ``base``."""
    try:
        if not entry.is_symlink():
            return False
        target = os.path.realpath(entry.path, strict=True)
    except OSError:
        return True
    real = os.path.realpath(base)
    return not target.startswith(real.rstrip(os.sep) + os.sep)


def discover(spec: ModelSpec) -> dict[str, str]:
    """name -> folder for a template's current subfolders (a symlinked subfolder
    only when it stays below the base, unless ``follow_symlinks``)."""
    base, suffix = spec.template_parts()
    found: dict[str, str] = {}
    try:
        with os.scandir(base) as it:
            entries = [e for e in it if not ignored_dir(e.name)]
    except OSError:
        return found
    for entry in entries:
        try:
            if not entry.is_dir():
                continue
            if not spec.analysis.follow_symlinks and _escapes(entry, base):
                log.debug("%s: symlink out of %s not followed", entry.path, base)
                continue
        except OSError:
            continue
        folder = os.path.join(entry.path, suffix) if suffix else entry.path
        if suffix and not os.path.isdir(folder):
            continue
        name = names.clean(entry.name)  # not UTF-8: \xNN escapes (names.py), the folder stays
        if name in found:
            log.warning("%s: model name %s already used by another folder; skipped",
                        folder, name)
            continue
        found[name] = folder
    return found


def targets(cfg: Config) -> dict[str, Target]:
    """Every model of ``cfg`` this shard owns; static names win over discovered ones."""
    out: dict[str, Target] = {}
    for spec in cfg.models:
        if spec.template or spec.name is None or not owned(spec.name, cfg.shard):
            continue
        out[spec.name] = Target(spec.name, spec.path, spec.analysis, spec.index)
    for spec in cfg.models:
        if spec.template:
            out.update(template_targets(cfg, spec, out))
    return out


def template_targets(cfg: Config, spec: ModelSpec, taken: dict[str, Target]
                     ) -> dict[str, Target]:
    found: dict[str, Target] = {}
    for name, folder in discover(spec).items():
        if not owned(name, cfg.shard):
            continue
        other = taken.get(name)
        if other is not None and other.spec_index != spec.index:
            log.debug("%s: model name %r already used by models[%d]; skipped",
                      folder, name, other.spec_index)
            continue
        found[name] = Target(name, folder, spec.analysis, spec.index)
    return found


def watch_roots(cfg: Config) -> dict[str, str]:
    """Folder to observe -> watch mode (auto|inotify|poll); templates watch their base."""
    roots: dict[str, str] = {}
    for spec in cfg.models:
        if spec.template:
            root = spec.template_parts()[0]
        elif spec.name is not None and owned(spec.name, cfg.shard):
            root = spec.path
        else:
            continue
        mode = cfg.watch_mode(spec)
        if roots.get(root) != "poll":  # two entries disagree: polling sees everything
            roots[root] = mode
    return roots
