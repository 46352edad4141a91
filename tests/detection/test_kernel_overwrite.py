"""kernel.overwriting(): a piece that is the reader's read buffer is masked in place,
with the same counts; any other array (a caller's, a reader's cached one) and any
piece whose negatives are counted stay untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bnexporter import scan
from bnexporter.detection import kernel
from bnexporter.detection.analysis import TensorScan
from bnexporter.formats.base import in_raw_buffer, raw_buffer
from bnexporter.scan import ScanOptions, analyse_path
from tests.detection.test_kernel import TH, decode, reference
from tests.detection.test_kernel_columns import _sparse


def _in_buffer(raw: np.ndarray) -> np.ndarray:
    buf = raw_buffer(raw.nbytes)
    view = buf[: raw.nbytes].view(raw.dtype)
    view[:] = raw
    assert in_raw_buffer(view)
    return view


def _scan(dtype, arr, full: bool, overwrite: bool) -> dict:
    s = TensorScan((arr.size,), dtype, TH, bands=full, negative=full)
    if overwrite:
        with kernel.overwriting():
            s.update(0, arr)
    else:
        s.update(0, arr)
    st = s.result()
    return {k: getattr(st, k) for k in ("nonfinite", "huge", "zero", "tiny", "deep",
                                        "subnormal", "max_abs", "min_abs", "band1", "band2",
                                        "negative")}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_read_buffer_is_masked_in_place_with_the_same_counts(dtype):
    raw = _sparse(dtype, 60_001, 21)
    raw[7] = raw.dtype.type((1 << (raw.itemsize * 8 - 1)) | 1)  # -(smallest subnormal)
    ref = reference(dtype, decode(dtype, raw), (raw.size,), None)
    piece = _in_buffer(raw)
    got = _scan(dtype, piece, False, True)
    assert {k: v for k, v in got.items() if k not in ("band1", "band2", "negative")} == \
        {k: v for k, v in ref.items() if k not in ("band1", "band2", "negative")}
    sign = 1 << (raw.itemsize * 8 - 1)
    assert not np.any(piece & piece.dtype.type(sign))  # masked: the piece was the scratch


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_other_arrays_and_counted_negatives_stay_untouched(dtype):
    raw = _sparse(dtype, 30_000, 22)
    ref = reference(dtype, decode(dtype, raw), (raw.size,), None)
    mine = raw.copy()
    assert _scan(dtype, mine, True, True) == ref       # the caller's array
    np.testing.assert_array_equal(mine, raw)
    piece = _in_buffer(raw)
    assert _scan(dtype, piece, True, True) == ref      # negatives counted: no overwrite
    np.testing.assert_array_equal(piece, raw)
    piece = _in_buffer(raw)
    _scan(dtype, piece, False, False)                  # outside overwriting()
    np.testing.assert_array_equal(piece, raw)
    assert not kernel.scratch().overwrite


def test_overwriting_is_restored_after_an_error():
    with pytest.raises(RuntimeError), kernel.overwriting():
        assert kernel.scratch().overwrite
        raise RuntimeError
    assert not kernel.scratch().overwrite


def _safetensors(path, tensors: dict) -> None:
    import json
    import struct
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "npz-deflated"])
def test_reads_after_a_scan_see_the_file_values(tmp_path, fmt, monkeypatch):
    rng = np.random.default_rng(23)
    t = {"a.weight": (rng.standard_normal((64, 16, 3, 3)) * 0.05).astype(np.float32),
         "b.bias": (-np.abs(rng.standard_normal(300))).astype(np.float32),
         "c.weight": (rng.standard_normal((40, 700)) * 1e-6).astype(np.float32)}
    path = tmp_path / ("m.safetensors" if fmt == "safetensors" else "m.npz")
    if fmt == "safetensors":
        _safetensors(path, t)
    else:
        (np.savez if fmt == "npz" else np.savez_compressed)(path, **t)
    real = scan._scan_tensor
    after: dict[str, np.ndarray] = {}

    def spy(reader, info, *a, **k):
        out = real(reader, info, *a, **k)
        after[info.name] = np.asarray(reader.read(info.name)).copy()
        return out

    monkeypatch.setattr(scan, "_scan_tensor", spy)
    r = analyse_path(str(path), ScanOptions(census_enabled=False))
    assert r.error is None
    for name, arr in t.items():
        np.testing.assert_array_equal(after[name], arr.ravel())
    plain = [dataclasses.asdict(x) for x in r.tensors]
    monkeypatch.setattr(kernel, "in_raw_buffer", lambda a: False)
    assert [dataclasses.asdict(x) for x in
            analyse_path(str(path), ScanOptions(census_enabled=False)).tensors] == plain
