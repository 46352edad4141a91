"""The census step of one analysis: find the graph and the sample, run, decide.

A sample is given explicitly (``scan --census FILE``, ``ScanOptions.census``) or
dropped next to the checkpoints as ``bnexporter-census.npy`` / ``.npz``. Without
a sample nothing changes: the data-free estimate stands.
"""

from __future__ import annotations

import os
import time

import numpy as np

from bnexporter.detection.analysis import Thresholds
from bnexporter.detection.census import CensusResult, run_census
from bnexporter.detection.sample import load_sample
from bnexporter.detection.verdicts import MIN_POSITIONS, apply_census
from bnexporter.errors import CheckpointError, printable
from bnexporter.formats.base import Reader
from bnexporter.report import LayerReport
from bnexporter.topology import sources
from bnexporter.topology.graph import Graph
from bnexporter.topology.keras_ir import keras_graph_ir, keras_tensors_of

SAMPLE_NAMES = ("bnexporter-census.npy", "bnexporter-census.npz")
WARM_GIVE_UP = 4.0   # a warm start ending above 4x its inputs' objective starts over cold
WARM_FLOOR = 0.05    # ... unless it is below this anyway (docs/distill.md)


def sample_for(path: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for name in SAMPLE_NAMES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def graph_for(reader: Reader) -> Graph | None:
    cfg = reader.meta.model_config
    if cfg:
        return keras_graph_ir(cfg, keras_tensors_of(reader, cfg))
    found = sources.find(reader.path, reader.meta.framework, [], frozenset(reader.names()))
    return found.graph if found is not None else None


def measure_distilled(reader: Reader, reports: list[LayerReport], th: Thresholds,
                      seconds: float, notes: list[str],
                      warm_file: str | None = None) -> list[LayerReport]:
    """The census over inputs distilled from the BN statistics (opt-in: see docs/distill.md).

    Its verdicts are labelled ``census:distilled``. With ``warm_file`` (the daemon's, one
    per model) the previous checkpoint's inputs seed the optimisation and this one's are
    kept for the next: a few dozen steps instead of hundreds. A warm start that ends far
    above the objective its inputs had reached is discarded for a cold one in the time
    left.
    """
    from bnexporter.detection import warm
    from bnexporter.detection.distill import DistilledCensus, distilled_census

    graph = graph_for(reader)
    if graph is None:
        notes.append("distilled census: no graph for this checkpoint; the estimate decides")
        return reports
    deadline = time.monotonic() + seconds
    kept = None
    if warm_file is not None:
        try:
            kept = warm.load(warm_file, graph.input_shape)
        except CheckpointError as exc:
            notes.append(f"distilled census: {exc}; starting from noise")
    try:
        got: DistilledCensus | None = None
        if kept is not None:
            got = distilled_census(graph, reader.read_array, init=kept[0], deadline=deadline)
            if got.distilled.loss > max(WARM_GIVE_UP * kept[1], WARM_FLOOR):
                notes.append(f"distilled census: warm start reached only "
                             f"{got.distilled.loss:.4f} (kept inputs {kept[1]:.4f}); "
                             "starting from noise")
                got = None
        if got is None:  # from noise: distill's cold number of steps
            got = distilled_census(graph, reader.read_array, deadline=deadline)
    except (ValueError, CheckpointError) as exc:
        notes.append(f"distilled census: {printable(str(exc))}")
        return reports
    d = got.distilled
    notes.append(f"distilled census: {d.iterations} iterations "
                 f"({'warm' if d.warm else 'cold'}), loss {d.loss:.4f}, {got.seconds:.1f} s"
                 + (" (time budget reached)" if d.timed_out else ""))
    if warm_file is not None and np.isfinite(d.loss):
        problem = warm.save(warm_file, d.inputs, d.loss)
        if problem is not None:
            notes.append(f"distilled census: inputs not kept for the next checkpoint: "
                         f"{printable(problem)}")
    if d.timed_out:  # half-optimised inputs are not evidence: never a verdict from them
        notes.append("distilled census: the time budget ended the distillation; the estimate "
                     "decides" + (" (the next checkpoint continues from these inputs)"
                                  if warm_file is not None else ""))
        return reports
    return _decide(graph, got.census, reports, th, notes, "census:distilled")


def measure(reader: Reader, reports: list[LayerReport], sample_path: str, th: Thresholds,
            seconds: float, notes: list[str]) -> list[LayerReport]:
    """``reports`` with census verdicts where the census ran; problems become notes."""
    graph = graph_for(reader)
    if graph is None:
        notes.append("census: no graph for this checkpoint; the estimate decides")
        return reports
    try:
        sample = load_sample(sample_path, expect_shape=graph.input_shape, layout=graph.layout)
    except CheckpointError as exc:
        notes.append(f"census: {exc}")
        return reports
    try:
        result = run_census(graph, reader.read_array, sample,
                            deadline=time.monotonic() + seconds)
    except (ValueError, CheckpointError) as exc:
        notes.append(f"census: {printable(str(exc))}")
        return reports
    return _decide(graph, result, reports, th, notes)


def _decide(graph: Graph, result: CensusResult, reports: list[LayerReport], th: Thresholds,
            notes: list[str], evidence: str = "census:sample") -> list[LayerReport]:
    by_mean = {n.params["mean"]: n.name for n in graph.nodes
               if n.op == "bn" and "mean" in n.params}
    out = []
    thin = 0
    for layer in reports:
        node = by_mean.get(layer.mean_tensor) if layer.mean_tensor else None
        node = node or (layer.name if layer.name in result else None)
        if node is None or node not in result:
            out.append(layer)
            continue
        activity = result[node]
        thin += activity.positions < MIN_POSITIONS
        out.append(apply_census(layer, activity, evidence, th))
    if result.skipped:
        first = next(iter(result.skipped.items()))
        notes.append(f"census: {len(result.skipped)} nodes not run (e.g. {first[0]}: "
                     f"{first[1]}); their layers keep the estimate")
    if thin:
        notes.append(f"census: {thin} layers saw fewer than {MIN_POSITIONS} positions per "
                     "channel: a larger sample resolves them better")
    notes.append(f"census: {result.inputs} inputs in {result.seconds:.2f} s")
    return out
