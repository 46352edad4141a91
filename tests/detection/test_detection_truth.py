"""Detection measured against forward-pass ground truth of real checkpoints.

The fixtures were written by TensorFlow / Keras / PyTorch training runs
(tests/fixtures/gen_*.py); each ``.truth.json`` holds, per BN channel, the
fraction of >= 512 held-out inputs for which the BN output was positive.
"""

import glob
import json
import os

import pytest

from bnexporter.scan import ScanOptions, analyse_path
from tests.support.paths import FIXTURES

TRUTHS = sorted(p for d in ("keras", "torch", "tf")
                for p in glob.glob(os.path.join(FIXTURES, d, "*.truth.json")))
RELU = ("relu", "relu6")


def _load(truth_path):
    with open(truth_path) as fh:
        truth = json.load(fh)
    report = analyse_path(truth_path[: -len(".truth.json")], ScanOptions(bn_only=True))
    assert report.error is None, report.error
    layers = truth["layers"]
    if isinstance(layers, dict):
        layers = [{"name": k, **v} for k, v in layers.items()]
    return truth, {layer["name"]: layer for layer in layers}, \
        {layer.name: layer for layer in report.bn_layers}


def _id(path):
    return os.path.relpath(path, FIXTURES)


def test_there_are_real_fixtures_for_every_framework():
    frameworks = {os.path.basename(os.path.dirname(p)) for p in TRUTHS}
    assert {"keras", "torch"} <= frameworks
    assert len(TRUTHS) >= 20


@pytest.mark.parametrize("truth_path", TRUTHS, ids=_id)
def test_every_bn_layer_is_found_with_its_channel_count(truth_path):
    _, truth, found = _load(truth_path)
    assert set(truth) == set(found)
    for name, layer in truth.items():
        assert found[name].channels == layer["channels"]


@pytest.mark.parametrize("truth_path", [p for p in TRUTHS if "/keras/" in p
                                        and not p.endswith("_weights.h5.truth.json")
                                        and not p.endswith(".weights.h5.truth.json")], ids=_id)
def test_consumers_from_the_model_config_match_the_real_graph(truth_path):
    _, truth, found = _load(truth_path)
    for name, layer in truth.items():
        if found[name].consumer != "unknown":
            assert found[name].consumer == layer["consumer"], name


def _has_injections(path):
    with open(path) as fh:
        return bool(json.load(fh).get("injected"))


@pytest.mark.parametrize("truth_path", [p for p in TRUTHS if _has_injections(p)], ids=_id)
def test_injected_seed_patterns_are_classified(truth_path):
    meta, truth, found = _load(truth_path)
    for item in meta["injected"]:
        layer = found[item["layer"]]
        channel, pattern = item["channel"], item["pattern"]
        assert channel in getattr(layer, pattern), (item, layer)
        really_dead = truth[item["layer"]]["active_fraction"][channel] == 0
        if pattern != "constant" and really_dead and truth[item["layer"]]["consumer"] in RELU:
            assert channel in layer.dead, item
        if pattern == "constant":
            assert channel not in layer.dead


def test_dead_channels_precision_and_recall_floors():
    """Floors below what is measured (see docs/accuracy.md), so a regression fails."""
    tp = fp = fn = 0
    for truth_path in TRUTHS:
        _, truth, found = _load(truth_path)
        for name, layer in truth.items():
            if layer["consumer"] not in RELU:
                continue
            really = {i for i, f in enumerate(layer["active_fraction"]) if f == 0}
            said = set(found[name].dead)
            tp += len(really & said)
            fp += len(said - really)
            fn += len(really - said)
    assert tp + fn > 1000
    assert tp / (tp + fp) >= 0.97
    assert tp / (tp + fn) >= 0.80


def test_bns_feeding_an_add_or_nothing_are_never_dead_relus():
    checked = 0
    for truth_path in TRUTHS:
        _, truth, found = _load(truth_path)
        for name, layer in truth.items():
            if layer["consumer"] in ("add", "linear") and found[name].consumer != "unknown":
                assert found[name].dead == [] and found[name].near_dead == []
                checked += 1
    assert checked > 20
