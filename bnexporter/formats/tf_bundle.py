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
Partitioned (sliced) tensors, from TF1 partitioners or TF2's
``MaxShardSizePolicy`` (which cuts any tensor, BN vectors included, at shard
boundaries), are reassembled from their parts.
"""

from __future__ import annotations

import codecs
import itertools
import math
import os
import re
import struct
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from bnexporter.errors import CheckpointError
from bnexporter.formats import dtypes
from bnexporter.formats import protowire as pw
from bnexporter.formats.base import RangeFile, RawExtent, Reader, TensorInfo, read_head
from bnexporter.formats.spec import Format, Incomplete
from bnexporter.formats.sstable import crc32c, has_magic, mask_crc, read_table

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
MAX_INDEX_BYTES = 512 << 20
MAX_GRAPH_BYTES = 256 << 20
# the graph's own CRC is checked up to this size: pure-Python CRC32C runs ~10 MB/s
MAX_GRAPH_CRC_BYTES = 8 << 20
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
# Keras 3 / new tf_keras optimizers, and legacy OptimizerV2 ("iter")
_OPTIMIZER_CHILDREN = frozenset({"_iterations", "iter"})
_TF1_OPTIMIZER_SCALARS = frozenset({"beta1_power", "beta2_power"})


def data_filename(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


Extents = tuple[tuple[int, int], ...]  # (start, length) per dimension


@dataclass(frozen=True)
class Entry:
    key: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int | None
    slices: tuple[Extents, ...]  # set on the entry of a partitioned tensor; length -1 = all


@dataclass(frozen=True)
class Slice:
    extents: Extents  # resolved: lengths are real
    entry: Entry  # where this part's bytes are


@dataclass
class Bundle:
    prefix: str
    num_shards: int
    big_endian: bool
    entries: dict[str, Entry]
    slices: dict[str, list[Slice]]  # parts of partitioned tensors, by tensor key

    def data_entries(self) -> list[Entry]:
        whole = [e for e in self.entries.values() if not e.slices]
        return whole + [s.entry for parts in self.slices.values() for s in parts]


# -- index --------------------------------------------------------------------

def _extents(msg: pw.Fields, where: str) -> Extents:
    """A TensorSliceProto; an extent without a length spans the whole dimension."""
    return tuple((pw.get_int(x, 1, where=where, signed=True),
                  pw.get_int(x, 2, -1, where=where, signed=True) if x.get(2) else -1)
                 for x in pw.get_messages(msg, 1, where))


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
    slices = tuple(_extents(m, where) for m in pw.get_messages(f, 7, where))
    return Entry(key, pw.get_int(f, 1, where=where), tuple(dims), pw.get_int(f, 3, where=where),
                 offset, size, crc if isinstance(crc, int) else None, slices)


def _ordered_signed(key: bytes, pos: int, where: str) -> tuple[int, int]:
    """One OrderedCode::WriteSignedNumIncreasing value: the count of leading header
    bits (ones for >= 0, zeros for < 0) is the byte length; the rest is big-endian
    two's complement."""
    if pos >= len(key):
        raise CheckpointError(where, "partitioned-tensor key ends early")
    negative = not key[pos] & 0x80
    length = 0
    for byte in key[pos:pos + 2]:
        bits = (byte ^ 0xFF if negative else byte) ^ 0xFF  # header ones -> leading zeros
        lead = 8 - bits.bit_length()
        length += lead
        if lead < 8:
            break
    if not 1 <= length <= 10 or pos + length > len(key):
        raise CheckpointError(where, "partitioned-tensor key has a bad number encoding")
    value = int.from_bytes(key[pos:pos + length], "big")
    nbits = 8 * length
    value ^= ((1 << length) - 1) << (nbits - length)  # strip the header
    if negative:
        value -= 1 << nbits
    return value, pos + length


def parse_slice_key(key: bytes, where: str) -> tuple[str, Extents]:
    """Decode EncodeTensorNameSlice: ``\\x00``, name, ``\\x00\\x01``, ndims, start/length
    pairs. Tensor names hold no NUL and (being UTF-8) no 0xff, so nothing is escaped."""
    end = key.find(b"\x00\x01", 1)
    if key[:1] != b"\x00" or end < 0 or end + 3 > len(key):
        raise CheckpointError(where, "malformed partitioned-tensor key")
    try:
        name = key[1:end].decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(where, "partitioned-tensor key is not UTF-8") from None
    pos = end + 2
    nlen = key[pos]
    if nlen > 2 or pos + 1 + nlen > len(key):
        raise CheckpointError(where, "partitioned-tensor key has a bad rank")
    ndims = int.from_bytes(key[pos + 1:pos + 1 + nlen], "big")
    pos += 1 + nlen
    extents = []
    for _ in range(ndims):
        start, pos = _ordered_signed(key, pos, where)
        length, pos = _ordered_signed(key, pos, where)
        extents.append((start, length))
    if pos != len(key):
        raise CheckpointError(where, "partitioned-tensor key has trailing bytes")
    return name, tuple(extents)


def _resolve(extents: Extents, shape: tuple[int, ...], key: str, where: str) -> Extents:
    if len(extents) != len(shape):
        raise CheckpointError(where, f"tensor {key!r}: slice rank differs from its shape")
    out = []
    for (start, length), dim in zip(extents, shape):
        length = dim - start if length == -1 else length
        if start < 0 or length < 0 or start + length > dim:
            raise CheckpointError(where, f"tensor {key!r}: slice lies outside shape {shape}")
        out.append((start, length))
    return tuple(out)


def _match_slices(full: Entry, parts: list[tuple[Extents, Entry]], where: str) -> list[Slice]:
    """Pair the tensor's declared slices with the data entries that hold them."""
    if not full.shape:
        raise CheckpointError(where, f"scalar tensor {full.key!r} cannot be partitioned")
    by_extents = {_resolve(x, full.shape, full.key, where): e for x, e in parts}
    if len(by_extents) != len(parts) or len(parts) != len(full.slices):
        raise CheckpointError(where, f"tensor {full.key!r}: {len(full.slices)} slices declared, "
                                     f"{len(parts)} stored")
    out = []
    for extents in full.slices:
        resolved = _resolve(extents, full.shape, full.key, where)
        part = by_extents.get(resolved)
        lengths = tuple(n for _, n in resolved)
        if part is None or part.dtype != full.dtype or part.shape != lengths:
            raise CheckpointError(where, f"tensor {full.key!r}: slice {resolved} has no "
                                         f"matching data entry")
        out.append(Slice(resolved, part))
    if sum(math.prod(s.entry.shape) for s in out) != math.prod(full.shape):
        raise CheckpointError(where, f"tensor {full.key!r}: slices do not tile its shape")
    return out


def load_index(prefix: str) -> Bundle:
    """Parse ``prefix.index``: header, one entry per tensor, parts of partitioned ones."""
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
    parts: dict[str, list[tuple[Extents, Entry]]] = {}
    for raw_key, value in table[1:]:
        if raw_key[:1] == b"\x00":
            name, extents = parse_slice_key(raw_key, where)
            entry = parse_entry(value, name, where)
            parts.setdefault(name, []).append((extents, entry))
        else:
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(where, f"tensor key {raw_key[:40]!r} is not UTF-8") from None
            entry = parse_entry(value, key, where)
            entries[key] = entry
        if not entry.slices and entry.shard >= num_shards:
            raise CheckpointError(where, f"tensor {entry.key!r} is in shard {entry.shard} of "
                                         f"{num_shards}")
    slices = {}
    for key, entry in entries.items():
        if entry.slices:
            slices[key] = _match_slices(entry, parts.pop(key, []), where)
    if parts:
        raise CheckpointError(where, f"slices of {next(iter(parts))!r} without a tensor entry")
    return Bundle(prefix, num_shards, endianness == 1, entries, slices)


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
    for e in bundle.data_entries():
        if e.offset + e.size > sizes[e.shard]:
            name = os.path.basename(data_filename(bundle.prefix, e.shard, bundle.num_shards))
            raise CheckpointError(bundle.prefix + ".index",
                                  f"tensor {e.key!r} at bytes {e.offset}+{e.size} lies past the "
                                  f"end of {name} ({sizes[e.shard]} bytes)", "truncated", True)


def check_overlap(bundle: Bundle) -> None:
    """Refuse entries whose byte ranges overlap: TF writes each tensor once, and
    thousands of entries naming one range would multiply the scan (B12)."""
    spans = sorted((e.shard, e.offset, e.offset + e.size, e.key)
                   for e in bundle.data_entries() if e.size > 0)
    for (shard, _, end, key), (shard2, begin2, _, key2) in itertools.pairwise(spans):
        if shard == shard2 and begin2 < end:
            raise CheckpointError(bundle.prefix + ".index",
                                  f"tensors {key!r} and {key2!r} share bytes of shard {shard}: "
                                  "aliased entries are refused")


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
        head = read_head(os.path.join(folder, "checkpoint"), 1 << 20)
    except CheckpointError as exc:
        if exc.reason == "io":  # no state file (yet)
            return None
        raise  # a FIFO or a device: refused, never waited on
    text = head.decode("utf-8", "surrogateescape")
    m = _STATE_RE.search(text)
    if not m:
        return None
    try:
        raw = m.group(1).encode("utf-8", "surrogateescape")
        value = codecs.escape_decode(raw)[0].decode("utf-8", "surrogateescape")
    except (ValueError, UnicodeError):
        return None
    if not os.path.isabs(value):
        # an empty prefix is TF's own for CheckpointManager(directory, checkpoint_name=""):
        # files named ".index", ".data-00000-of-00001"
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
    saved = os.path.join(path, "variables", "variables")
    if os.path.isdir(path) and os.path.isfile(saved + ".index"):
        return saved  # a SavedModel folder: its variables bundle
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
    if entry_crc is not None and len(raw) > MAX_GRAPH_CRC_BYTES:
        entry_crc = None
    if mask_crc(crc32c(length)) != stored or (
            entry_crc is not None and mask_crc(crc32c(raw[pos:], crc32c(length))) != entry_crc):
        raise CheckpointError(where, "object graph checksum mismatch")
    return raw[pos + 4:]


def _is_optimizer(node: Node, edge: str) -> bool:
    return ("optimizer" in edge.lower() or bool(node.slots)
            or any(name in _OPTIMIZER_CHILDREN for _, name in node.children))


# deeper object graphs are not models (Keras nests a few dozen levels at most)
MAX_GRAPH_DEPTH = 256


def _paths(nodes: list[Node], avoid_optimizers: bool) -> dict[int, tuple[int, str, int]]:
    """Breadth-first (shortest, as TF's own key assignment) route to each node, as
    ``node -> (parent, edge, depth)`` links: copying whole path tuples per node would
    cost O(n^2) on a long chain. Nodes deeper than MAX_GRAPH_DEPTH are not reached."""
    links: dict[int, tuple[int, str, int]] = {0: (-1, "", 0)}
    queue = deque([0])
    while queue:
        nid = queue.popleft()
        depth = links[nid][2] + 1
        if depth > MAX_GRAPH_DEPTH:
            continue
        for child, edge in nodes[nid].children:
            if child in links or (avoid_optimizers and _is_optimizer(nodes[child], edge)):
                continue
            links[child] = (nid, edge, depth)
            queue.append(child)
    return links


def _path_of(links: dict[int, tuple[int, str, int]], nid: int) -> tuple[str, ...] | None:
    """The edge names from the root to ``nid`` (None when unreachable)."""
    if nid not in links:
        return None
    out: list[str] = []
    parent, edge, _ = links[nid]
    while parent >= 0:
        out.append(edge)
        parent, edge, _ = links[parent]
    return tuple(reversed(out))


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
    """Readable names and roles for TF2 keys.

    A variable belongs to the model when some path from the root reaches it
    without entering an optimizer; everything else (moments, slots, iteration
    counts) is auxiliary even when, as in Keras 3, the model's own variables
    are keyed under ``optimizer/_trainable_variables``.
    """
    model = _paths(nodes, avoid_optimizers=True)
    every = _paths(nodes, avoid_optimizers=False)
    slot_nodes = {s for n in nodes for _, _, s in n.slots}
    naming = Naming({}, set(), {})
    for nid, node in enumerate(nodes):
        for attr, full_name, key in node.attributes:
            path = _path_of(model, nid) or _path_of(every, nid)
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


def _natural(key: str) -> list[str | int]:
    """Sort key putting ``layer_with_weights-10`` after ``-9`` (model order, roughly)."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", key))]


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
        self._slices: dict[str, list[Slice]] = {}
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
        for i in range(bundle.num_shards):
            shard = data_filename(self.prefix, i, bundle.num_shards)
            try:
                self._shards.append(RangeFile(shard))
            except CheckpointError as exc:  # name the bundle, as every other error does
                raise self.error(f"data shard {os.path.basename(shard)}: {exc.cause}",
                                 exc.reason, exc.retryable) from None
        check_extents(bundle, [f.size for f in self._shards])
        check_overlap(bundle)
        self.big_endian = bundle.big_endian
        self._slices = bundle.slices
        numeric: list[Entry] = []
        skipped: list[str] = []
        graph: list[Node] | None = None
        for key, e in bundle.entries.items():
            if key == OBJECT_GRAPH_KEY and e.dtype == DT_STRING and not e.slices:
                graph = self._object_graph(e)
            elif e.dtype in _DTYPES:
                itemsize = dtypes.itemsize(_DTYPES[e.dtype])
                parts = [p.entry for p in bundle.slices[key]] if e.slices else [e]
                for part in parts:
                    expected = math.prod(part.shape) * itemsize
                    if part.size != expected:
                        raise self.error(f"tensor {key!r}: {part.size} bytes stored, shape "
                                         f"{list(part.shape)} of {_DTYPES[e.dtype]} needs "
                                         f"{expected}")
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
        for e in sorted(numeric, key=lambda e: (e.key in naming.auxiliary, _natural(e.key))):
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
        if e.slices:
            return self._read_sliced(info, self._slices[e.key], start, stop)
        size = dtypes.itemsize(info.dtype)
        raw = self._shards[e.shard].read(e.offset + start * size, (stop - start) * size)
        return dtypes.decode(raw, info.dtype, self.big_endian)

    def raw_extent(self, name: str) -> RawExtent | None:
        e = self._entries[self.info(name).name]
        if e.slices:
            return None
        return RawExtent(self._shards[e.shard], e.offset, self.big_endian)

    def _read_sliced(self, info: TensorInfo, slices: list[Slice], start: int, stop: int
                     ) -> np.ndarray:
        """Flat elements ``[start, stop)`` of a partitioned tensor, from every slice
        overlapping them: memory stays at the chunk asked for, whatever the tensor shape."""
        parts = [(p.extents, p.entry.shard, p.entry.offset) for p in slices]
        return self._assemble(info.shape, parts, start, stop, info.dtype)

    def _assemble(self, shape: tuple[int, ...], parts: list[tuple[Extents, int, int]],
                  start: int, stop: int, dtype: str) -> np.ndarray:
        """Split ``[start, stop)`` into whole rows (along dim 0), assembled directly,
        and at most two partial rows, assembled by recursing into the row's sub-tensor."""
        row = math.prod(shape[1:])
        pieces = []
        pos = start
        while pos < stop:
            r, c0 = divmod(pos, row)
            if c0 == 0 and stop - pos >= row:
                n = (stop - pos) // row
                pieces.append(self._rows(shape, parts, r, r + n, dtype).reshape(-1))
                pos += n * row
            else:
                c1 = min(row, stop - r * row)
                pieces.append(self._assemble(shape[1:], self._row_parts(shape, parts, r, dtype),
                                             c0, c1, dtype))
                pos = r * row + c1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    @staticmethod
    def _row_parts(shape: tuple[int, ...], parts: list[tuple[Extents, int, int]], r: int,
                   dtype: str) -> list[tuple[Extents, int, int]]:
        """The parts covering row ``r`` of ``shape``, as parts of that row's sub-tensor."""
        out = []
        for extents, shard, offset in parts:
            (s0, n0), rest = extents[0], extents[1:]
            if s0 <= r < s0 + n0:
                prow = math.prod(n for _, n in rest)
                out.append((rest, shard, offset + (r - s0) * prow * dtypes.itemsize(dtype)))
        return out

    def _rows(self, shape: tuple[int, ...], parts: list[tuple[Extents, int, int]], r0: int,
              r1: int, dtype: str) -> np.ndarray:
        """Whole rows ``[r0, r1)`` of ``shape``."""
        size = dtypes.itemsize(dtype)
        for extents, shard, offset in parts:  # one part holds them all: no copy
            (s0, n0), rest = extents[0], extents[1:]
            if s0 <= r0 and r1 <= s0 + n0 and all(
                    s == 0 and n == d for (s, n), d in zip(rest, shape[1:], strict=True)):
                prow = math.prod(shape[1:])
                raw = self._shards[shard].read(offset + (r0 - s0) * prow * size,
                                               (r1 - r0) * prow * size)
                return dtypes.decode(raw, dtype, self.big_endian)
        out = np.zeros((r1 - r0, *shape[1:]), dtype=dtypes.decode(b"", dtype).dtype)
        for extents, shard, offset in parts:
            (s0, n0), rest = extents[0], extents[1:]
            a, b = max(s0, r0), min(s0 + n0, r1)
            if a >= b:
                continue
            pshape = tuple(n for _, n in rest)
            prow = math.prod(pshape)
            raw = self._shards[shard].read(offset + (a - s0) * prow * size, (b - a) * prow * size)
            block = dtypes.decode(raw, dtype, self.big_endian)
            index = (slice(a - r0, b - r0), *(slice(s, s + n) for s, n in rest))
            out[index] = block.reshape((b - a, *pshape))
        return out

    def close(self) -> None:
        for f in self._shards:
            f.close()


_SHARD = re.compile(r"\.data-\d{5}-of-\d{5}$")


def is_bundle_path(path: str) -> bool:
    """A TF checkpoint is a prefix, its ``.index``, a data shard or its folder."""
    if path.endswith(".index") or os.path.basename(path) == "checkpoint":
        return True
    if _SHARD.search(path):
        return True
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "checkpoint")) or os.path.isfile(
            os.path.join(path, "variables", "variables.index"))
    return not os.path.exists(path) and os.path.isfile(path + ".index")


def incomplete(path: str, fh: BinaryIO, head: bytes, size: int) -> Incomplete:
    if not path.endswith(".index") or bundle_complete(path[: -len(".index")]):
        return None
    return "incomplete", "TF bundle index or data shards are not complete yet"


FORMAT = Format("tf", lambda head: False, lambda p: is_bundle_path(p.path), TFBundleReader,
                incomplete, ("*.index",), by_path=is_bundle_path)
