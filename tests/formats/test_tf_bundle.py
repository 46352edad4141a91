"""TF bundle reader against checkpoints written by real TensorFlow 2.21.

Ground truth lives next to each fixture (``<prefix>.expected.npz/json``, made by
tests/fixtures/gen_tf.py with TensorFlow), so nothing here imports TensorFlow.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnexporter.errors import CheckpointError
from bnexporter.formats import protowire as pw
from bnexporter.formats import sstable
from bnexporter.formats.tf_bundle import (
    TFBundleReader,
    bundle_complete,
    decode_string_scalar,
    load_index,
    looks_like,
    newest_prefix,
    parse_entry,
    parse_object_graph,
    parse_slice_key,
)
from tests.support.paths import FIXTURES

FIX = os.path.join(FIXTURES, "tf")
PREFIXES = sorted(p[: -len(".expected.json")]
                  for p in glob.glob(os.path.join(FIX, "*", "*.expected.json")))
K3 = os.path.join(FIX, "k3_ckpt", "ckpt-7")
SHARDED = os.path.join(FIX, "k3_sharded", "ckpt-3")
MANAGER = os.path.join(FIX, "k3_manager")
TFK = os.path.join(FIX, "tfk_weights", "ckpt")
TFK_LEGACY = os.path.join(FIX, "tfk_legacy_opt", "ckpt")
TF1 = os.path.join(FIX, "tf1_slim", "model.ckpt-4")


def _ids(value: object) -> str:
    return os.path.relpath(value, FIX) if isinstance(value, str) else str(value)


def expected(prefix: str) -> tuple[dict, np.lib.npyio.NpzFile]:
    with open(prefix + ".expected.json") as fh:
        info = json.load(fh)
    return info, np.load(prefix + ".expected.npz")


def copy_bundle(prefix: str, dest: str) -> str:
    folder = os.path.dirname(prefix)
    for name in os.listdir(folder):
        if name.startswith(os.path.basename(prefix) + ".") or name == "checkpoint":
            shutil.copy(os.path.join(folder, name), dest)
    return os.path.join(dest, os.path.basename(prefix))


def test_fixtures_exist_and_are_small():
    assert len(PREFIXES) == 8
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(FIX) for f in fs)
    assert total < 1_500_000


# -- values and names -----------------------------------------------------------

@pytest.mark.parametrize("prefix", PREFIXES, ids=_ids)
def test_every_tensor_equals_tensorflow_bit_exactly(prefix):
    info, values = expected(prefix)
    with TFBundleReader(prefix) as r:
        assert {t.name for t in r.tensors()} == set(info["names"].values())
        for key, name in info["names"].items():
            assert r.checkpoint_keys[name] == key
            got, want = r.read_array(name), values[key]
            assert got.dtype == want.dtype and got.shape == want.shape, key
            assert got.tobytes() == want.tobytes(), key


@pytest.mark.parametrize("prefix", [SHARDED, TF1, K3], ids=_ids)
def test_partial_reads_match_including_across_slice_boundaries(prefix):
    info, values = expected(prefix)
    rng = np.random.default_rng(0)
    with TFBundleReader(prefix) as r:
        for key, name in info["names"].items():
            flat = values[key].ravel()
            for _ in range(5):
                a, b = sorted(rng.integers(0, flat.size + 1, 2))
                assert r.read(name, a, b).tobytes() == flat[a:b].tobytes(), (key, a, b)
            chunks = [c for _, c in r.iter_chunks(name, chunk_elements=7)]
            if flat.size:
                assert np.concatenate(chunks).tobytes() == flat.tobytes()


def test_sliced_tensors_are_really_present():
    # MaxShardSizePolicy cut big tensors across shards; TF1 partitioned the embedding
    assert len(load_index(SHARDED).slices) >= 2
    assert set(load_index(TF1).slices) == {"embedding", "embedding/Adam", "embedding/Adam_1"}
    with TFBundleReader(TF1) as r:
        assert r.info("embedding").shape == (130, 3)
        assert "embedding" not in r.meta.auxiliary


@pytest.mark.parametrize("prefix", PREFIXES, ids=_ids)
def test_auxiliary_step_and_framework(prefix):
    info, _ = expected(prefix)
    with TFBundleReader(prefix) as r:
        assert r.meta.framework == "tf"
        assert r.meta.auxiliary == {info["names"][k] for k in info["auxiliary_keys"]}
        assert r.meta.step == info["step"]


@pytest.mark.parametrize("prefix", PREFIXES, ids=_ids)
def test_bn_variables_are_named_by_layer(prefix):
    info, _ = expected(prefix)
    with TFBundleReader(prefix) as r:
        names = {t.name for t in r.tensors()}
        model = names - r.meta.auxiliary
        for layer in info["bn_layers"]:
            for var in ("beta", "moving_mean", "moving_variance"):
                assert f"{layer}/{var}" in model
        for name in model:
            assert "layer_with_weights" not in name and "_operations" not in name
            assert "_trainable_variables" not in name and ".OPTIMIZER_SLOT" not in name


def test_layer_names_match_the_models():
    with TFBundleReader(K3) as r:
        names = {t.name for t in r.tensors()}
    # Keras 3 variable paths; the nested Sequential "block" prefixes its layers
    assert {"batch_normalization_1/gamma", "bn_dead/gamma", "block/batch_normalization/gamma",
            "conv2d_1/kernel"} <= names
    with TFBundleReader(os.path.join(MANAGER, "ckpt-1")) as r:
        assert "sequential/bn/gamma" in {t.name for t in r.tensors()}
    with TFBundleReader(TFK_LEGACY) as r:
        names = {t.name for t in r.tensors()}
        assert "bn.stem/gamma" in names  # key has 'bn..stem'
        slots = {n for n in names if r.checkpoint_keys[n].count(".OPTIMIZER_SLOT")}
        assert slots and slots <= r.meta.auxiliary
        assert "Adam/bn_dead/gamma/m" in slots


def test_optimizer_copies_of_bn_names_are_auxiliary():
    # the new tf_keras optimizer names its moments after the variable they track
    with TFBundleReader(TFK) as r:
        assert "Adam/m/bn_dead/gamma" in r.meta.auxiliary
        assert "bn_dead/gamma" not in r.meta.auxiliary


@pytest.mark.parametrize("prefix,gamma", [(K3, True), (TFK, True), (TFK_LEGACY, True),
                                          (TF1, False)], ids=_ids)
def test_injected_dead_channel(prefix, gamma):
    info, _ = expected(prefix)
    layer, ch = info["dead"]["layer"], info["dead"]["channel"]
    with TFBundleReader(prefix) as r:
        beta = r.read_array(f"{layer}/beta")
        assert beta[ch] == (-1.0 if gamma else -5.0)
        if gamma:
            g = r.read_array(f"{layer}/gamma")
            assert g[ch] == np.float32(1e-35)
            assert np.all(np.delete(g, ch) > 1e-3)
        else:
            assert f"{layer}/gamma" not in {t.name for t in r.tensors()}


# -- locating checkpoints ------------------------------------------------------------

def test_every_path_form_resolves_to_the_same_bundle():
    newest = os.path.join(MANAGER, "ckpt-3")
    for path in (newest, newest + ".index", newest + ".data-00000-of-00001",
                 os.path.join(MANAGER, "checkpoint"), MANAGER):
        with TFBundleReader(path) as r:
            assert r.path == newest + ".index"
            assert r.meta.step == 15


def test_newest_prefix(tmp_path):
    assert newest_prefix(MANAGER) == os.path.join(MANAGER, "ckpt-3")
    assert newest_prefix(str(tmp_path)) is None
    state = tmp_path / "checkpoint"
    state.write_text('all_model_checkpoint_paths: "a"\n')
    assert newest_prefix(str(tmp_path)) is None
    state.write_text('model_checkpoint_path: "/elsewhere/run \\"1\\"/ckpt-9"\n')
    assert newest_prefix(str(tmp_path)) == '/elsewhere/run "1"/ckpt-9'
    # an absolute path from the trainer's mount point, present here under our mount
    copy_bundle(os.path.join(MANAGER, "ckpt-2"), str(tmp_path))
    state.write_text('model_checkpoint_path: "/mnt/train/ckpt-2"\n')
    assert newest_prefix(str(tmp_path)) == str(tmp_path / "ckpt-2")
    state.write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\n')
    assert newest_prefix(str(tmp_path)) == str(tmp_path / "ckpt-2")


def test_state_file_without_a_checkpoint_is_retryable(tmp_path):
    (tmp_path / "checkpoint").write_text("")
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(str(tmp_path / "checkpoint"))
    assert exc.value.retryable


def test_bundle_complete_and_detection(tmp_path):
    for prefix in PREFIXES:
        assert bundle_complete(prefix)
        assert looks_like(prefix + ".index")
    assert not looks_like(K3 + ".expected.json")
    prefix = copy_bundle(SHARDED, str(tmp_path))
    os.remove(prefix + ".data-00002-of-00005")
    assert not bundle_complete(prefix)
    prefix = copy_bundle(K3, str(tmp_path))
    with open(prefix + ".data-00000-of-00001", "r+b") as fh:
        fh.truncate(100)
    assert not bundle_complete(prefix)
    with open(prefix + ".index", "r+b") as fh:
        fh.truncate(os.path.getsize(prefix + ".index") - 1)
    assert not bundle_complete(prefix) and not looks_like(prefix + ".index")
    assert not bundle_complete(str(tmp_path / "nothing"))


# -- broken and half-written files --------------------------------------------------------

def index_block(index: bytes) -> tuple[int, int]:
    """(offset, size) of the index block, from the footer's second handle."""
    footer = index[-48:-8]
    _, pos = pw.read_varint(footer, 0)
    _, pos = pw.read_varint(footer, pos)
    off, pos = pw.read_varint(footer, pos)
    size, _ = pw.read_varint(footer, pos)
    return off, size


def assert_one_line(exc: CheckpointError, path: str) -> None:
    text = str(exc)
    assert "\n" not in text and text.startswith(path + ": ")


def test_missing_shard_is_incomplete_and_retryable(tmp_path):
    prefix = copy_bundle(SHARDED, str(tmp_path))
    os.remove(prefix + ".data-00003-of-00005")
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(prefix)
    assert exc.value.reason == "incomplete" and exc.value.retryable
    assert "data-00003-of-00005" in str(exc.value)
    assert_one_line(exc.value, prefix + ".index")


def test_missing_index(tmp_path):
    prefix = copy_bundle(K3, str(tmp_path))
    os.remove(prefix + ".index")
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(prefix)
    assert exc.value.reason == "incomplete" and exc.value.retryable
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(str(tmp_path / "nope"))
    assert exc.value.reason == "io" and not exc.value.retryable


@pytest.mark.parametrize("keep", [0, 10, 47, 48, 500, -1])
def test_truncated_index(tmp_path, keep):
    prefix = copy_bundle(K3, str(tmp_path))
    size = os.path.getsize(prefix + ".index")
    with open(prefix + ".index", "r+b") as fh:
        fh.truncate(keep if keep >= 0 else size - 1)
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(prefix)
    assert exc.value.reason == "truncated" and exc.value.retryable
    assert_one_line(exc.value, prefix + ".index")


def test_bad_magic(tmp_path):
    prefix = copy_bundle(TFK, str(tmp_path))
    index = Path(prefix + ".index")
    data = bytearray(index.read_bytes())
    data[-1] ^= 0xFF
    index.write_bytes(data)
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(prefix)
    assert "magic" in exc.value.cause
    assert_one_line(exc.value, prefix + ".index")


def test_flipped_byte_in_a_block_is_a_checksum_error(tmp_path):
    prefix = copy_bundle(TFK, str(tmp_path))
    index = Path(prefix + ".index")
    data = bytearray(index.read_bytes())
    data[20] ^= 0x01
    index.write_bytes(data)
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(prefix)
    assert exc.value.reason == "corrupt" and "checksum" in exc.value.cause


def test_tensor_past_end_of_shard(tmp_path):
    prefix = copy_bundle(TF1, str(tmp_path))
    shard = prefix + ".data-00000-of-00001"
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) - 4)
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(prefix)
    assert exc.value.reason == "truncated" and exc.value.retryable
    assert "past the end of model.ckpt-4.data-00000-of-00001" in exc.value.cause
    assert_one_line(exc.value, prefix + ".index")


def test_snappy_block_is_unsupported(tmp_path):
    prefix = copy_bundle(TFK, str(tmp_path))
    index = Path(prefix + ".index")
    data = bytearray(index.read_bytes())
    index_off, index_size = index_block(bytes(data))
    handles = sstable.parse_block(bytes(data[index_off:index_off + index_size]))
    off, p = pw.read_varint(handles[0][1], 0)
    size, _ = pw.read_varint(handles[0][1], p)
    data[off + size] = 1  # type byte: snappy; keep the checksum valid
    crc = sstable.mask_crc(sstable.crc32c(bytes(data[off:off + size + 1])))
    data[off + size + 1:off + size + 5] = struct.pack("<I", crc)
    index.write_bytes(data)
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(prefix)
    assert exc.value.reason == "unsupported" and "snappy" in exc.value.cause


# -- synthetic bundles: what TF on this machine cannot produce -------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def entry(dtype: int, shape: list[int], offset: int, size: int, shard: int = 0) -> bytes:
    dims = b"".join(field(2, field(1, d)) for d in shape)
    return (field(1, dtype) + field(2, dims) + field(3, shard) + field(4, offset)
            + field(5, size))


def write_table(path: str, items: list[tuple[bytes, bytes]]) -> None:
    """A one-data-block SSTable, as TF's TableBuilder lays it out."""
    def block(kvs):
        body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in kvs)
        return body + struct.pack("<II", 0, 1)

    def trailer(b):
        return b"\0" + struct.pack("<I", sstable.mask_crc(sstable.crc32c(b + b"\0")))

    data = block(items)
    out = data + trailer(data)
    meta_off, meta = len(out), block([])
    out += meta + trailer(meta)
    index_off, index = len(out), block([(items[-1][0], varint(0) + varint(len(data)))])
    out += index + trailer(index)
    handles = varint(meta_off) + varint(len(meta)) + varint(index_off) + varint(len(index))
    out += handles.ljust(40, b"\0") + sstable.MAGIC_BYTES
    with open(path, "wb") as fh:
        fh.write(out)


def test_big_endian_bundle_and_dtypes(tmp_path):
    prefix = str(tmp_path / "be")
    f32 = np.array([1.5, -2.0, 3.25], ">f4").tobytes()
    f16 = np.array([0.5, -1.0], ">f2").tobytes()
    bf16 = struct.pack(">HH", 0x3F80, 0xC000)  # 1.0, -2.0
    blob = f32 + f16 + bf16
    write_table(prefix + ".index", [
        (b"", field(1, 1) + field(2, 1)),
        (b"a/BatchNorm/beta", entry(1, [3], 0, 12)),
        (b"a/h", entry(19, [2], 12, 4)),
        (b"a/r", entry(20, [], 0, 0)),  # DT_RESOURCE: skipped with a note
        (b"b", entry(14, [1, 2], 16, 4)),
    ])
    (tmp_path / "be.data-00000-of-00001").write_bytes(blob)
    with TFBundleReader(prefix) as r:
        assert r.read_array("a/BatchNorm/beta").tolist() == [1.5, -2.0, 3.25]
        assert r.read_array("a/h").tolist() == [0.5, -1.0]
        assert r.read_array("b").tolist() == [[1.0, -2.0]]
        assert r.meta.step is None and r.meta.auxiliary == frozenset()
        assert any("non-numeric" in n for n in r.meta.notes)


@pytest.mark.parametrize("bad,message", [
    (entry(1, [3], 0, 12, shard=1), "shard 1 of 1"),
    (entry(1, [4], 0, 12), "needs 16"),
    (entry(1, [3], 8, 12), "past the end"),
    (b"\x0a\x05ab", "claims 5 bytes"),
])
def test_inconsistent_entries(tmp_path, bad, message):
    prefix = str(tmp_path / "x")
    write_table(prefix + ".index", [(b"", field(1, 1)), (b"w", bad)])
    (tmp_path / "x.data-00000-of-00001").write_bytes(bytes(12))
    with pytest.raises(CheckpointError) as exc:
        TFBundleReader(prefix)
    assert message in exc.value.cause
    assert_one_line(exc.value, prefix + ".index")


def test_slice_key_numbers():
    # keys TF 2.21 wrote for a [130, 3] variable split in two (65 needs two bytes)
    assert parse_slice_key(b"\x00emb\x00\x01\x01\x02\xc0A\xc0A\x80\x83", "k") == (
        "emb", ((65, 65), (0, 3)))
    assert parse_slice_key(b"\x00e\x00\x01\x01\x01\x80\x7f", "k") == ("e", ((0, -1),))


def test_crc32c_known_answer():
    assert sstable.crc32c(b"123456789") == 0xE3069283


# -- fuzzing: any bytes end in CheckpointError, quickly -------------------------------------

FUZZ = settings(max_examples=150, deadline=1000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
INDEX = Path(TFK_LEGACY + ".index").read_bytes()
BLOCK_ENTRIES = sstable.read_table(INDEX)


def survives(fn, *args) -> None:
    try:
        fn(*args)
    except CheckpointError as exc:
        assert "\n" not in str(exc)


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for pos, val in edits:
        out[pos % len(out)] = val
    return bytes(out[: max(1, len(out) - cut)])


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    survives(sstable.read_table, data + sstable.MAGIC_BYTES, "f")
    survives(sstable.parse_block, data, "f")
    survives(pw.parse, data, "f")
    survives(parse_entry, data, "k", "f")
    survives(parse_object_graph, data, "f")
    survives(parse_slice_key, b"\x00" + data, "f")


@FUZZ
@given(edits, st.integers(0, 64))
def test_fuzz_mutated_index(changes, cut):
    survives(sstable.read_table, mutate(INDEX, changes, cut), "f")


@FUZZ
@given(edits, st.integers(0, 8), st.integers(0, 10_000))
def test_fuzz_mutated_block_and_messages(changes, cut, which):
    # CRCs stop mutations of a whole index early; go past them to the parsers
    off, size = index_block(INDEX)
    survives(sstable.parse_block, mutate(INDEX[off:off + size], changes, cut), "f")
    _, value = BLOCK_ENTRIES[which % len(BLOCK_ENTRIES)]
    survives(parse_entry, mutate(value, changes, cut), "k", "f")


@functools.cache
def graph_bytes() -> bytes:
    e = load_index(TFK_LEGACY).entries["_CHECKPOINTABLE_OBJECT_GRAPH"]
    data = Path(TFK_LEGACY + ".data-00000-of-00001").read_bytes()
    return decode_string_scalar(data[e.offset:e.offset + e.size], e.crc, "g")


def test_object_graph_parses():
    nodes = parse_object_graph(graph_bytes(), "g")
    fulls = {a[1] for n in nodes for a in n.attributes}
    assert "bn_dead/gamma" in fulls and any(n.slots for n in nodes)


@FUZZ
@given(edits, st.integers(0, 200))
def test_fuzz_mutated_object_graph(changes, cut):
    survives(parse_object_graph, mutate(graph_bytes(), changes, cut), "g")


def test_an_empty_prefix_is_followed_through_the_state_file(tmp_path):
    """CheckpointManager(directory, checkpoint_name=""): files named ``.index`` and
    ``.data-00000-of-00001``, announced as ``model_checkpoint_path: ""``."""
    import shutil

    from bnexporter.daemon.files import list_candidates
    from bnexporter.scan import analyse_path

    src = Path(__file__).resolve().parents[1] / "fixtures" / "tf" / "k3_ckpt"
    shutil.copy(src / "ckpt-7.index", tmp_path / ".index")
    shutil.copy(src / "ckpt-7.data-00000-of-00001", tmp_path / ".data-00000-of-00001")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: ""\n')
    cands = list_candidates(str(tmp_path), ["*.index"])
    assert [os.path.basename(c.path) for c in cands] == [".index"]
    report = analyse_path(str(tmp_path))
    assert report.error is None and report.bn_layers
