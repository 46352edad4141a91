"""TorchScript (``torch.jit.save``) and ``torch.export`` (``.pt2``) archives read as checkpoints.

Real archives from torch 2.13 must give the tensors ``torch.jit.load(p).state_dict()``
/ ``torch.export.load(p).state_dict`` give, bit for bit
(``tests/fixtures/archives.reference.json``, written by ``gen_archives.py``), under
the same names and in the order of the state_dict beside them. Synthetic archives
(stdlib only) cover hostile inputs: forbidden globals, bad persistent ids, lies about
sizes, truncation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
import pytest

from bnexporter.errors import CheckpointError
from bnexporter.formats import open_reader
from bnexporter.formats.base import Reader
from bnexporter.formats.sniff import detect
from bnexporter.formats.torch_export import TorchExportReader
from bnexporter.formats.torch_zip import TorchZipReader
from bnexporter.formats.torchscript import TorchScriptReader
from bnexporter.scan import ScanOptions, analyse_path
from tests.formats.test_torch_pickle_security import _call, _s, plain_pickle_runs
from tests.formats.test_torch_reader import Raw, T, pickle_obj

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")
GS = os.path.join(FIX, "graph_sources")
with open(os.path.join(FIX, "archives.reference.json")) as _fh:
    REFERENCE: dict[str, dict[str, list]] = json.load(_fh)


def raw_bytes(reader: Reader, name: str) -> bytes:
    """A tensor's bits as torch holds them (contiguous, little-endian)."""
    info = reader.info(name)
    if reader.raw_extent(name) is not None:
        return b"".join(p.tobytes() for _, p in reader.iter_raw(name, 1 << 16))
    flat = reader.read(name)
    if info.dtype == "bfloat16":
        return (flat.view(np.uint32) >> 16).astype("<u2").tobytes()
    assert not info.dtype.startswith("float8")  # decoded through a table: not reversible
    return flat.astype(flat.dtype.newbyteorder("<")).tobytes()


# -- real archives ------------------------------------------------------------------

@pytest.mark.parametrize("rel", sorted(REFERENCE))
def test_tensors_equal_what_torch_loads(rel):
    with open_reader(os.path.join(FIX, rel)) as r:
        assert r.format == ("torch-export" if rel.endswith(".pt2") else "torchscript")
        assert r.meta.framework == "torch"
        assert set(r.names()) == set(REFERENCE[rel])
        for name, (dtype, shape, digest) in REFERENCE[rel].items():
            info = r.info(name)
            assert (info.dtype, list(info.shape)) == (dtype, shape), name
            assert hashlib.sha256(raw_bytes(r, name)).hexdigest() == digest, name


@pytest.mark.parametrize("archive,sd", [
    ("resnetish_traced.pt", "resnetish_sd.pt"), ("resnetish.pt2", "resnetish_sd.pt"),
    ("seqnet_traced.pt", "seqnet_sd.pt"), ("seqnet_scripted.pt", "seqnet_sd.pt"),
    ("seqnet.pt2", "seqnet_sd.pt")])
def test_names_and_order_of_the_state_dict_beside(archive, sd):
    with open_reader(os.path.join(GS, archive)) as r, TorchZipReader(os.path.join(GS, sd)) as s:
        assert r.names() == s.names()
        for name in s.names():
            a, b = r.read_array(name), s.read_array(name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_every_dtype_and_a_transposed_view():
    with open_reader(os.path.join(FIX, "torch", "ts_dtypes.pt")) as ts, \
            open_reader(os.path.join(FIX, "torch", "export_dtypes.pt2")) as ex:
        assert ts.names() == ex.names()
        dtypes = {ts.info(n).dtype for n in ts.names()}
        assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "complex64", "bool",
                "uint16", "float16", "float64"} <= dtypes
        for name in ts.names():
            assert raw_bytes(ts, name) == raw_bytes(ex, name), name
        assert ts.raw_extent("lin.weight") is None          # stored transposed
        assert ts.info("lin.weight").shape == (5, 4)
        assert ts.meta.bn_eps == ex.meta.bn_eps == {"bn": pytest.approx(1e-3)}


def test_bn_eps_from_the_archive():
    for name in ("seqnet_traced.pt", "seqnet_scripted.pt", "seqnet.pt2"):
        with open_reader(os.path.join(GS, name)) as r:
            assert r.meta.bn_eps["bn_h"] == pytest.approx(1e-3)
            assert r.meta.bn_eps["stem.1"] == pytest.approx(1e-5)


def test_detection_keys():
    assert detect(os.path.join(GS, "resnetish_traced.pt")) == "torchscript"
    assert detect(os.path.join(GS, "seqnet.pt2")) == "torch-export"
    assert detect(os.path.join(GS, "seqnet_sd.pt")) == "torch"


@pytest.mark.parametrize("name", ["resnetish_traced.pt", "resnetish.pt2"])
def test_reading_one_bn_vector_reads_a_few_bytes(monkeypatch, name):
    with open_reader(os.path.join(GS, name)) as r:
        r.read("layer1.1.conv1.weight", 0, 1)   # resolves that record's local header
        seen: list[int] = []
        real = os.pread

        def counting(fd, n, off):
            seen.append(n)
            return real(fd, n, off)

        monkeypatch.setattr(os, "pread", counting)
        r.read("layer1.1.bn1.running_var")
        assert sum(seen) <= 16 * 4 + 2 * 512


@pytest.mark.parametrize("name,label", [
    ("resnetish_traced.pt", "graph:torchscript"), ("resnetish.pt2", "graph:torch.export"),
    ("seqnet_scripted.pt", "graph:torchscript"), ("seqnet.pt2", "graph:torch.export")])
def test_an_archive_alone_is_its_own_graph(tmp_path, name, label):
    shutil.copy(os.path.join(GS, name), tmp_path / name)
    stem = name.split("_")[0].split(".")[0]
    with open(os.path.join(GS, stem + ".truth.json")) as fh:
        truth = json.load(fh)["bn"]
    report = analyse_path(str(tmp_path / name), ScanOptions(bn_only=True))
    assert report.error is None
    assert {la.name for la in report.bn_layers} == set(truth)
    for layer in report.bn_layers:
        assert layer.consumer_source == label, layer.name
        if truth[layer.name] != ["concat"]:   # the truth names only the op after a concat
            assert [layer.consumer] == truth[layer.name], layer.name


# -- synthetic TorchScript archives -------------------------------------------------------

_CODE = '''class Net(Module):
  __parameters__ = []
  __buffers__ = []
  training : bool
  bn : __torch__.torch.nn.modules.batchnorm.BatchNorm2d
'''
_BN_CODE = '''class BatchNorm2d(Module):
  __parameters__ = ["weight", "bias", ]
  __buffers__ = ["running_mean", "running_var", ]
  eps : Final[float] = 0.001
'''


def ts_pickle(storages: dict[str, bytes], bn_extra: dict | None = None,
              root_extra: dict | None = None) -> bytes:
    rng = np.random.default_rng(0)
    bn_state = {"training": False, **{k: T(str(i), rng.normal(size=4).astype(np.float32))
                                      for i, k in enumerate(("weight", "bias", "running_mean",
                                                             "running_var"))},
                **(bn_extra or {})}
    bn = (b"c__torch__.torch.nn.modules.batchnorm\nBatchNorm2d\n)\x81"
          + pickle_obj(bn_state, storages) + b"b")
    root_state = {**(root_extra or {}), "training": False, "bn": Raw(bn)}
    return b"\x80\x02c__torch__\nNet\n)\x81" + pickle_obj(root_state, storages) + b"b."


def write_ts(path, data_pkl: bytes, storages: dict[str, bytes], code: str = _CODE,
             bn_code: str = _BN_CODE, drop: tuple[str, ...] = (), root: str = "net") -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{root}/data.pkl", data_pkl)
        zf.writestr(f"{root}/code/__torch__.py", code)
        zf.writestr(f"{root}/code/__torch__/torch/nn/modules/batchnorm.py", bn_code)
        zf.writestr(f"{root}/constants.pkl", b"\x80\x02).")
        for key, raw in storages.items():
            if key not in drop:
                zf.writestr(f"{root}/data/{key}", raw)
        zf.writestr(f"{root}/version", b"3\n")
    return str(path)


def good_ts(tmp_path, **kw) -> str:
    storages: dict[str, bytes] = {}
    return write_ts(tmp_path / "net.pt", ts_pickle(storages, **kw), storages)


def test_synthetic_torchscript_reads_with_declared_names(tmp_path):
    with open_reader(good_ts(tmp_path)) as r:
        assert r.format == "torchscript"
        assert r.names() == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
        assert r.meta.bn_eps == {"bn": pytest.approx(1e-3)}


def test_undeclared_attributes_are_not_weights(tmp_path):
    extra = {"cache": T("9", np.ones(4, np.float32))}  # a tensor attribute, no buffer
    with open_reader(good_ts(tmp_path, bn_extra=extra)) as r:
        assert "bn.cache" not in r.names()


def test_without_code_every_tensor_attribute_is_read_with_a_note(tmp_path):
    storages: dict[str, bytes] = {}
    path = write_ts(tmp_path / "net.pt", ts_pickle(storages), storages,
                    code="def f(x: Tensor) -> Tensor:\n  return x\n", bn_code="")
    with open_reader(path) as r:
        assert len(r.names()) == 4
        assert any("without code/ declarations" in n for n in r.meta.notes)


def test_torchscript_payload_runs_under_plain_pickle_but_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    storages: dict[str, bytes] = {}
    evil = Raw(_call("os", "system", f"touch {marker}"))
    data = ts_pickle(storages, root_extra={"hook": evil})
    # with the __torch__ classes importable, plain pickle really runs the payload
    for pkg in ("__torch__", "__torch__/torch", "__torch__/torch/nn",
                "__torch__/torch/nn/modules"):
        (tmp_path / pkg).mkdir(exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "__torch__" / "__init__.py").write_text("class Net:\n    pass\n")
    (tmp_path / "__torch__/torch/nn/modules/batchnorm.py").write_text(
        "class BatchNorm2d:\n    pass\n")
    assert plain_pickle_runs(tmp_path, data, marker, pythonpath=str(tmp_path))
    path = write_ts(tmp_path / "evil.pt", data, storages)
    with pytest.raises(CheckpointError) as exc:
        open_reader(path)
    assert exc.value.reason == "forbidden" and "forbidden global os.system" in str(exc.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("module_name,name", [
    ("torch.jit", "load"), ("torch.jit._pickle", "build_from_source"),
    ("__torch__.builtins", "eval"), ("torch.jit._pickle", "getattr")])
def test_only_the_jit_identity_helpers_pass_the_torch_jit_ban(tmp_path, module_name, name):
    storages: dict[str, bytes] = {}
    data = ts_pickle(storages, root_extra={"x": Raw(_call(module_name, name, "a"))})
    with pytest.raises(CheckpointError) as exc:
        open_reader(write_ts(tmp_path / "evil.pt", data, storages))
    assert exc.value.reason == "forbidden"


def test_jit_helpers_are_refused_outside_torchscript(tmp_path):
    from tests.formats.test_torch_reader import write_torch_zip

    data = b"\x80\x02}(" + _s("x") + _call("torch.jit._pickle", "build_intlist", "a") + b"u."
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(write_torch_zip(tmp_path / "m.pt", data_pkl=data))
    assert exc.value.reason == "forbidden"


def test_unknown_torch_classes_stay_inert_placeholders(tmp_path):
    marker = str(tmp_path / "pwned")
    # a __torch__ "class" named like a dangerous callable: a record, never called
    thing = Raw(b"c__torch__.subprocess\nPopen\n(" + _s(f"touch {marker}") + b"tR")
    with open_reader(good_ts(tmp_path, root_extra={"thing": thing})) as r:
        assert len(r.names()) == 4
    assert not os.path.exists(marker)


def test_jit_list_helpers_load(tmp_path):
    ints = Raw(b"ctorch.jit._pickle\nbuild_intlist\n(]" + b"(K\x01K\x02et" + b"R")
    with open_reader(good_ts(tmp_path, bn_extra={"pad": ints})) as r:
        assert len(r.names()) == 4


@pytest.mark.parametrize("pid,what", [
    (b"(" + _s("storage") + b"ctorch\nFloatStorage\n" + _s("../../etc/passwd") + _s("cpu")
     + b"K\x04tQ", "not a plain name"),
    (b"(" + _s("module") + b"ctorch\nFloatStorage\n" + _s("0") + _s("cpu") + b"tQ",
     "unsupported persistent id"),
    (b"(" + _s("storage") + b"c__torch__\nNet\n" + _s("0") + _s("cpu") + b"K\x04tQ",
     "without a storage class"),
])
def test_wrong_persistent_ids(tmp_path, pid, what):
    tensor = Raw(b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00(K\x04t(K\x01t"
                 + b"\x89ccollections\nOrderedDict\n)RtR")
    with pytest.raises(CheckpointError) as exc:
        open_reader(good_ts(tmp_path, bn_extra={"running_var": tensor}))
    assert what in str(exc.value)


def test_missing_storage_record(tmp_path):
    storages: dict[str, bytes] = {}
    path = write_ts(tmp_path / "net.pt", ts_pickle(storages), storages, drop=("2",))
    with pytest.raises(CheckpointError) as exc:
        open_reader(path)
    assert "data/2" in str(exc.value)


def test_storage_claiming_more_than_its_record(tmp_path):
    big = T("7", np.ones(4, np.float32), numel=1 << 20)
    with pytest.raises(CheckpointError) as exc:
        open_reader(good_ts(tmp_path, bn_extra={"running_var": big}))
    assert "has 16 bytes" in str(exc.value)


def test_stride_zero_amplification_is_refused(tmp_path):
    huge = T("7", np.ones(1, np.float32), size=(1 << 40,), stride=(0,))
    with pytest.raises(CheckpointError) as exc:
        open_reader(good_ts(tmp_path, bn_extra={"running_var": huge}))
    assert exc.value.reason == "too_large"


def test_a_module_that_contains_itself_is_walked_once(tmp_path):
    storages: dict[str, bytes] = {}
    # memoize the root object, then store it as its own attribute "me"
    body = ts_pickle(storages)
    assert body.endswith(b"ub.")
    data = body.replace(b"c__torch__\nNet\n)\x81", b"c__torch__\nNet\n)\x81q\xff", 1)
    data = data[:-3] + _s("me") + b"h\xff" + b"ub."
    with open_reader(write_ts(tmp_path / "net.pt", data, storages)) as r:
        assert len(r.names()) == 4


def test_data_pkl_without_a_module_is_unsupported(tmp_path):
    storages: dict[str, bytes] = {}
    data = b"\x80\x02" + pickle_obj({"w": T("0", np.ones(2, np.float32))}, storages) + b"."
    with pytest.raises(CheckpointError) as exc:
        open_reader(write_ts(tmp_path / "net.pt", data, storages))
    assert exc.value.reason == "unsupported"


def test_hostile_declarations_are_ignored(tmp_path):
    code = _BN_CODE.replace('["weight", "bias", ]', '[__import__("os").system("x")]')
    storages: dict[str, bytes] = {}
    path = write_ts(tmp_path / "net.pt", ts_pickle(storages), storages, bn_code=code)
    with open_reader(path) as r:
        assert r.names() == ["bn.running_mean", "bn.running_var"]


def test_torch_zip_reader_points_torchscript_elsewhere(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        TorchZipReader(good_ts(tmp_path))
    assert exc.value.reason == "unsupported" and "TorchScript" in str(exc.value)


# -- truncation, both formats -----------------------------------------------------------

@pytest.mark.parametrize("name", ["seqnet_scripted.pt", "seqnet.pt2"])
def test_truncated_archives_fail_cleanly(tmp_path, name):
    with open(os.path.join(GS, name), "rb") as fh:
        data = fh.read()
    for cut in (30, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1):
        path = tmp_path / f"cut{cut}_{name}"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError), open_reader(str(path)) as r:
            for n in r.names():
                r.read(n)


# -- synthetic .pt2 archives ------------------------------------------------------------

def rewrite_pt2(tmp_path, edit_config=None, edit_members=None) -> str:
    src = zipfile.ZipFile(os.path.join(GS, "seqnet.pt2"))
    members = {i.filename: src.read(i.filename) for i in src.infolist()}
    key = "seqnet/data/weights/model_weights_config.json"
    cfg = json.loads(members[key])
    if edit_config:
        edit_config(cfg["config"])
    members[key] = json.dumps(cfg).encode()
    methods = {}
    if edit_members:
        edit_members(members, methods)
    dst = tmp_path / "bad.pt2"
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for n, raw in members.items():
            zf.writestr(n, raw, compress_type=methods.get(n, zipfile.ZIP_STORED))
    return str(dst)


def _meta(cfg, name):
    return cfg[name]["tensor_meta"]


def test_pt2_oversize_claim_is_refused(tmp_path):
    def edit(cfg):
        _meta(cfg, "bn_h.running_var")["sizes"] = [{"as_int": 1 << 20}]
    with pytest.raises(CheckpointError) as exc:
        open_reader(rewrite_pt2(tmp_path, edit))
    assert "reaches byte" in str(exc.value)


def test_pt2_stride_zero_amplification_is_refused(tmp_path):
    def edit(cfg):
        m = _meta(cfg, "bn_h.running_var")
        m["sizes"], m["strides"] = [{"as_int": 1 << 40}], [{"as_int": 0}]
    with pytest.raises(CheckpointError) as exc:
        open_reader(rewrite_pt2(tmp_path, edit))
    assert exc.value.reason == "too_large"


@pytest.mark.parametrize("path_name", ["../../etc/passwd", "weight_999", 7])
def test_pt2_bad_record_names(tmp_path, path_name):
    def edit(cfg):
        cfg["bn_h.running_var"]["path_name"] = path_name
    with pytest.raises(CheckpointError):
        open_reader(rewrite_pt2(tmp_path, edit))


def test_pt2_unrepresentable_weights_are_skipped_with_notes(tmp_path):
    def edit(cfg):
        _meta(cfg, "bn_h.weight")["dtype"] = 99
        _meta(cfg, "bn_h.bias")["sizes"] = [{"as_expr": {"expr_str": "s0"}}]
        cfg["fc.bias"]["use_pickle"] = True
        _meta(cfg, "fc.weight")["layout"] = 2
        _meta(cfg, "mix.1.weight")["dtype"] = [1]
    with open_reader(rewrite_pt2(tmp_path, edit)) as r:
        gone = {"bn_h.weight", "bn_h.bias", "fc.bias", "fc.weight", "mix.1.weight"}
        assert not gone & set(r.names()) and "bn_h.running_var" in r.names()
        assert sum("skipped" in n for n in r.meta.notes) == 5


def test_pt2_compressed_record_is_unsupported(tmp_path):
    def edit(members, methods):
        cfg = json.loads(members["seqnet/data/weights/model_weights_config.json"])
        methods["seqnet/data/weights/" + cfg["config"]["bn_h.running_var"]["path_name"]] = \
            zipfile.ZIP_DEFLATED
    with pytest.raises(CheckpointError) as exc:
        open_reader(rewrite_pt2(tmp_path, edit_members=edit))
    assert exc.value.reason == "unsupported"


@pytest.mark.parametrize("raw", [b"[]", b"{not json", b'{"config": 3}'])
def test_pt2_bad_weights_config(tmp_path, raw):
    def edit(members, methods):
        members["seqnet/data/weights/model_weights_config.json"] = raw
    with pytest.raises(CheckpointError):
        TorchExportReader(rewrite_pt2(tmp_path, edit_members=edit))


def test_pt2_older_layout_is_unsupported(tmp_path):
    def edit(members, methods):
        del members["seqnet/data/weights/model_weights_config.json"]
        members["seqnet/data/weights/model.pt"] = b"PK"
    with pytest.raises(CheckpointError) as exc:
        open_reader(rewrite_pt2(tmp_path, edit_members=edit))
    assert exc.value.reason == "unsupported" and "older layout" in str(exc.value)


def test_pt2_bad_program_json_only_loses_eps(tmp_path):
    def edit(members, methods):
        members["seqnet/models/model.json"] = b'{"graph_module": {"graph": 5}}'
    with open_reader(rewrite_pt2(tmp_path, edit_members=edit)) as r:
        assert r.meta.bn_eps == {} and len(r.names()) == 36


def test_readers_are_the_formats_readers():
    assert isinstance(open_reader(os.path.join(GS, "seqnet.pt2")), TorchExportReader)
    assert isinstance(open_reader(os.path.join(GS, "seqnet_traced.pt")), TorchScriptReader)
