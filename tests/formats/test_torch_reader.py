"""The torch readers against files written by torch 2.13 itself, and synthetic edge cases.

``tests/fixtures/torch`` holds real checkpoints from ``gen_torch.py`` with what
``torch.load`` returned for every tensor (``.expected.npz``); reads must match
bit for bit. Synthetic archives (written here with the stdlib, no torch) cover
wrappers, zip64, truncation and lies about sizes.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest

from bnexporter.errors import CheckpointError
from bnexporter.formats import torch_legacy, torch_pickle, zipmember
from bnexporter.formats.sniff import incomplete, open_reader
from bnexporter.formats.torch_legacy import TorchLegacyReader
from bnexporter.formats.torch_zip import TorchZipReader, looks_like_members
from tests.support import paths

FIXTURES = os.path.join(paths.FIXTURES, "torch")
CHECKPOINTS = sorted(p for p in glob.glob(os.path.join(FIXTURES, "*"))
                     if p.endswith((".pt", ".ckpt")) and os.path.exists(p + ".truth.json"))


def open_any(path: str):
    with open(path, "rb") as fh:
        head = fh.read(16)
    return TorchLegacyReader(path) if torch_legacy.looks_like(head) else TorchZipReader(path)


def expected(path: str) -> tuple[dict[str, np.ndarray], dict]:
    npz = np.load(path + ".expected.npz")
    meta = json.loads(str(npz["__meta__"]))
    return {k: npz[k] for k in npz.files if k != "__meta__"}, meta


def truth(path: str) -> dict:
    with open(path + ".truth.json") as fh:
        return json.load(fh)


# -- synthetic archives ------------------------------------------------------------

_STORAGE = {"float32": "FloatStorage", "float16": "HalfStorage", "float64": "DoubleStorage",
            "int64": "LongStorage", "bfloat16": "BFloat16Storage", "uint8": "ByteStorage"}


class T:
    """A tensor for synthetic pickles: a view (offset/size/stride) of a stored array."""

    def __init__(self, key: str, storage: np.ndarray, size=None, stride=None, offset=0,
                 dtype: str = "float32", numel: int | None = None):
        self.key, self.storage, self.offset, self.dtype = key, storage, offset, dtype
        self.size = tuple(storage.shape if size is None else size)
        self.stride = tuple(stride) if stride is not None else tuple(
            int(np.prod(self.size[i + 1:])) for i in range(len(self.size)))
        self.numel = storage.size if numel is None else numel


class Raw(bytes):
    """Pickle opcodes inserted verbatim (payloads)."""


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def pickle_obj(obj, storages: dict[str, bytes]) -> bytes:
    """Protocol-2 opcodes for dicts/lists/tuples/scalars/T, as torch would write them."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, T):
        storages[obj.key] = obj.storage.tobytes()
        pid = (b"(" + _str("storage") + f"ctorch\n{_STORAGE[obj.dtype]}\n".encode()
               + _str(obj.key) + _str("cpu") + _int(obj.numel) + b"tQ")
        return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _int(obj.offset)
                + pickle_obj(obj.size, storages) + pickle_obj(obj.stride, storages)
                + b"\x89ccollections\nOrderedDict\n)RtR")
    if isinstance(obj, dict):
        body = b"".join(pickle_obj(k, storages) + pickle_obj(v, storages)
                        for k, v in obj.items())
        return b"}" + (b"(" + body + b"u" if obj else b"")
    if isinstance(obj, list):
        body = b"".join(pickle_obj(v, storages) for v in obj)
        return b"]" + (b"(" + body + b"e" if obj else b"")
    if isinstance(obj, tuple):
        return b"(" + b"".join(pickle_obj(v, storages) for v in obj) + b"t"
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        return _int(obj)
    if isinstance(obj, float):
        return b"G" + struct.pack(">d", obj)
    if isinstance(obj, str):
        return _str(obj)
    if obj is None:
        return b"N"
    raise TypeError(type(obj))


def torch_pickle_bytes(obj) -> tuple[bytes, dict[str, bytes]]:
    storages: dict[str, bytes] = {}
    return b"\x80\x02" + pickle_obj(obj, storages) + b".", storages


def write_torch_zip(path, obj=None, *, data_pkl: bytes | None = None, root="archive",
                    byteorder=b"little", extra: dict[str, bytes] | None = None,
                    compress_storages=False, skip: tuple[str, ...] = ()) -> str:
    storages: dict[str, bytes] = {}
    if data_pkl is None:
        data_pkl, storages = torch_pickle_bytes(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{root}/data.pkl", data_pkl)
        zf.writestr(f"{root}/byteorder", byteorder)
        for key, raw in storages.items():
            if key not in skip:
                zf.writestr(f"{root}/data/{key}", raw, compress_type=zipfile.ZIP_DEFLATED
                            if compress_storages else zipfile.ZIP_STORED)
        for name, raw in (extra or {}).items():
            zf.writestr(f"{root}/{name}", raw)
        zf.writestr(f"{root}/version", b"3\n")
    return str(path)


def bn_dict(prefix: str = "", channels: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i, part in enumerate(("weight", "bias", "running_mean", "running_var")):
        out[f"{prefix}bn.{part}"] = T(f"{prefix}{i}".replace(".", "_") or str(i),
                                      rng.normal(size=channels).astype(np.float32))
    out[f"{prefix}conv.weight"] = T(f"{prefix}c".replace(".", "_"),
                                    rng.normal(size=(channels, 3, 3, 3)).astype(np.float32))
    return out


# -- real files: bit-exact against torch.load ------------------------------------------

def test_fixture_set_is_complete_and_small():
    names = {os.path.basename(p) for p in CHECKPOINTS}
    for required in ("resnet_sd.pt", "resnet_lightning.ckpt", "mobilenet_model_epoch.pt",
                     "resnet_model_state_dict.pt", "mobilenet_ddp.pt", "resnet_compiled.pt",
                     "mobilenet_legacy.pt", "resnet_fp16.pt", "mobilenet_bf16.pt",
                     "mobilenet_module_eps1e-3.pt", "resnet_bigendian.pt",
                     "mobilenet_views_f8.pt"):
        assert required in names
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(FIXTURES, "*")))
    assert total < 3_200_000


@pytest.mark.parametrize("path", CHECKPOINTS, ids=os.path.basename)
def test_every_tensor_equals_torch_load_bit_for_bit(path):
    want, meta = expected(path)
    with open_any(path) as r:
        got = {t.name: t for t in r.tensors()}
        assert set(got) == set(meta["dtypes"])
        for name, dtype in meta["dtypes"].items():
            info = got[name]
            assert info.dtype == dtype, name
            arr = r.read_array(name)
            assert arr.shape == want[name].shape, name
            if dtype == "bfloat16":
                bits = (arr.view(np.uint32) >> 16).astype(np.uint16)
                assert np.array_equal(bits, want[name]), name
                assert arr.tobytes() == want[name + "@float32"].tobytes(), name
            elif dtype.startswith("float8"):
                assert arr.tobytes() == want[name + "@float32"].tobytes(), name
            else:
                assert arr.dtype == want[name].dtype, name
                assert arr.tobytes() == want[name].tobytes(), name


@pytest.mark.parametrize("path", CHECKPOINTS, ids=os.path.basename)
def test_meta_framework_step_auxiliary_and_bn_names(path):
    want_truth = truth(path)
    _, meta = expected(path)
    with open_any(path) as r:
        assert r.meta.framework == "torch"
        assert r.meta.step == want_truth["step"]
        assert r.meta.auxiliary == frozenset(meta["auxiliary"])
        names = {t.name for t in r.tensors()}
        for layer in want_truth["layers"]:
            for part in ("weight", "bias", "running_mean", "running_var"):
                assert f"{layer['name']}.{part}" in names
            assert r.info(f"{layer['name']}.running_var").shape == (layer["channels"],)


def test_eps_comes_from_the_pickled_module_only():
    path = os.path.join(FIXTURES, "mobilenet_module_eps1e-3.pt")
    layers = truth(path)["layers"]
    with TorchZipReader(path) as r:
        assert r.meta.bn_eps == {layer["name"]: 1e-3 for layer in layers}
        assert "weights from module" in r.meta.notes
    with TorchZipReader(os.path.join(FIXTURES, "mobilenet_model_epoch.pt")) as r:
        assert r.meta.bn_eps == {}


def test_lightning_hyper_parameters_load_as_inert_data():
    path = os.path.join(FIXTURES, "resnet_lightning.ckpt")
    with zipfile.ZipFile(path) as zf:
        root = torch_pickle.load(zf.read("archive/data.pkl"))
    hp = root["hyper_parameters"]
    assert isinstance(hp, torch_pickle.Opaque)
    assert hp.qualname == "lightning_fabric.utilities.data.AttributeDict"
    items = dict(hp.items)
    assert items["lr"] == 0.02 and items["arch"] == "resnet"
    ns = items["data"]
    assert ns.qualname == "argparse.Namespace" and ns.state["classes"] == 6
    assert root["global_step"] == 400 and root["pytorch-lightning_version"] == "2.4.0"


def test_views_share_storage_and_partial_strided_reads_match():
    path = os.path.join(FIXTURES, "mobilenet_views_f8.pt")
    want, _ = expected(path)
    rng = np.random.default_rng(0)
    with TorchZipReader(path) as r:
        refs = r._refs
        assert refs["extra.tied_classifier"].storage is refs["classifier.weight"].storage
        assert refs["extra.transposed"].storage is refs["classifier.weight"].storage
        assert not refs["extra.transposed"].contiguous
        assert refs["extra.sliced"].offset > 0
        assert refs["extra.expanded"].stride[0] == 0
        for name in ("extra.transposed", "extra.sliced", "extra.strided_rows",
                     "extra.expanded", "extra.f8_sliced"):
            flat = want[name + "@float32" if name == "extra.f8_sliced" else name].ravel()
            for _ in range(25):
                a, b = sorted(rng.integers(0, flat.size + 1, size=2))
                assert r.read(name, a, b).tobytes() == flat[a:b].astype(np.float32).tobytes()
            chunks = [c for _, c in r.iter_chunks(name, chunk_elements=5)]
            assert np.concatenate(chunks).tobytes() == flat.astype(np.float32).tobytes()


def test_strided_read_touches_only_the_needed_span(monkeypatch):
    path = os.path.join(FIXTURES, "mobilenet_views_f8.pt")
    with TorchZipReader(path) as r:
        r.read("extra.strided_rows", 0, 1)          # resolves the record's local header
        seen = []
        real = os.pread

        def counting(fd, n, off):
            seen.append(n)
            return real(fd, n, off)

        monkeypatch.setattr(os, "pread", counting)
        row = r.read("extra.strided_rows", 24, 48)  # one row of a (16, 24) view, stride 72
        assert row.size == 24 and sum(seen) == 24 * 4


def test_torchscript_archive_is_left_to_its_own_reader():
    path = os.path.join(FIXTURES, "torchscript_tiny.pt")
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(path)
    assert exc.value.reason == "unsupported" and "TorchScript" in str(exc.value)
    assert looks_like_members(zipfile.ZipFile(path).namelist()) == "torchscript"
    with open_reader(path) as r:  # tests/formats/test_torchscript_pt2.py covers the rest
        assert r.format == "torchscript" and "1.running_var" in r.names()


def test_legacy_magic_and_member_detection():
    with open(os.path.join(FIXTURES, "mobilenet_legacy.pt"), "rb") as fh:
        assert torch_legacy.looks_like(fh.read(14))
    with open(os.path.join(FIXTURES, "resnet_sd.pt"), "rb") as fh:
        assert not torch_legacy.looks_like(fh.read(14))
    names = zipfile.ZipFile(os.path.join(FIXTURES, "resnet_sd.pt")).namelist()
    assert looks_like_members(names) == "torch"
    assert looks_like_members(["config.json", "model.weights.h5"]) is None


# -- wrappers, prefixes and steps (synthetic) -----------------------------------------

@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "net", "ema",
                                     "state_dict_ema", "model_ema"])
def test_wrapper_keys(tmp_path, wrapper):
    path = write_torch_zip(tmp_path / "w.pt", {wrapper: bn_dict(), "epoch": 2})
    with TorchZipReader(path) as r:
        assert {t.name for t in r.tensors()} == set(bn_dict())
        assert r.meta.step == 2 and r.meta.auxiliary == frozenset()


def test_state_dict_wins_over_ema_which_becomes_auxiliary(tmp_path):
    obj = {"state_dict_ema": bn_dict("e.", seed=1), "state_dict": bn_dict(seed=2),
           "optimizer": {"state": {0: {"exp_avg": T("opt0", np.ones(3, np.float32))}}},
           "epoch": 9, "global_step": 1234}
    path = write_torch_zip(tmp_path / "w.pt", obj)
    with TorchZipReader(path) as r:
        names = {t.name for t in r.tensors()}
        assert set(bn_dict()) <= names
        assert "optimizer.state.0.exp_avg" in r.meta.auxiliary
        assert "state_dict_ema.e.bn.weight" in r.meta.auxiliary
        assert r.meta.step == 1234
        np.testing.assert_array_equal(r.read_array("bn.weight"),
                                      obj["state_dict"]["bn.weight"].storage)


def test_prefixes_are_stripped_and_collisions_keep_names(tmp_path):
    sd = {f"module._orig_mod.{k}": v for k, v in bn_dict().items()}
    with TorchZipReader(write_torch_zip(tmp_path / "a.pt", sd)) as r:
        assert {t.name for t in r.tensors()} == set(bn_dict())
    sd = {f"model._orig_mod.{k}": v for k, v in bn_dict().items()}
    with TorchZipReader(write_torch_zip(tmp_path / "b.pt", {"state_dict": sd})) as r:
        assert {t.name for t in r.tensors()} == {f"model.{k}" for k in bn_dict()}
    sd = {f"module.{k}": v for k, v in bn_dict().items()}
    sd["bn.weight"] = T("z", np.ones(4, np.float32))
    with TorchZipReader(write_torch_zip(tmp_path / "c.pt", sd)) as r:
        assert "module.bn.weight" in {t.name for t in r.tensors()}


@pytest.mark.parametrize(("extra", "step"), [({"global_step": 7, "step": 5, "epoch": 1}, 7),
                                            ({"step": 5, "epoch": 1}, 5),
                                            ({"epoch": 4}, 4), ({"epoch": True}, None),
                                            ({"step": 12.0}, 12), ({}, None)])
def test_step_preference(tmp_path, extra, step):
    path = write_torch_zip(tmp_path / "s.pt", {"state_dict": bn_dict(), **extra})
    with TorchZipReader(path) as r:
        assert r.meta.step == step


def test_step_stored_as_a_tensor(tmp_path):
    obj = {"model": bn_dict(), "step": T("st", np.array(321, np.int64), dtype="int64")}
    with TorchZipReader(write_torch_zip(tmp_path / "s.pt", obj)) as r:
        assert r.meta.step == 321


# -- damaged and lying files ----------------------------------------------------------

def test_truncated_archive_is_retryable(tmp_path):
    with open(os.path.join(FIXTURES, "resnet_sd.pt"), "rb") as fh:
        data = fh.read()
    for cut in (10, len(data) // 2, len(data) - 30):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as exc:
            TorchZipReader(str(path))
        assert exc.value.retryable and exc.value.reason in ("incomplete", "truncated")


def test_truncated_legacy_file_is_retryable(tmp_path):
    with open(os.path.join(FIXTURES, "mobilenet_legacy.pt"), "rb") as fh:
        data = fh.read()
    for cut in (100, len(data) - 10):
        path = tmp_path / "cut.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as exc:
            TorchLegacyReader(str(path))
        assert exc.value.retryable, str(exc.value)


def test_tensor_larger_than_its_storage_is_refused(tmp_path):
    obj = {"w": T("0", np.arange(4, dtype=np.float32), size=(2,), stride=(2,), offset=1)}
    with TorchZipReader(write_torch_zip(tmp_path / "ok.pt", obj)) as r:
        assert r.read_array("w").tolist() == [1.0, 3.0]
    bad = {"w": T("0", np.ones(4, np.float32), size=(3,), stride=(2,), offset=1)}
    with pytest.raises(CheckpointError, match="reaches byte 24 of storage 0"):
        TorchZipReader(write_torch_zip(tmp_path / "bad.pt", bad))
    lying = {"w": T("0", np.ones(4, np.float32), numel=40)}
    with pytest.raises(CheckpointError, match="has 16 bytes, the pickle says 160"):
        TorchZipReader(write_torch_zip(tmp_path / "lie.pt", lying))


def test_missing_or_compressed_storage_records(tmp_path):
    with pytest.raises(CheckpointError, match="no archive/data/1 record"):
        TorchZipReader(write_torch_zip(tmp_path / "m.pt", bn_dict(), skip=("1",)))
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(write_torch_zip(tmp_path / "z.pt", bn_dict(), compress_storages=True))
    assert exc.value.reason == "unsupported"


def test_bad_byteorder_and_missing_pickle(tmp_path):
    with pytest.raises(CheckpointError, match="byteorder"):
        TorchZipReader(write_torch_zip(tmp_path / "b.pt", bn_dict(), byteorder=b"middle"))
    path = tmp_path / "n.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data/0", b"\0" * 16)
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(str(path))
    assert exc.value.reason == "unsupported"


# -- zip member location ----------------------------------------------------------------

def test_locate_members_agrees_with_zipfile(tmp_path):
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/stored.bin", os.urandom(1000))
        zf.writestr("a/deflated.txt", b"x" * 5000, compress_type=zipfile.ZIP_DEFLATED)
        zf.comment = b"a trailing comment"
    members = zipmember.locate_members(str(path))
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            m = members[info.filename]
            assert m.size == info.compress_size and m.compress_type == info.compress_type
            if info.compress_type == zipfile.ZIP_STORED:
                assert raw[m.data_offset:m.data_offset + m.size] == zf.read(info)
            else:
                inflated = zlib.decompress(raw[m.data_offset:m.data_offset + m.size], -15)
                assert inflated == zf.read(info)
    assert incomplete(str(path)) is None
    path.write_bytes(raw[:-5])
    assert incomplete(str(path))[0] == "truncated"


def test_zip_bomb_overlap_and_duplicates_are_refused(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/huge", b"\0" * (1 << 20))
    assert zipmember.locate_members(str(path))["a/huge"].compress_type == 8
    raw = bytearray(path.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")                 # claim 3.75 GiB from ~1 KiB
    raw[cd + 24:cd + 28] = struct.pack("<I", 0xF0000000)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as exc:
        zipmember.locate_members(str(path))
    assert exc.value.reason == "too_large" and "zip bomb" in str(exc.value)

    path = tmp_path / "overlap.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/one", b"1" * 100)
        zf.writestr("a/two", b"2" * 100)
    raw = bytearray(path.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")                 # second entry: point it at the first
    raw[cd + 42:cd + 46] = struct.pack("<I", 0)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"overlaps|twice"):
        zipmember.locate_members(str(path))


def _zip64_with_hole(path: str, big: int, pkl: bytes, small: dict[str, bytes]) -> None:
    """A torch-like archive whose data/0 is ``big`` bytes of sparse zeros (zip64)."""
    entries = []
    with open(path, "wb") as fh:
        def local(name: str, size: int, crc: int, zip64: bool) -> int:
            off = fh.tell()
            nb = name.encode()
            extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
            s32 = 0xFFFFFFFF if zip64 else size
            fh.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, 0, 0, 0, crc, s32, s32,
                                 len(nb), len(extra)) + nb + extra)
            return off

        off = local("archive/data.pkl", len(pkl), zlib.crc32(pkl), False)
        fh.write(pkl)
        entries.append(("archive/data.pkl", off, len(pkl), zlib.crc32(pkl)))
        off = local("archive/data/0", big, 0, True)
        fh.seek(big, os.SEEK_CUR)
        entries.append(("archive/data/0", off, big, 0))
        for name, raw in small.items():
            off = local(name, len(raw), zlib.crc32(raw), False)
            fh.write(raw)
            entries.append((name, off, len(raw), zlib.crc32(raw)))
        cd_off = fh.tell()
        for name, off, size, crc in entries:
            nb = name.encode()
            vals = ([size, size] if size >= 0xFFFFFFFF else []) + (
                [off] if off >= 0xFFFFFFFF else [])
            extra = struct.pack("<HH", 1, 8 * len(vals)) + b"".join(
                struct.pack("<Q", v) for v in vals) if vals else b""
            s32 = 0xFFFFFFFF if size >= 0xFFFFFFFF else size
            o32 = 0xFFFFFFFF if off >= 0xFFFFFFFF else off
            fh.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, 0, 0, 0, 0, crc, s32,
                                 s32, len(nb), len(extra), 0, 0, 0, 0, o32) + nb + extra)
        cd_size = fh.tell() - cd_off
        rec = fh.tell()
        n = len(entries)
        fh.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size,
                             cd_off))
        fh.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, rec, 1))
        fh.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                             0xFFFFFFFF, 0))


def test_one_bn_vector_of_a_huge_zip64_file_reads_a_few_kb(tmp_path, monkeypatch):
    big = (4 << 30) + 4096                          # > 4 GiB: zip64 sizes and offsets
    var = np.linspace(0.5, 2.0, 64).astype(np.float32)
    obj = {"embed.weight": T("0", np.zeros(1, np.float32), size=(big // 4,), numel=big // 4),
           "bn.running_var": T("1", var)}
    pkl, _ = torch_pickle_bytes(obj)
    path = str(tmp_path / "huge.pt")
    _zip64_with_hole(path, big, pkl, {"archive/data/1": var.tobytes(),
                                      "archive/byteorder": b"little"})
    if os.stat(path).st_blocks * 512 > 64 << 20:
        pytest.fail("filesystem does not keep the test file sparse")
    with zipfile.ZipFile(path) as zf:               # the stdlib agrees with the layout
        assert zf.getinfo("archive/data/0").file_size == big
        assert zf.getinfo("archive/data/1").header_offset > 0xFFFFFFFF
    seen = []
    real = os.pread

    def counting(fd, n, off):
        seen.append(n)
        return real(fd, n, off)

    monkeypatch.setattr(os, "pread", counting)
    with TorchZipReader(path) as r:
        opened = sum(seen)
        seen.clear()
        assert r.info("embed.weight").shape == (big // 4,)
        got = r.read_array("bn.running_var")
        assert got.tobytes() == var.tobytes()
        assert sum(seen) < 4096, seen
        assert r.read("embed.weight", big // 4 - 3).tolist() == [0.0, 0.0, 0.0]
    assert opened < 128 << 10


def test_sparse_strided_reads_fetch_only_the_runs_they_use(tmp_path, monkeypatch):
    from bnexporter.formats import torch_zip

    base = np.arange(300 * 300, dtype=np.float32)
    path = write_torch_zip(tmp_path / "t.pt", {"wt": T("0", base, size=(300, 300),
                                                         stride=(1, 300))})
    want = base.reshape(300, 300).T.ravel()
    monkeypatch.setattr(torch_zip, "_SPAN_FLOOR", 0)
    monkeypatch.setattr(torch_zip, "_GAP", 16)
    with TorchZipReader(path) as r:
        r.read("wt", 0, 1)
        seen = []
        real = os.pread

        def counting(fd, n, off):
            seen.append(n)
            return real(fd, n, off)

        monkeypatch.setattr(os, "pread", counting)
        assert r.read("wt", 0, 600).tobytes() == want[:600].tobytes()
        assert sum(seen) == 600 * 4 and len(seen) == 300      # one run per column
        rng = np.random.default_rng(1)
        for _ in range(20):
            a, b = sorted(rng.integers(0, want.size + 1, size=2))
            assert r.read("wt", a, b).tobytes() == want[a:b].tobytes()
        monkeypatch.setattr(torch_zip, "_GATHER_BLOCK", 7_000)
        assert r.read_array("wt").tobytes() == want.tobytes()


def test_unsupported_tensor_kinds_are_noted_not_fatal(tmp_path):
    obj = {"q.weight": Raw(b"ctorch._utils\n_rebuild_qtensor\n)R"), **bn_dict()}
    with TorchZipReader(write_torch_zip(tmp_path / "q.pt", obj)) as r:
        assert {t.name for t in r.tensors()} == set(bn_dict())
        assert any("_rebuild_qtensor" in n for n in r.meta.notes)


def test_unknown_wrapper_prefers_weights_over_optimizer_state(tmp_path):
    opt = {"state": {i: {"exp_avg": T(f"o{i}", np.ones(3, np.float32))} for i in range(9)}}
    obj = {"weights": bn_dict(), "optimizer": opt, "iteration": 11}
    with TorchZipReader(write_torch_zip(tmp_path / "u.pt", obj)) as r:
        assert set(bn_dict()) <= {t.name for t in r.tensors()}
        assert "optimizer.state.8.exp_avg" in r.meta.auxiliary
        assert "weights from weights" in r.meta.notes and r.meta.step == 11
