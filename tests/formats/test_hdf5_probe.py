"""The HDF5 metadata probe (a forked child walks the file first, B20) hands the parent
what it learnt of each contiguous dataset: the parent registers those without opening
them, and ends up with exactly the tensors, offsets and notes of its own walk."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from bnexporter.formats import hdf5_keras

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _state(reader: hdf5_keras.KerasH5Reader) -> tuple:
    infos = [reader.info(n) for n in list(reader.names())]
    return (reader.format, infos, dict(reader._offsets), sorted(reader._bf16),
            sorted(reader._big), list(reader.meta.notes), reader.meta.auxiliary)


@pytest.mark.parametrize("name", ["keras/k2_resnet_s400.h5", "keras/mnv2_s150.h5",
                                  "keras/k3_small.weights.h5", "keras/k3_small_bf16.weights.h5",
                                  "keras/k2_nested.h5"])
def test_parent_uses_the_childs_facts_and_gets_its_own_walk(name, monkeypatch):
    path = str(FIXTURES / name)
    hdf5_keras._PROBED.clear()
    with hdf5_keras.KerasH5Reader(path, probe=False) as alone:
        want = _state(alone)
        values = {n: alone.read(n) for n in alone.names()[:8]}
    hdf5_keras._PROBED.clear()
    opened: list[bytes] = []
    real = h5py.h5d.open

    with hdf5_keras.KerasH5Reader(path) as probed:
        assert probed._known  # the child reported
        monkeypatch.setattr(h5py.h5d, "open", lambda *a: opened.append(a[1]) or real(*a))
        got = _state(probed)
        for n, v in values.items():
            np.testing.assert_array_equal(probed.read(n), v)
    assert got == want
    assert opened == []  # every listed dataset came from the child's report


def test_a_malformed_report_is_ignored():
    assert hdf5_keras._Facts.load(b"not json") == {}
    assert hdf5_keras._Facts.load(b'{"a": [1]}') == {}
    assert hdf5_keras._Facts.load(b"") == {}
