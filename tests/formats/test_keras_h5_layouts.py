"""Keras HDF5 layout details that the committed real files do not exercise."""

import os
import shutil

import h5py
import numpy as np

from bnexporter.scan import ScanOptions, analyse_path
from tests.support.paths import FIXTURES

REAL = os.path.join(FIXTURES, "keras", "k2_resnet_s400.h5")


def _split(attrs, key, parts):
    """Rewrite a name-list attribute the way Keras does past 64 KB: key0..keyN of
    fixed-length bytes arrays."""
    names = [n.encode() if isinstance(n, str) else bytes(n) for n in attrs[key]]
    del attrs[key]
    for i, chunk in enumerate(np.array_split(np.array(names, dtype=object), parts)):
        attrs[f"{key}{i}"] = np.array(list(chunk), dtype=f"S{max(len(n) for n in names)}")


def test_split_layer_and_weight_names_read_like_the_original(tmp_path):
    copy = str(tmp_path / "split.h5")
    shutil.copy(REAL, copy)
    with h5py.File(copy, "r+") as f:
        weights = f["model_weights"]
        _split(weights.attrs, "layer_names", 3)
        for name in weights:
            group = weights[name]
            if "weight_names" in group.attrs and len(group.attrs["weight_names"]) >= 2:
                _split(group.attrs, "weight_names", 2)
    original = analyse_path(REAL, ScanOptions())
    split = analyse_path(copy, ScanOptions())
    assert split.error is None
    assert [layer.name for layer in split.bn_layers] == [layer.name for layer in original.bn_layers]
    assert [t.name for t in split.tensors] == [t.name for t in original.tensors]
    assert split.summary == original.summary


def test_hdf5_with_a_userblock_is_detected(tmp_path):
    path = str(tmp_path / "ub.h5")
    with h5py.File(path, "w", userblock_size=512) as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["layer_names"] = ["bn"]
        g = f.create_group("bn")
        g.attrs["weight_names"] = ["bn/moving_mean:0", "bn/moving_variance:0"]
        g.create_dataset("bn/moving_mean:0", data=np.zeros(4, np.float32))
        g.create_dataset("bn/moving_variance:0", data=np.ones(4, np.float32))
    report = analyse_path(path)
    assert report.error is None and report.summary.bn_layers == 1


def test_keras3_layer_norm_without_config_is_not_a_batchnorm(tmp_path):
    """Keras 3 paths are named after the class: two same-shape vectors under
    layer_normalization are gamma / beta of a LayerNorm, never a BN's mean / var."""
    import h5py
    import numpy as np

    from bnexporter.detection.discovery import discover
    from bnexporter.formats import open_reader

    path = tmp_path / "m.weights.h5"
    with h5py.File(path, "w") as f:
        for name, n in (("layer_normalization", 2), ("batch_normalization", 4)):
            g = f.create_group(f"layers/{name}/vars")
            for i in range(n):
                g.create_dataset(str(i), data=np.full(8, 1.0 + i, np.float32))
    with open_reader(str(path)) as reader:
        names = [layer.name for layer in discover(reader)]
    assert names == ["layers/batch_normalization"]
