"""The prune plan: dead channels removed, constant ones folded, residual ones tied."""

from __future__ import annotations

import json
import os

from bnexporter.detection import prune
from bnexporter.formats.sniff import open_reader
from bnexporter.scan import analyse_path
from tests.support.paths import FIXTURES


def test_plan_from_the_graph_counts_producer_bn_and_next_slice():
    path = os.path.join(FIXTURES, "keras", "k2_resnet_s400.h5")
    r = analyse_path(path)
    with open_reader(path) as reader:
        p = prune.from_reader(r, reader)
    by = {lp.layer: lp for lp in p.layers}
    b1 = by["b1_bn1"]
    assert b1.remove == r.bn_layers[[x.name for x in r.bn_layers].index("b1_bn1")].dead
    assert b1.producer == "b1_conv1/kernel" and b1.next_layers == ["b1_conv2/kernel"]
    assert b1.next_source == "graph"
    shapes = {t.name: t.shape for t in r.tensors}
    k1, k2 = shapes["b1_conv1/kernel"], shapes["b1_conv2/kernel"]
    per = k1[0] * k1[1] * k1[2] + 4 + k2[0] * k2[1] * k2[3]
    assert b1.params_saved == per * len(b1.remove)
    # the stem feeds a residual sum: tied, never counted as saved
    assert by["stem_bn"].tied and by["stem_bn"].params_saved == 0
    doc = json.loads(json.dumps(p.to_json()))
    assert doc["params_saved"] == p.params_saved and doc["flops_saved"] is None


def test_plan_without_reader_says_what_it_does_not_know():
    r = analyse_path(os.path.join(FIXTURES, "keras", "mnv2_s450_inj.keras"), )
    p = prune.plan(r)
    assert p.channels_removable > 0
    assert any("not known" in n for lp in p.layers for n in lp.notes)
    assert any("no graph links" in n for n in p.notes)
