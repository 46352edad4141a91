"""Prometheus text for one-shot scans (``scan --format prometheus``, ``scan --textfile``).

The same families as the daemon's ``/metrics`` (``daemon.web.collector``), so names,
help and labels cannot drift: node_exporter's textfile collector (files written
atomically: a hidden temporary file in the same folder, then ``rename``) and a
Pushgateway (``curl --data-binary @-``) read them as they are. Per model the newest
checkpoint wins, as in the daemon: its numbers, or ``model_up 0`` and the newest good
one's numbers when it could not be read.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from bnexporter.daemon.config import MetricOptions
from bnexporter.daemon.state import ModelView, frozen
from bnexporter.daemon.web.collector import model_families
from bnexporter.report import CheckpointReport
from bnexporter.steps import step_from_name

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def model_name(path: str) -> str:
    """The folder that holds the checkpoint (above a ``checkpoint-500/`` step folder)."""
    folder = os.path.dirname(os.path.abspath(path.rstrip(os.sep) or path))
    name = os.path.basename(folder)
    if name and step_from_name(os.path.join(folder, "x")) is not None:
        name = os.path.basename(os.path.dirname(folder)) or name
    return name or "model"


def _key(r: CheckpointReport) -> tuple[int, float]:
    return (r.step if r.step is not None else -1, r.mtime or 0.0)


def views(reports: Sequence[CheckpointReport], names: Sequence[str],
          metrics: MetricOptions, now: float | None = None) -> list[ModelView]:
    """One view per model name: the newest report, the newest good one's numbers."""
    now = time.time() if now is None else now
    by_model: dict[str, list[CheckpointReport]] = {}
    for report, name in zip(reports, names, strict=True):
        by_model.setdefault(name, []).append(report)
    out = []
    for name, group in by_model.items():
        group.sort(key=_key)
        good = [r for r in group if r.ok]
        newest = group[-1]
        errors: dict[str, int] = {}
        for r in group:
            if not r.ok:
                errors[r.error_reason or "internal"] = errors.get(r.error_reason or "internal",
                                                                  0) + 1
        folder = os.path.dirname(os.path.abspath(newest.path))
        out.append(ModelView(name, folder, metrics, report=good[-1] if good else None,
                             analysed_at=now if good else None, up=newest.ok,
                             error=newest.error, errors=frozen(errors)))
    return out


class _Families(Collector):
    def __init__(self, families: list[Metric]):
        self.families = families

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render(model_views: Sequence[ModelView]) -> bytes:
    """Text format 0.0.4 of the models' families (empty families left out)."""
    families = [f for f in model_families(list(model_views)) if f.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def file_name(model: str) -> str:
    return f"bnexporter_{_UNSAFE.sub('_', model) or 'model'}.prom"


def write_atomic(directory: str, name: str, data: bytes) -> str:
    """``directory/name`` replaced in one rename: a reader sees the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        target = os.path.join(directory, name)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def write_textfiles(directory: str, model_views: Sequence[ModelView]) -> list[str]:
    """One ``bnexporter_<model>.prom`` per model (other models' files stay)."""
    return [write_atomic(directory, file_name(v.name), render([v])) for v in model_views]
