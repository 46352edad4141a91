"""Graph sources found beside a checkpoint: picked up by scan, labelled, never run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from bnexporter.scan import ScanOptions, analyse_path

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")
GS = os.path.join(FIX, "graph_sources")


def _truth(name: str) -> dict[str, list[str]]:
    with open(os.path.join(GS, f"{name}.truth.json")) as fh:
        return json.load(fh)["bn"]


def test_describe_json_beside_a_state_dict_gives_every_consumer(tmp_path):
    shutil.copy(os.path.join(GS, "resnetish_sd.pt"), tmp_path / "ckpt-100.pt")
    alone = analyse_path(str(tmp_path / "ckpt-100.pt"), ScanOptions(bn_only=True))
    shutil.copy(os.path.join(GS, "resnetish.describe.graph.json"),
                tmp_path / "bnexporter-graph.json")
    report = analyse_path(str(tmp_path / "ckpt-100.pt"), ScanOptions(bn_only=True))
    assert report.error is None
    truth = _truth("resnetish")
    assert {layer.name for layer in report.bn_layers} == set(truth)
    for layer in report.bn_layers:
        assert layer.consumer_source == "graph:describe:bnexporter-graph.json"
        expect = truth[layer.name]
        kind = "add" if "add" in expect else expect[0]
        assert layer.consumer == kind, (layer.name, layer.consumer, expect)
    # the graph also names producers the bare state_dict could only guess
    assert sum(1 for layer in report.bn_layers if layer.producer) >= \
        sum(1 for layer in alone.bn_layers if layer.producer)


def test_torch_export_archive_beside_a_state_dict(tmp_path):
    shutil.copy(os.path.join(GS, "seqnet_sd.pt"), tmp_path / "step-5.pt")
    shutil.copy(os.path.join(GS, "seqnet.pt2"), tmp_path / "model.pt2")
    report = analyse_path(str(tmp_path / "step-5.pt"), ScanOptions(bn_only=True))
    truth = _truth("seqnet")
    for layer in report.bn_layers:
        assert layer.consumer_source == "graph:export:model.pt2"
        expect = truth[layer.name][0]
        assert layer.consumer == ("other" if expect == "concat" else expect) or \
            expect == "concat", (layer.name, layer.consumer, expect)


def test_keras_config_beside_weights_only_file(tmp_path):
    src = os.path.join(FIX, "topology", "k3_mnv2_a035")
    shutil.copy(os.path.join(src, "model.weights.h5"), tmp_path / "model.weights.h5")
    bare = analyse_path(str(tmp_path / "model.weights.h5"), ScanOptions(bn_only=True))
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    report = analyse_path(str(tmp_path / "model.weights.h5"), ScanOptions(bn_only=True))
    assert report.summary.consumer_coverage > bare.summary.consumer_coverage
    assert {layer.consumer_source for layer in report.bn_layers} == {"file:config.json"}
    assert {layer.eps_source for layer in report.bn_layers} == {"config"}


def test_a_broken_sidecar_is_a_note_not_an_error(tmp_path):
    shutil.copy(os.path.join(GS, "seqnet_sd.pt"), tmp_path / "step-5.pt")
    (tmp_path / "bnexporter-graph.json").write_text('{"format": "bnexporter-graph", "vers')
    report = analyse_path(str(tmp_path / "step-5.pt"), ScanOptions(bn_only=True))
    assert report.error is None and report.bn_layers
    assert any("graph source beside the checkpoint ignored" in n for n in report.notes)


def test_text_report_never_says_graphless_when_a_graph_is_there(tmp_path):
    shutil.copy(os.path.join(GS, "resnetish_sd.pt"), tmp_path / "ckpt.pt")
    shutil.copy(os.path.join(GS, "resnetish.describe.graph.json"),
                tmp_path / "bnexporter-graph.json")
    out = subprocess.run([sys.executable, "-m", "bnexporter", "scan", str(tmp_path / "ckpt.pt")],
                         capture_output=True, text=True, timeout=60).stdout
    assert "no graph" not in out and "unknown consumer" not in out
    assert "consumers known or inferred for 100% of BN layers" in out


def test_graph_gives_exact_producer_feeds_for_the_refinement(tmp_path):
    from bnexporter.detection.discovery import discover
    from bnexporter.detection.links import find_links
    from bnexporter.formats import open_reader
    from bnexporter.scan import refine_layers

    shutil.copy(os.path.join(GS, "resnetish_sd.pt"), tmp_path / "c.pt")
    shutil.copy(os.path.join(GS, "resnetish.describe.graph.json"),
                tmp_path / "bnexporter-graph.json")
    with open_reader(str(tmp_path / "c.pt")) as reader:
        layers = discover(reader)
        links = find_links(reader, layers)
        # the block after the first one reads relu(bn2 + shortcut): a sum the names hide
        feed = links["layer1.1.bn1"].feed
        assert feed is not None and feed.op == "relu" and feed.args[0].op == "add"
        assert feed.bns() == {"layer1.0.bn2", "bn1"}
        refined = refine_layers(reader, layers)
        assert "layer1.1.bn1" in refined
