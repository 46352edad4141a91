"""Every BN layer's verdict on the committed checkpoints equals the recorded one
(tests/fixtures/gen_layer_classes.py): speed work on the refinement and the plain
estimate must not move a single channel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures import gen_layer_classes as gen

REFERENCE = json.loads(Path(gen.OUT).read_text(encoding="utf-8"))


@pytest.mark.parametrize("rel", sorted(REFERENCE))
def test_verdicts_equal_the_reference(rel):
    got = gen.verdicts(rel)
    want = REFERENCE[rel]
    assert got is not None and sorted(got) == sorted(want)
    for layer, classes in want.items():
        mine = dict(got[layer])
        p, q = mine.pop("min_p_active"), classes["min_p_active"]
        assert mine == {k: v for k, v in classes.items() if k != "min_p_active"}, layer
        assert (p is None) == (q is None), layer
        if p is not None:
            assert p == pytest.approx(q, rel=1e-9, abs=1e-15), layer
