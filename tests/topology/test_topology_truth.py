"""Consumers against the true graph of real checkpoints (tests/fixtures/topology,
written by the frameworks; truth from torch.fx users / Keras inbound nodes)."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import pytest

from bnexporter.report import RELU_LIKE
from bnexporter.scan import ScanOptions, analyse_path
from bnexporter.topology import torch_graph
from bnexporter.topology.resolve import bn_contexts

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "topology")
TRUTHS = sorted(glob.glob(os.path.join(HERE, "**", "*.graph.json"), recursive=True))
# the truth names only the next op for these; what follows it is not recorded
_OPEN = ("concat", "pool", "other")


def _checkpoint(truth_path: str, doc: dict) -> str:
    path = truth_path[: -len(".graph.json")]
    if os.path.exists(path) or os.path.exists(path + ".index"):
        return path
    return os.path.join(os.path.dirname(truth_path), os.path.basename(doc["file"]))


def _pairs(truth_path: str):
    with open(truth_path) as fh:
        doc = json.load(fh)
    report = analyse_path(_checkpoint(truth_path, doc), ScanOptions(bn_only=True))
    if report.error and "used as the graph of the state_dicts" in report.error:
        # an archive that is a graph, not a checkpoint: judge the graph it gives
        yield from _graph_pairs(_checkpoint(truth_path, doc), doc)
        return
    assert report.error is None, report.error
    found = {layer.name: layer for layer in report.bn_layers}
    assert len(found) == len(doc["layers"])
    for tl in doc["layers"]:
        layer = found.get(tl["bn"]) or next(
            (x for x in report.bn_layers if tl["tensors"]["mean"].startswith(x.name)), None)
        assert layer is not None, tl["bn"]
        yield tl, layer


@dataclass(frozen=True)
class _FromGraph:
    name: str
    consumer: str
    consumer_source: str
    dead: tuple[int, ...] = ()
    near_dead: tuple[int, ...] = ()


def _graph_pairs(path: str, doc: dict):
    graph = torch_graph.graph_from_export(path) if path.endswith(".pt2") \
        else torch_graph.graph_from_torchscript(path)
    assert graph is not None
    contexts = bn_contexts(graph)
    for tl in doc["layers"]:
        ctx = contexts[tl["tensors"]["mean"]]
        yield tl, _FromGraph(tl["bn"], ctx.consumer, graph.source)


@pytest.mark.parametrize("truth_path", TRUTHS, ids=lambda p: os.path.relpath(p, HERE))
def test_no_dead_claims_on_bns_that_feed_no_relu(truth_path):
    for tl, layer in _pairs(truth_path):
        if tl["consumer"] not in RELU_LIKE and tl["consumer"] not in _OPEN:
            assert not layer.dead and not layer.near_dead, (tl["bn"], layer.consumer,
                                                                 layer.consumer_source)


@pytest.mark.parametrize("truth_path", TRUTHS, ids=lambda p: os.path.relpath(p, HERE))
def test_known_and_inferred_consumers_are_right(truth_path):
    for tl, layer in _pairs(truth_path):
        if layer.consumer == "unknown" or tl["consumer"] in _OPEN:
            continue
        assert (layer.consumer in RELU_LIKE) == (tl["consumer"] in RELU_LIKE), \
            (tl["bn"], layer.consumer, layer.consumer_source, tl["consumer"])
        assert layer.consumer_source != "none"


def test_coverage_floor():
    """A floor under what is measured (docs/topology.md), so a regression fails."""
    known = total = 0
    for truth_path in TRUTHS:
        pairs = list(_pairs(truth_path))
        total += len(pairs)
        known += sum(1 for _, layer in pairs if layer.consumer != "unknown")
    assert total > 150
    assert known / total >= 0.85  # measured 209 / 238 = 0.878
