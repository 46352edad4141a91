"""``torch.export.save`` archives (``.pt2``) as checkpoints.

Since torch 2.6 a ``.pt2`` stores each weight storage as one raw, uncompressed
record ``<root>/data/weights/weight_<n>`` and describes them in
``data/weights/<model>_weights_config.json``: state_dict name -> record, dtype
(torch's serialized ScalarType), sizes, strides and storage offset. No pickle is
involved, so each tensor becomes a lazy strided view onto its record, read in
place like :mod:`.torch_zip`'s storages. The serialized program
(``models/<model>.json``) is read only for BatchNorm epsilons: its graph
signature names the buffer behind each ``batch_norm`` node's running mean.
Older layouts (a pickled state dict inside the archive) are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from bnexporter.formats import torch_layout, zipmember
from bnexporter.formats.base import RangeFile
from bnexporter.formats.spec import Format, Probe
from bnexporter.formats.torch_pickle import MAX_NAME, StorageRef, TensorRef
from bnexporter.formats.torch_zip import TorchReaderBase

# json.loads makes ~20x its input in Python objects (64 MB of "[]," took 1.7 GB), and a
# deflated member of that size is a few KB: keep both under a worker's memory budget.
# Real ones: ~300 bytes per weight in the config, ~2.5 KB per graph node in the program.
MAX_CONFIG = 16 << 20
MAX_PROGRAM = 16 << 20
MAX_DIMS = 64
# torch._export.serde.schema.ScalarType
SCALAR_TYPES = {
    1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32",
    8: "float64", 9: "complex32", 10: "complex64", 11: "complex128", 12: "bool",
    13: "bfloat16", 28: "uint16", 29: "float8_e4m3fn", 30: "float8_e5m2",
    31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz", 33: "float8_e8m0fnu", 34: "uint32",
    35: "uint64",
}
STRIDED = 7  # torch._export.serde.schema.Layout.Strided
_RECORD = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def model_names(names: Iterable[str]) -> tuple[str, list[str]] | None:
    """The archive root and its models (``models/<name>.json``), or None: not a .pt2."""
    models: list[str] = []
    root = None
    for n in names:
        m = re.fullmatch(r"([^/]+)/models/([^/]+)\.json", n)
        if m:
            root = root or m.group(1)
            if m.group(1) == root:
                models.append(m.group(2))
    return (root, sorted(models)) if root is not None else None


class _Skip(Exception):
    """One weight we cannot represent; counted in a note, the rest is read."""


def _int(value: Any, what: str) -> int:
    if isinstance(value, dict) and set(value) == {"as_int"}:
        value = value["as_int"]
    if type(value) is not int or value < 0:
        raise _Skip(f"a symbolic or invalid {what}")
    return value


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, list) or len(values) > MAX_DIMS:
        raise _Skip(f"invalid {what}")
    return tuple(_int(v, what) for v in values)


class TorchExportReader(TorchReaderBase):
    format = "torch-export"

    def __init__(self, path: str):
        super().__init__(path)
        self._file = RangeFile(path)
        self._records: dict[str, zipmember.ZipEntry] = {}
        self._parse_or_close()

    def _parse(self) -> None:
        f = self._file
        assert f is not None
        entries = zipmember.read_directory(f)
        found = model_names(entries)
        if found is None or not found[1]:
            raise self.error("torch.export archive without a models/<name>.json program "
                             "(written before torch 2.6?); re-save it with torch.export.save",
                             "unsupported")
        root, models = found
        model = "model" if "model" in models else models[0]
        if len(models) > 1:
            self.meta.notes.append(f"{len(models)} programs in the archive; weights of "
                                   f"{model!r} read")
        base = f"{root}/data/weights/"
        config_entry = entries.get(f"{base}{model}_weights_config.json")
        if config_entry is None:
            why = "a pickled state dict" if f"{base}{model}.pt" in entries else "no weights"
            raise self.error(f"torch.export archive holds {why} for {model!r} (an older "
                             "layout); re-save it with torch.export.save", "unsupported")
        order = entries.get(f"{root}/byteorder")
        if order is not None:
            text = zipmember.read_member(f, order, 16)
            if text not in (b"little", b"big"):
                raise self.error(f"unknown byteorder record {text[:16]!r}")
            self.big_endian = text == b"big"
        config = self._json(zipmember.read_member(f, config_entry, MAX_CONFIG), "weights config")
        payloads = config.get("config") if isinstance(config, dict) else None
        if not isinstance(payloads, dict):
            raise self.error("weights config has no 'config' mapping")
        self._records = {n[len(base):]: e for n, e in entries.items() if n.startswith(base)}
        layout = torch_layout.Layout(source="torch.export program")
        skipped: dict[str, int] = {}
        for fqn, payload in payloads.items():
            try:
                if not isinstance(fqn, str) or len(fqn) > MAX_NAME:
                    raise _Skip("an unusable name")
                layout.tensors[fqn] = self._tensor(payload)
            except _Skip as exc:
                skipped[str(exc)] = skipped.get(str(exc), 0) + 1
        for what, count in sorted(skipped.items()):
            layout.notes.append(f"skipped {count} weight(s): {what}")
        layout.tensors = _module_order(layout.tensors)
        del config, payloads  # the program's objects are built next: not both at once
        program = entries.get(f"{root}/models/{model}.json")
        if program is not None and program.file_size <= MAX_PROGRAM:
            layout.bn_eps = _bn_eps(self._json(zipmember.read_member(f, program, MAX_PROGRAM),
                                               "program"))
        self._setup_layout(layout)

    def _json(self, raw: bytes, what: str) -> Any:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise self.error(f"torch.export {what} JSON is invalid: {exc}") from None

    def _tensor(self, payload: Any) -> TensorRef:
        if not isinstance(payload, dict) or not isinstance(payload.get("tensor_meta"), dict):
            raise _Skip("no tensor metadata")
        if payload.get("use_pickle"):
            raise _Skip("pickled tensor subclasses (not supported)")
        meta = payload["tensor_meta"]
        record = payload.get("path_name")
        if not isinstance(record, str) or not _RECORD.fullmatch(record):
            raise self.error(f"weight record name {str(record)[:40]!r} is not a plain name")
        entry = self._records.get(record)
        if entry is None:
            raise self.error(f"weights config names a missing record data/weights/{record}")
        code = meta.get("dtype")
        dtype = SCALAR_TYPES.get(code) if type(code) is int else None
        if dtype is None:
            raise _Skip(f"unknown scalar type {str(meta.get('dtype'))[:20]}")
        if meta.get("layout", STRIDED) != STRIDED:
            raise _Skip("sparse or other non-strided layouts")
        size = _ints(meta.get("sizes"), "size")
        stride = _ints(meta.get("strides"), "stride")
        if len(size) != len(stride):
            raise self.error(f"weight record {record}: sizes and strides differ in length")
        offset = _int(meta.get("storage_offset", 0), "storage offset")
        if entry.file_size == 0 and 0 not in size:
            raise _Skip("saved without data (fake tensors)")
        storage = StorageRef(record, None, entry.file_size, "cpu")
        return TensorRef(storage, offset, size, stride, dtype)

    def _storage_offset(self, storage: StorageRef) -> int:
        assert self._file is not None
        return zipmember.data_offset(self._file, self._records[storage.key])

    def _storage_bytes(self, storage: StorageRef) -> int:
        entry = self._records[storage.key]
        if entry.compress_type != zipmember.STORED:
            raise self.error(f"weight record data/weights/{storage.key} is compressed; "
                             "torch writes them stored", "unsupported")
        return entry.size


def _module_order(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The config lists every parameter before any buffer; ``state_dict()`` lists a
    module's own tensors, then its children's. Rank a module by the first tensor at or
    under it (ancestors before descendants), so the names come out in that order.
    Modules are numbered per (parent, name part), never keyed by their whole dotted path:
    a name of n parts costs n steps, not n**2 characters."""
    ids: dict[tuple[int, str], int] = {}
    rank = {0: 0}  # module id -> first tensor at or under it; 0 is the root
    keys: list[tuple[int, int, int]] = []
    for i, name in enumerate(tensors):
        module = 0
        parts = name.split(".")[:-1]
        for part in parts:
            module = ids.setdefault((module, part), len(ids) + 1)
            rank.setdefault(module, i)
        keys.append((rank[module], len(parts), i))
    names = list(tensors)
    return {names[i]: tensors[names[i]] for *_, i in sorted(keys)}


def _bn_eps(doc: Any) -> dict[str, float]:
    """BN layer (module path) -> eps, from the program's ``batch_norm`` nodes."""
    try:
        gm = doc.get("graph_module", doc)
        buffers = {}
        for spec in gm.get("signature", {}).get("input_specs", []):
            body = spec.get("buffer") if isinstance(spec, dict) else None
            if isinstance(body, dict) and isinstance(body.get("buffer_name"), str):
                buffers[(body.get("arg") or {}).get("name")] = body["buffer_name"]
        out: dict[str, float] = {}
        for node in gm["graph"]["nodes"]:
            if "batch_norm" not in str(node.get("target", "")):
                continue
            args = {i.get("name"): i.get("arg") or {} for i in node.get("inputs", [])}
            mean = buffers.get((args.get("running_mean", {}).get("as_tensor") or {}).get("name"))
            eps = args.get("eps", {}).get("as_float")
            if isinstance(mean, str) and mean.endswith(".running_mean") \
                    and isinstance(eps, float) and 0.0 <= eps < 1.0:
                out[mean[: -len(".running_mean")]] = eps
        return out
    except (AttributeError, KeyError, TypeError):
        return {}


def _sniff(probe: Probe) -> bool:
    return probe.is_zip and (model_names(probe.members()) is not None or any(
        n.endswith("serialized_exported_program.json") for n in probe.members()))


FORMAT = Format("torch-export", zipmember.looks_like, _sniff, TorchExportReader,
                zipmember.incomplete, ("*.pt2",))
