import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from bnexporter.errors import CheckpointError
from bnexporter.formats.sniff import detect, open_reader


def _tensors():
    rng = np.random.default_rng(1)
    return {
        "bn.weight": rng.normal(size=8).astype(np.float32),
        "bn.bias": rng.normal(size=8).astype(np.float32),
        "bn.running_mean": rng.normal(size=8).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 2, size=8).astype(np.float32),
        "conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float16),
        "step_count": np.array([7], dtype=np.int64),
    }


def test_safetensors_reads_every_tensor_and_slice(tmp_path):
    path = str(tmp_path / "model.bin")  # extension deliberately wrong
    tensors = _tensors()
    save_file(tensors, path, metadata={"step": "1200"})
    assert detect(path) == "safetensors"
    with open_reader(path) as r:
        assert {t.name for t in r.tensors()} == set(tensors)
        for name, arr in tensors.items():
            np.testing.assert_array_equal(r.read_array(name), arr)
        np.testing.assert_array_equal(r.read("conv.weight", 10, 20),
                                      tensors["conv.weight"].ravel()[10:20])
        assert r.meta.step == 1200 and r.meta.framework == "torch"


def _raw_safetensors(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


@pytest.mark.parametrize("header,payload,needle", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12, "needs 16"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "file has"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "hole"),
    ({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8, "overlaps"),
])
def test_lying_safetensors_headers_are_rejected_with_the_cause(tmp_path, header, payload,
                                                                needle):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw_safetensors(header, payload))
    with pytest.raises(CheckpointError) as err:
        open_reader(str(path))
    assert needle in str(err.value)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)


def test_npz_reader(tmp_path):
    path = str(tmp_path / "w.npz")
    tensors = _tensors()
    np.savez_compressed(path, **tensors)
    assert detect(path) == "npz"
    with open_reader(path) as r:
        for name, arr in tensors.items():
            np.testing.assert_array_equal(r.read_array(name), arr)
