import pytest

from bnexporter.topology.consumers import PRESETS, ConsumerRules, guess_family

BASIC = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2",
         "layer2.0.downsample.1"]
BOTTLENECK = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.bn3", "layer1.0.downsample.1"]
MNV2 = ["features.0.1", "features.1.conv.0.1", "features.1.conv.2", "features.2.conv.0.1",
        "features.2.conv.1.1", "features.2.conv.3", "features.18.1"]


def _kinds(names, rules=None):
    r = rules or ConsumerRules()
    preset, prefix = r.resolve_preset(names)
    return {n: r.lookup(n, preset, prefix)[0] for n in names}


def test_resnet_basic_block_residual_bn_feeds_an_add():
    got = _kinds(BASIC)
    assert got["layer1.0.bn1"] == "relu" and got["layer1.0.bn2"] == "add"
    assert got["layer2.0.downsample.1"] == "add" and got["bn1"] == "relu"


def test_resnet_bottleneck_is_told_apart_by_bn3():
    got = _kinds(BOTTLENECK)
    assert got["layer1.0.bn2"] == "relu" and got["layer1.0.bn3"] == "add"


def test_mobilenet_v2_projection_is_linear():
    got = _kinds(MNV2)
    assert got["features.1.conv.2"] == "linear" and got["features.2.conv.3"] == "linear"
    assert got["features.2.conv.1.1"] == "relu6" and got["features.18.1"] == "relu6"


def test_lightning_prefix_is_stripped_for_presets():
    got = _kinds(["model." + n for n in BASIC])
    assert got["model.layer1.0.bn2"] == "add" and got["model.layer1.0.bn1"] == "relu"


def test_user_rules_win_over_presets_and_unknown_names_stay_unknown():
    rules = ConsumerRules(rules=[("layer1.*.bn2", "relu")])
    assert _kinds(BASIC, rules)["layer1.0.bn2"] == "relu"
    assert _kinds(["encoder.norm_a", "encoder.norm_b"]) == {
        "encoder.norm_a": None, "encoder.norm_b": None}
    assert guess_family(["blocks.1.expand.1"]) is None


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="consumer"):
        ConsumerRules(rules=[("*", "sigmoid")])
    with pytest.raises(ValueError, match="preset"):
        ConsumerRules(presets=["resnet9000"])
    assert "resnet_basic" in PRESETS


def test_explicit_preset_also_strips_the_lightning_prefix():
    got = _kinds(["model." + n for n in BASIC], ConsumerRules(presets=["resnet_basic"]))
    assert got["model.layer1.0.bn2"] == "add"
