"""Construction order rebuilt from names when a file sorted its tensors (safetensors)."""

from __future__ import annotations

import os

from bnexporter.scan import ScanOptions, analyse_path
from bnexporter.topology.infer import _structural_key

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "topology")


def test_numbered_siblings_sort_kernel_then_bn_by_number():
    mods = [("stages.0.blocks.0.n2", True), ("stages.0.blocks.0.c1", False),
            ("stages.0.blocks.0.n1", True), ("stages.0.blocks.0.c2", False),
            ("head", False), ("stem.norm", True), ("stem.conv", False),
            ("stages.0.blocks.10.c1", False), ("stages.0.blocks.2.c1", False)]
    got = [m for m, _ in sorted(mods, key=lambda m: _structural_key(*m))]
    assert got == ["stem.conv", "stem.norm", "stages.0.blocks.0.c1", "stages.0.blocks.0.n1",
                   "stages.0.blocks.0.c2", "stages.0.blocks.0.n2", "stages.0.blocks.2.c1",
                   "stages.0.blocks.10.c1", "head"]


def test_safetensors_gets_the_producers_and_consumers_of_the_same_pt():
    # the same weights: a .pt keeps the state_dict order, safetensors sorts by dtype and name
    pt = {la.name: la for la in analyse_path(os.path.join(HERE, "custom_resnet.pt"),
                                             ScanOptions(bn_only=True)).bn_layers}
    st = {la.name: la for la in analyse_path(os.path.join(HERE, "custom_resnet.safetensors"),
                                             ScanOptions(bn_only=True)).bn_layers}
    assert set(pt) == set(st)
    for name, layer in st.items():
        if layer.consumer_source.startswith("inferred:downstream"):
            assert layer.consumer == pt[name].consumer
        if pt[name].producer_source == "inferred:key-order":
            assert layer.producer == pt[name].producer, name
    def known(layers: dict) -> int:
        return sum(la.consumer != "unknown" for la in layers.values())

    def linked(layers: dict) -> int:
        return sum(la.producer_source == "inferred:key-order" for la in layers.values())

    assert linked(st) == linked(pt) >= 2
    assert known(st) == known(pt)


def test_a_family_member_with_a_plausible_scale_speaks_for_the_rectifiers():
    # densenet norm1: hard-swish fits best but needs scale 1.78 (outside the accepted
    # range); ReLU fits almost as well at 1.44, so the rectifier verdict stands
    from unittest import mock

    from bnexporter.detection import discovery
    from bnexporter.formats.sniff import open_reader
    from bnexporter.topology import infer

    path = os.path.join(HERE, "tv_densenet_like.pt")
    seen: dict[str, list] = {}
    real = infer.infer_consumers

    def spy(reader, bns, unknown):
        seen["bns"] = list(bns)
        return real(reader, bns, unknown)

    with mock.patch.object(discovery, "infer_consumers", spy):
        analyse_path(path, ScanOptions(bn_only=True))
    by = {b.name: b for b in seen["bns"]}
    bn = by["features.denseblock2.denselayer1.norm1"]
    nxt = by["features.denseblock2.denselayer1.norm2"]
    kernel = "features.denseblock2.denselayer1.conv1.weight"
    with open_reader(path) as reader:
        errs = infer.fit_errors(reader, bn, kernel, None, nxt)
        assert errs is not None
        best = min(errs, key=lambda c: errs[c][0])
        assert best == "hardswish" and errs[best][1] > infer.SCALE_RANGE[1]
        verdict = infer.downstream_test(reader, bn, kernel, None, nxt)
    assert verdict is not None and verdict[0] == "rectifier"
    assert "scale 1.44" in verdict[1]
