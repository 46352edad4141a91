"""TensorFlow tensor-bundle checkpoints (``prefix.index`` + ``prefix.data-*``).

Covers ``tf.train.Checkpoint``/``CheckpointManager``, tf_keras ``save_weights``
in TF format and TF1 ``Saver`` V2 files, without TensorFlow or protobuf.

TF2 checkpoint keys are object-graph paths that say nothing about layers
(``layer_with_weights-3/gamma``, or for Keras 3 even
``optimizer/_trainable_variables/2`` for a BN gamma), so tensors are named from
the ``_CHECKPOINTABLE_OBJECT_GRAPH`` instead: each variable's ``full_name``
(``batch_normalization/gamma``) when it names a layer, else its path through
the model. Variables reachable only through an optimizer are auxiliary, so
``Adam/m/batch_normalization/gamma`` is never mistaken for a BN layer.
Partitioned (sliced) variables are skipped with a note: they are rare, are
never BatchNorm parameters, and must not make the whole checkpoint unreadable.
"""

from __future__ import annotations

import codecs
import math
import os
import re
import struct
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError
from . import dtypes
from . import protowire as pw
from .base import RangeFile, Reader, TensorInfo
from .sstable import crc32c, has_magic, mask_crc, read_table

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
MAX_INDEX_BYTES = 512 << 20
MAX_GRAPH_BYTES = 256 << 20
DT_STRING = 7
# tensorflow/core/framework/types.proto; 27 (float8_e4m3b11fnuz), quantized and
# sub-byte types have no numpy-side decoder and are skipped with a note
_DTYPES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
    8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16",
    18: "complex128", 19: "float16", 22: "uint32", 23: "uint64", 24: "float8_e5m2",
    25: "float8_e4m3fn", 26: "float8_e4m3fnuz", 28: "float8_e5m2fnuz",
}
_STEP_NAMES = ("global_step", "step")
_ITER_NAMES = ("_iterations", "iterations", "iter", "iteration")
_OPTIMIZER_CHILDREN = frozenset(_ITER_NAMES)
_TF1_OPTIMIZER_SCALARS = frozenset({"beta1_power", "beta2_power"})


def data_filename(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int | None
    sliced: bool


@dataclass
class Bundle:
    prefix: str
    num_shards: int
    big_endian: bool
    entries: dict[str, Entry]
    slice_keys: int  # binary keys holding the parts of partitioned variables


# -- index --------------------------------------------------------------------

def parse_entry(raw: bytes, key: str, where: str) -> Entry:
    """Decode a BundleEntryProto (tensor_bundle.proto)."""
    f = pw.parse(raw, where)
    dims: list[int] = []
    shape_raw = pw.get_bytes(f, 2, where)
    if shape_raw:
        sf = pw.parse(shape_raw, where)
        if pw.get_int(sf, 3, where=where):
            raise CheckpointError(where, f"tensor {key!r} has an unknown rank")
        for dim in pw.get_messages(sf, 2, where):
            size = pw.get_int(dim, 1, where=where, signed=True)
            if size < 0:
                raise CheckpointError(where, f"tensor {key!r} has a negative dimension")
            dims.append(size)
        if len(dims) > 64:
            raise CheckpointError(where, f"tensor {key!r} has {len(dims)} dimensions")
    offset = pw.get_int(f, 4, where=where, signed=True)
    size = pw.get_int(f, 5, where=where, signed=True)
    if offset < 0 or size < 0:
        raise CheckpointError(where, f"tensor {key!r} has a negative offset or size")
    crc = f[6][-1] if f.get(6) else None
    return Entry(key, pw.get_int(f, 1, where=where), tuple(dims), pw.get_int(f, 3, where=where),
                 offset, size, crc if isinstance(crc, int) else None, bool(f.get(7)))


def load_index(prefix: str) -> Bundle:
    """Parse ``prefix.index``: header plus one entry per tensor."""
    where = prefix + ".index"
    f = RangeFile(where)
    try:
        if f.size > MAX_INDEX_BYTES:
            raise CheckpointError(where, f"index of {f.size} bytes is implausibly large",
                                  "too_large")
        data = f.read(0, f.size)
    finally:
        f.close()
    table = read_table(data, where)
    if not table or table[0][0] != b"":
        raise CheckpointError(where, "index has no bundle header entry")
    header = pw.parse(table[0][1], where)
    num_shards = pw.get_int(header, 1, where=where)
    endianness = pw.get_int(header, 2, where=where)
    if endianness not in (0, 1):
        raise CheckpointError(where, f"unknown endianness {endianness} in the bundle header")
    if not 1 <= num_shards <= 1 << 20:
        raise CheckpointError(where, f"bundle header lists {num_shards} data shards")
    entries: dict[str, Entry] = {}
    slice_keys = 0
    for raw_key, value in table[1:]:
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            key = ""
        if not key or key[0] == "\x00":
            # EncodeTensorNameSlice keys (binary "ordered code") of partitioned parts
            slice_keys += 1
            continue
        entry = parse_entry(value, key, where)
        if not entry.sliced and entry.shard >= num_shards:
            raise CheckpointError(where, f"tensor {key!r} is in shard {entry.shard} of "
                                         f"{num_shards}")
        entries[key] = entry
    return Bundle(prefix, num_shards, endianness == 1, entries, slice_keys)


def shard_sizes(bundle: Bundle) -> list[int]:
    """Sizes of all data shards; missing ones mean the save is not finished."""
    sizes = []
    for shard in range(bundle.num_shards):
        path = data_filename(bundle.prefix, shard, bundle.num_shards)
        try:
            sizes.append(os.stat(path).st_size)
        except OSError:
            raise CheckpointError(bundle.prefix + ".index",
                                  f"data shard {os.path.basename(path)} is missing",
                                  "incomplete", True) from None
    return sizes


def check_extents(bundle: Bundle, sizes: list[int]) -> None:
    for e in bundle.entries.values():
        if not e.sliced and e.offset + e.size > sizes[e.shard]:
            name = os.path.basename(data_filename(bundle.prefix, e.shard, bundle.num_shards))
            raise CheckpointError(bundle.prefix + ".index",
                                  f"tensor {e.key!r} at bytes {e.offset}+{e.size} lies past the "
                                  f"end of {name} ({sizes[e.shard]} bytes)", "truncated", True)


def bundle_complete(prefix: str) -> bool:
    """True when the index footer is valid and every shard holds its tensors."""
    try:
        bundle = load_index(prefix)
        check_extents(bundle, shard_sizes(bundle))
    except CheckpointError:
        return False
    return True


# -- locating the newest checkpoint ---------------------------------------------

_STATE_RE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\\n]|\\.)*)"', re.M)


def newest_prefix(folder: str) -> str | None:
    """The prefix the folder's ``checkpoint`` state file points at, if any.

    A relative path is relative to the folder (as in TF). An absolute path whose
    index is absent but whose basename exists here is remapped: the folder was
    written under another mount point (e.g. a trainer pod vs this sidecar).
    """
    try:
        with open(os.path.join(folder, "checkpoint"), "rb") as fh:
            text = fh.read(1 << 20).decode("utf-8", "surrogateescape")
    except OSError:
        return None
    m = _STATE_RE.search(text)
    if not m:
        return None
    try:
        raw = m.group(1).encode("utf-8", "surrogateescape")
        value = codecs.escape_decode(raw)[0].decode("utf-8", "surrogateescape")
    except (ValueError, UnicodeError):
        return None
    if not value:
        return None
    if not os.path.isabs(value):
        return os.path.join(folder, value)
    local = os.path.join(folder, os.path.basename(value))
    if not os.path.exists(value + ".index") and os.path.exists(local + ".index"):
        return local
    return value


_DATA_RE = re.compile(r"\.data-\d{5}-of-\d{5}$")


def resolve_prefix(path: str) -> str:
    """Accept the ``.index`` file, a data shard, the prefix, the folder or its state file."""
    path = str(path)
    if path.endswith(".index"):
        return path[: -len(".index")]
    if _DATA_RE.search(path):
        return _DATA_RE.sub("", path)
    if os.path.isdir(path) or os.path.basename(path) == "checkpoint":
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        prefix = newest_prefix(folder)
        if prefix is None:
            raise CheckpointError(path, "no model_checkpoint_path in the checkpoint state file",
                                  "incomplete", True)
        return prefix
    return path


def looks_like(path: str) -> bool:
    """Detection: an ``.index`` file whose last 8 bytes are the SSTable magic."""
    if not str(path).endswith(".index"):
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() < 48:
                return False
            fh.seek(-48, os.SEEK_END)
            return has_magic(fh.read(48))
    except OSError:
        return False


# -- object graph ---------------------------------------------------------------

@dataclass
class Node:
    children: list[tuple[int, str]]
    attributes: list[tuple[str, str, str]]  # (name, full_name, checkpoint_key)
    slots: list[tuple[int, str, int]]  # (original variable, slot name, slot variable)


def parse_object_graph(raw: bytes, where: str) -> list[Node]:
    """Decode a TrackableObjectGraph (trackable_object_graph.proto)."""
    nodes = []
    for nf in pw.get_messages(pw.parse(raw, where), 1, where):
        children = [(pw.get_int(c, 1, where=where), pw.get_str(c, 2, where))
                    for c in pw.get_messages(nf, 1, where)]
        attrs = [(pw.get_str(a, 1, where), pw.get_str(a, 2, where), pw.get_str(a, 3, where))
                 for a in pw.get_messages(nf, 2, where)]
        slots = [(pw.get_int(s, 1, where=where), pw.get_str(s, 2, where),
                  pw.get_int(s, 3, where=where)) for s in pw.get_messages(nf, 3, where)]
        nodes.append(Node(children, attrs, slots))
    refs = [c for n in nodes for c, _ in n.children]
    refs += [i for n in nodes for o, _, s in n.slots for i in (o, s)]
    if not nodes or any(r >= len(nodes) for r in refs):
        raise CheckpointError(where, "object graph references a node that does not exist")
    return nodes


def decode_string_scalar(raw: bytes, entry_crc: int | None, where: str) -> bytes:
    """``[varint64 len][masked crc32c of len as u32/u64][bytes]`` (WriteStringTensor)."""
    n, pos = pw.read_varint(raw, 0, where)
    if pos + 4 + n != len(raw):
        raise CheckpointError(where, "object graph string tensor has an inconsistent length")
    length = struct.pack("<I", n) if n <= 0xFFFFFFFF else struct.pack("<Q", n)
    (stored,) = struct.unpack_from("<I", raw, pos)
    if mask_crc(crc32c(length)) != stored or (
            entry_crc is not None and mask_crc(crc32c(raw[pos:], crc32c(length))) != entry_crc):
        raise CheckpointError(where, "object graph checksum mismatch")
    return raw[pos + 4:]


def _is_optimizer(node: Node, edge: str) -> bool:
    return ("optimizer" in edge.lower() or bool(node.slots)
            or any(name in _OPTIMIZER_CHILDREN for _, name in node.children))


def _paths(nodes: list[Node], avoid_optimizers: bool) -> dict[int, tuple[str, ...]]:
    """Breadth-first (shortest, as TF's own key assignment) path to each node."""
    paths: dict[int, tuple[str, ...]] = {0: ()}
    queue = deque([0])
    while queue:
        nid = queue.popleft()
        for child, edge in nodes[nid].children:
            if child in paths or (avoid_optimizers and _is_optimizer(nodes[child], edge)):
                continue
            paths[child] = (*paths[nid], edge)
            queue.append(child)
    return paths


def unescape_key(key: str) -> str:
    """Readable path from a checkpoint key (local names escape ``.``→``..``, ``/``→``.S``)."""
    if key.endswith(VALUE_SUFFIX):
        key = key[: -len(VALUE_SUFFIX)]
    out = []
    i = 0
    while i < len(key):
        if key[i] == "." and i + 1 < len(key) and key[i + 1] in ".S":
            out.append("." if key[i + 1] == "." else "/")
            i += 2
        else:
            out.append(key[i])
            i += 1
    return "".join(out)


@dataclass
class Naming:
    candidates: dict[str, list[str]]  # checkpoint key -> preferred names, best first
    auxiliary: set[str]  # checkpoint keys
    role: dict[str, str]  # checkpoint key -> "step" | "save_counter" | "iterations"


def name_from_graph(nodes: list[Node], keys: list[str]) -> Naming:
    model = _paths(nodes, avoid_optimizers=True)
    every = _paths(nodes, avoid_optimizers=False)
    slot_nodes = {s for n in nodes for _, _, s in n.slots}
    naming = Naming({}, set(), {})
    for nid, node in enumerate(nodes):
        for attr, full_name, key in node.attributes:
            path = model.get(nid) or every.get(nid)
            cands = []
            full = full_name[:-2] if full_name.endswith(":0") else full_name
            if "/" in full:
                cands.append(full)
            if path:
                cands.append("/".join(path) if attr == "VARIABLE_VALUE"
                             else "/".join((*path, attr)))
            naming.candidates[key] = cands
            last = path[-1] if path else ""
            if nid not in model or nid in slot_nodes:
                naming.auxiliary.add(key)
                if last in _ITER_NAMES:
                    naming.role[key] = "iterations"
            elif last in _STEP_NAMES or full in _STEP_NAMES:
                naming.role[key] = "step"
                naming.auxiliary.add(key)
            elif last == "save_counter":
                naming.role[key] = "save_counter"
                naming.auxiliary.add(key)
    for key in keys:
        if key not in naming.candidates:  # not described by the graph
            naming.candidates[key] = []
            if ".OPTIMIZER_SLOT" in key or key.startswith("optimizer/"):
                naming.auxiliary.add(key)
    return naming


def name_tf1(keys: list[str]) -> Naming:
    """TF1/slim: keys are already ``scope/layer/var``; slots are ``<var>/<Slot>``."""
    keyset = set(keys)
    naming = Naming({k: [] for k in keys}, set(), {})
    for key in keys:
        parent, _, last = key.rpartition("/")
        if parent in keyset or last in _TF1_OPTIMIZER_SCALARS:
            naming.auxiliary.add(key)
        elif last in _STEP_NAMES:
            naming.role[key] = "step"
            naming.auxiliary.add(key)
    return naming


# -- reader ---------------------------------------------------------------------

class TFBundleReader(Reader):
    """Reads one bundle; ``path`` may be the ``.index``, the prefix, or the state file."""

    format = "tf_bundle"
    big_endian = False

    def __init__(self, path: str):
        prefix = resolve_prefix(path)
        super().__init__(prefix + ".index")
        self.prefix = prefix
        self.meta.framework = "tf"
        self._shards: list[RangeFile] = []
        self._entries: dict[str, Entry] = {}
        self.checkpoint_keys: dict[str, str] = {}  # tensor name -> checkpoint key
        try:
            self._open()
        except Exception:
            self.close()
            raise

    def _open(self) -> None:
        if not os.path.exists(self.path):
            found = os.path.exists(data_filename(self.prefix, 0, 1)) or os.path.isdir(
                self.prefix + "_temp")
            raise self.error("index file does not exist" + (
                " yet (data written, index not)" if found else ""),
                "incomplete" if found else "io", retryable=found)
        bundle = load_index(self.prefix)
        shard_sizes(bundle)  # names a missing shard before any open() fails
        self._shards = [RangeFile(data_filename(self.prefix, i, bundle.num_shards))
                        for i in range(bundle.num_shards)]
        check_extents(bundle, [f.size for f in self._shards])
        self.big_endian = bundle.big_endian
        if bundle.slice_keys:
            self.meta.notes.append(f"{bundle.slice_keys} slices of partitioned variables")
        numeric: list[Entry] = []
        skipped: list[str] = []
        graph: list[Node] | None = None
        for key, e in bundle.entries.items():
            if key == OBJECT_GRAPH_KEY and e.dtype == DT_STRING and not e.sliced:
                graph = self._object_graph(e)
            elif e.sliced:
                self.meta.notes.append(f"skipped partitioned variable {key!r} "
                                       f"(sliced tensors are not supported)")
            elif e.dtype in _DTYPES:
                expected = math.prod(e.shape) * dtypes.itemsize(_DTYPES[e.dtype])
                if e.size != expected:
                    raise self.error(f"tensor {key!r}: {e.size} bytes stored, shape "
                                     f"{list(e.shape)} of {_DTYPES[e.dtype]} needs {expected}")
                numeric.append(e)
            else:
                skipped.append(key)
        if skipped:
            self.meta.notes.append(f"skipped {len(skipped)} non-numeric tensors, e.g. "
                                   f"{skipped[0]!r}")
        keys = [e.key for e in numeric]
        naming = name_from_graph(graph, keys) if graph is not None else name_tf1(keys)
        self._assign_names(numeric, naming)
        self.meta.step = self._step(naming)

    def _object_graph(self, e: Entry) -> list[Node]:
        if e.size > MAX_GRAPH_BYTES:
            raise self.error(f"object graph of {e.size} bytes is implausibly large",
                             "too_large")
        raw = self._shards[e.shard].read(e.offset, e.size)
        return parse_object_graph(decode_string_scalar(raw, e.crc, self.path), self.path)

    def _assign_names(self, numeric: list[Entry], naming: Naming) -> None:
        taken: set[str] = set()
        aux = set()
        # model weights pick first so they keep their layer names on any collision
        for e in sorted(numeric, key=lambda e: (e.key in naming.auxiliary, e.key)):
            options = [*naming.candidates.get(e.key, []), unescape_key(e.key), e.key]
            name = next((n for n in options if n not in taken), "")
            suffix = 2
            while not name:
                name = f"{e.key}#{suffix}" if f"{e.key}#{suffix}" not in taken else ""
                suffix += 1
            taken.add(name)
            self._infos[name] = TensorInfo(name, e.shape, _DTYPES[e.dtype])
            self._entries[name] = e
            self.checkpoint_keys[name] = e.key
            if e.key in naming.auxiliary:
                aux.add(name)
        self.meta.auxiliary = frozenset(aux)

    def _scalar(self, key: str) -> int | None:
        for name, k in self.checkpoint_keys.items():
            info = self._infos[name]
            if k == key and info.size == 1 and not dtypes.is_float(info.dtype):
                return int(self.read(name)[0])
        return None

    def _step(self, naming: Naming) -> int | None:
        """Training step: a step variable, else save_counter, else ``ckpt-N``, else
        the optimizer's iteration count."""
        by_role: dict[str, int] = {}
        for key, role in sorted(naming.role.items()):
            value = self._scalar(key)
            if value is not None:
                by_role.setdefault(role, value)
        m = re.search(r"-(\d+)$", os.path.basename(self.prefix))
        for role in ("step", "save_counter", "prefix", "iterations"):
            value = int(m.group(1)) if role == "prefix" and m else by_role.get(role)
            if value is not None:
                return value
        return None

    def _read_flat(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        e = self._entries[info.name]
        size = dtypes.itemsize(info.dtype)
        raw = self._shards[e.shard].read(e.offset + start * size, (stop - start) * size)
        return dtypes.decode(raw, info.dtype, self.big_endian)

    def close(self) -> None:
        for f in self._shards:
            f.close()
