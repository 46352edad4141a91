"""PyTorch checkpoints in the zip format (``torch.save`` since 1.6).

Layout: ``<root>/data.pkl`` (the object graph), ``<root>/byteorder``, and one
uncompressed record ``<root>/data/<key>`` per storage. The pickle is read with
:mod:`.torch_pickle` (no code from the file ever runs); each tensor becomes a
lazy strided view onto its storage record, located through the record's local
zip header, so reading one BatchNorm vector reads a few hundred bytes whatever
the file size.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bnexporter.formats import dtypes, torch_layout, torch_pickle, zipmember
from bnexporter.formats.base import RangeFile, RawExtent, Reader, TensorInfo
from bnexporter.formats.spec import Format, Probe
from bnexporter.formats.torch_pickle import Refused, StorageRef, TensorRef

# Tensors may alias one storage (tied weights) or view it with stride 0, so their
# declared sizes can exceed the file. Real checkpoints stay within a few times the
# file; a pickle naming one storage 20 000 times, or a 2**62-element stride-0 view,
# would make every scan read terabytes.
MAX_AMPLIFICATION = 8
AMPLIFICATION_SLACK = 256 << 20
# elements whose storage offsets are computed at once when gathering a strided view
_GATHER_BLOCK = 1 << 18
# a strided block is read in one piece when its span is at most this many elements
# or 4x what it needs; otherwise as runs split at gaps wider than _GAP elements
_SPAN_FLOOR = 1 << 18
_GAP = 1 << 14


def looks_like_members(names: Iterable[str]) -> str | None:
    """``torch`` / ``torchscript`` for a zip's member names (in directory order), else None."""
    names = list(names)
    if not names or "/" not in names[0]:
        return None
    root = names[0].split("/", 1)[0]
    members = set(names)
    if f"{root}/constants.pkl" in members or f"{root}/code/" in members:
        return "torchscript"
    if f"{root}/data.pkl" in members:
        return "torch"
    return None


class TorchReaderBase(Reader):
    """Shared by the zip and legacy readers: tensors as strided views of storages.

    Subclasses provide :meth:`_storage_bytes` (checked when the file is opened)
    and :meth:`_storage_offset` (resolved on first read: in a zip it costs a
    local-header read), and call :meth:`_setup` with the unpickled root object.
    """

    big_endian = False

    def __init__(self, path: str):
        super().__init__(path)
        self._file: RangeFile | None = None
        self._refs: dict[str, TensorRef] = {}
        self._offsets: dict[tuple[str, object], int] = {}

    # -- for subclasses -------------------------------------------------------
    def _storage_bytes(self, storage: StorageRef) -> int:
        """Bytes the file holds for ``storage`` (after checking the record)."""
        raise NotImplementedError

    def _storage_offset(self, storage: StorageRef) -> int:
        """File offset of the storage's first byte."""
        raise NotImplementedError

    def _setup(self, root: object) -> None:
        try:
            layout = torch_layout.interpret(root)
        except Refused as exc:
            raise self.error(exc.cause, exc.reason) from None
        self._setup_layout(layout)

    def _setup_layout(self, layout: torch_layout.Layout) -> None:
        skipped: dict[str, int] = {}
        aux: set[str] = set()
        assert self._file is not None
        budget = MAX_AMPLIFICATION * self._file.size + AMPLIFICATION_SLACK
        declared = 0
        for name, ref in layout.tensors.items():
            if not dtypes.is_supported(ref.dtype):
                skipped[ref.dtype] = skipped.get(ref.dtype, 0) + 1
                continue
            declared += ref.numel * dtypes.itemsize(ref.dtype)
            if declared > budget:
                raise self.error(
                    f"tensors declare more than {budget} bytes in a {self._file.size}-byte "
                    f"file (at {name!r}): refusing aliased or stride-0 amplification",
                    "too_large")
            self._check_bounds(name, ref)
            self._refs[name] = ref
            self._infos[name] = TensorInfo(name, ref.size, ref.dtype)
            if name in layout.auxiliary:
                aux.add(name)
        for dt, count in sorted(skipped.items()):
            self.meta.notes.append(f"skipped {count} tensor(s) of unsupported dtype {dt}")
        self.meta.notes.extend(layout.notes)
        self.meta.framework = "torch"
        self.meta.auxiliary = frozenset(aux)
        self.meta.bn_eps = dict(layout.bn_eps)
        self.meta.notes.append(f"weights from {layout.source}")
        self.meta.step = self._resolve_step(layout)

    # -- internals -----------------------------------------------------------
    def _check_bounds(self, name: str, ref: TensorRef) -> None:
        size = dtypes.itemsize(ref.dtype)
        if ref.numel == 0:
            return
        last = ref.offset + sum((d - 1) * s for d, s in zip(ref.size, ref.stride))
        avail = self._storage_bytes(ref.storage)
        if (last + 1) * size > avail:
            raise self.error(
                f"tensor {name!r} ({ref.dtype}{list(ref.size)}, offset {ref.offset}, stride "
                f"{list(ref.stride)}) reaches byte {(last + 1) * size} of storage "
                f"{ref.storage.key}, which has {avail}")

    def _offset(self, storage: StorageRef) -> int:
        key = (storage.key, storage.view)
        offset = self._offsets.get(key)
        if offset is None:
            offset = self._offsets[key] = self._storage_offset(storage)
        return offset

    def _resolve_step(self, layout: torch_layout.Layout) -> int | None:
        step = layout.step
        if isinstance(step, TensorRef):
            if not dtypes.is_supported(step.dtype):
                return None
            name = "\0step"
            self._check_bounds(name, step)
            self._refs[name] = step
            value = self._read_flat(TensorInfo(name, step.size, step.dtype), 0, 1)
            del self._refs[name]
            step = int(value[0]) if np.isfinite(value[0]) and value[0] >= 0 else None
        if step is not None and layout.step_key == "epoch":
            self.meta.notes.append("step taken from the epoch counter")
        return step

    def _read_flat(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        assert self._file is not None
        ref = self._refs[info.name]
        size = dtypes.itemsize(ref.dtype)
        base = self._offset(ref.storage)
        if ref.contiguous:
            raw = self._file.read(base + (ref.offset + start) * size, (stop - start) * size)
            return dtypes.decode(raw, ref.dtype, self.big_endian)
        parts = [self._gather(ref, base, a, min(stop, a + _GATHER_BLOCK))
                 for a in range(start, stop, _GATHER_BLOCK)]
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return dtypes.decode(rows.tobytes(), ref.dtype, self.big_endian)

    def raw_extent(self, name: str) -> RawExtent | None:
        ref = self._refs.get(self.info(name).name)
        if ref is None or not ref.contiguous or self._file is None:
            return None
        size = dtypes.itemsize(ref.dtype)
        return RawExtent(self._file, self._offset(ref.storage) + ref.offset * size,
                         self.big_endian)

    def _gather(self, ref: TensorRef, base: int, start: int, stop: int) -> np.ndarray:
        """Raw items (rows of bytes) of flat elements ``[start, stop)`` of a strided view,
        reading the span they cover, or only the runs they use when it is sparse."""
        assert self._file is not None
        size = dtypes.itemsize(ref.dtype)
        offs = _element_offsets(ref, start, stop)
        lo, hi = int(offs.min()), int(offs.max())
        if hi - lo + 1 <= max(4 * (stop - start), _SPAN_FLOOR):
            span = self._file.read(base + lo * size, (hi - lo + 1) * size)
            return np.frombuffer(span, np.uint8).reshape(-1, size)[offs - lo]
        used = np.unique(offs)
        cuts = np.flatnonzero(np.diff(used) > _GAP) + 1
        firsts = used[np.r_[0, cuts]]
        lasts = used[np.r_[cuts - 1, used.size - 1]]
        chunks = [self._file.read(base + int(a) * size, (int(b) - int(a) + 1) * size)
                  for a, b in zip(firsts, lasts)]
        where = np.cumsum(np.r_[0, lasts[:-1] - firsts[:-1] + 1])
        run = np.searchsorted(firsts, offs, side="right") - 1
        rows = np.frombuffer(b"".join(chunks), np.uint8).reshape(-1, size)
        return rows[where[run] + offs - firsts[run]]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _element_offsets(ref: TensorRef, start: int, stop: int) -> np.ndarray:
    rem = np.arange(start, stop, dtype=np.int64)
    out = np.full(stop - start, ref.offset, dtype=np.int64)
    for d, s in zip(reversed(ref.size), reversed(ref.stride)):
        if d > 1:
            out += (rem % d) * s
            rem //= d
    return out


_TITLES = {"torch": "torch.save", "torchscript": "TorchScript"}


class TorchZipReader(TorchReaderBase):
    format = "torch"
    # which archives this class reads (see :func:`looks_like_members`)
    kind = "torch"

    def __init__(self, path: str):
        super().__init__(path)
        self._file = RangeFile(path)
        self._parse_or_close()

    def _parse(self) -> None:
        f = self._file
        assert f is not None
        self._entries = zipmember.read_directory(f)
        kind = looks_like_members(self._entries)
        if kind is None:
            raise self.error("zip archive has no <root>/data.pkl: not a torch checkpoint",
                             "unsupported")
        if kind != self.kind:
            raise self.error(f"{_TITLES[kind]} archive, not a {_TITLES[self.kind]} one "
                             "(formats.open_reader picks the right reader)", "unsupported")
        self._root = next(iter(self._entries)).split("/", 1)[0]
        order = self._entries.get(f"{self._root}/byteorder")
        if order is not None:
            text = zipmember.read_member(f, order, 16)
            if text not in (b"little", b"big"):
                raise self.error(f"unknown byteorder record {text[:16]!r}")
            self.big_endian = text == b"big"
        data = zipmember.read_member(f, self._member("data.pkl"),
                                     torch_pickle.MAX_PICKLE_BYTES)
        try:
            root = torch_pickle.load(data, torchscript=self.kind == "torchscript")
        except Refused as exc:
            raise self.error(f"data.pkl: {exc.cause}", exc.reason) from None
        self._setup(root)

    def _member(self, name: str) -> zipmember.ZipEntry:
        entry = self._entries.get(f"{self._root}/{name}")
        if entry is None:
            raise self.error(f"torch archive has no {self._root}/{name} record")
        return entry

    def _storage_entry(self, storage: StorageRef) -> zipmember.ZipEntry:
        return self._member(f"data/{storage.key}")

    def _storage_offset(self, storage: StorageRef) -> int:
        assert self._file is not None
        return zipmember.data_offset(self._file, self._storage_entry(storage))

    def _storage_bytes(self, storage: StorageRef) -> int:
        entry = self._storage_entry(storage)
        if entry.compress_type != zipmember.STORED:
            raise self.error(f"storage record data/{storage.key} is compressed; torch "
                             "writes them stored", "unsupported")
        need = storage.nbytes
        if need is None:
            raise self.error(f"storage {storage.key} has an unknown element type",
                             "unsupported")
        if entry.size < need:
            raise self.error(f"storage record data/{storage.key} has {entry.size} bytes, "
                             f"the pickle says {need}")
        return need


TORCH_PATTERNS = ("*.pt", "*.pth", "*.ckpt", "*.bin")


def _sniff(probe: Probe) -> bool:
    return probe.is_zip and looks_like_members(probe.members()) == "torch"


FORMAT = Format("torch", zipmember.looks_like, _sniff, TorchZipReader, zipmember.incomplete,
                TORCH_PATTERNS)
