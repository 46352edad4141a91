"""A deflated ``model.weights.h5`` above the in-memory limit is inflated as it is read
(keras_zip._Inflating): same analysis as the stored archive, bounded memory, clean
errors for a broken stream."""

from __future__ import annotations

import dataclasses
import random
import zipfile
from pathlib import Path

import pytest

from bnexporter.formats import keras_zip
from bnexporter.scan import analyse_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "keras"


def _deflated(src: Path, dst: Path) -> Path:
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
        for item in zi.infolist():
            zo.writestr(item.filename, zi.read(item))
    return dst


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    # every deflated member streamed, with marks and pieces far smaller than the file
    monkeypatch.setattr(keras_zip, "_INFLATE_MAX", 0)
    monkeypatch.setattr(keras_zip._Inflating, "MARK", 4096)
    monkeypatch.setattr(keras_zip._Inflating, "_OUT", 1000)
    monkeypatch.setattr(keras_zip._Inflating, "_IN", 777)
    monkeypatch.setattr(keras_zip._Inflating, "PAGE", 512)
    monkeypatch.setattr(keras_zip._Inflating, "PAGES", 8)


@pytest.mark.parametrize("name", ["k3_small.keras", "k3_nested.keras", "k3_small_bf16.keras"])
def test_streamed_archive_reads_like_the_stored_one(tmp_path, streamed, name):
    src = FIXTURES / name
    ref = analyse_path(str(src))
    got = analyse_path(str(_deflated(src, tmp_path / name)))
    assert ref.error is None and got.error is None, got.error
    assert [dataclasses.asdict(t) for t in got.tensors] == \
        [dataclasses.asdict(t) for t in ref.tensors]
    assert [(x.name, x.classes) for x in got.bn_layers] == \
        [(x.name, x.classes) for x in ref.bn_layers]


def test_random_reads_match_the_inflated_bytes(tmp_path, streamed):
    data = random.Random(0).randbytes(60_000) + bytes(100_000) + b"tail" * 5000
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.weights.h5", data)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("model.weights.h5")
    base = keras_zip._data_offset(str(path), info)
    win = keras_zip._Inflating(str(path), base, info.compress_size, info.file_size)
    rng = random.Random(1)
    try:
        for _ in range(300):
            pos = rng.randrange(len(data) + 10)
            n = rng.randrange(1, 9000)
            win.seek(pos)
            assert win.read(n) == data[pos: pos + n]
        assert len(win._marks) <= len(data) // 4096 + 2
    finally:
        win.close()


def test_broken_stream_is_a_clean_error(tmp_path, streamed):
    src = _deflated(FIXTURES / "k3_small.keras", tmp_path / "ok.keras")
    blob = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("model.weights.h5")
    start = keras_zip._data_offset(str(src), info)
    for i in range(start + 200, start + info.compress_size - 200, 97):
        blob[i] ^= 0x5A  # garbage in the deflate stream
    bad = tmp_path / "bad.keras"
    bad.write_bytes(bytes(blob))
    report = analyse_path(str(bad))
    assert report.error is not None
    assert "Traceback" not in report.error
