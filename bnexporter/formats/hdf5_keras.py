"""Keras HDF5 weights: Keras 2 / tf.keras legacy ``.h5`` and Keras 3 ``.weights.h5``.

h5py is used only to walk the object tree and to learn where each dataset
lives; the bytes of contiguous, uncompressed datasets (what Keras writes) are
then read with explicit positional reads, so analysis never loads a file
whole. Anything else (chunked, compressed) falls back to h5py slicing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from bnexporter.errors import CheckpointError
from bnexporter.formats import dtypes
from bnexporter.formats.base import LazyModule, RangeFile, RawExtent, Reader, TensorInfo
from bnexporter.formats.spec import Format, Incomplete

if TYPE_CHECKING:
    import h5py
else:  # imported when an HDF5 file is opened (the daemon's forkserver preloads it)
    h5py = LazyModule("h5py", __name__, "h5py")

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# declared size may exceed stored size only by this factor (compression). Keras
# never compresses weights and float data deflates < 2x; 64x leaves room for
# zero-filled tensors without letting a 4 MB file make us inflate 4 GB.
_MAX_INFLATION = 64

# what h5py raises (besides OSError) for corrupt metadata met while walking the tree
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)

_H5_DTYPES = {
    "f8": "float64", "f4": "float32", "f2": "float16", "i8": "int64", "i4": "int32",
    "i2": "int16", "i1": "int8", "u8": "uint64", "u4": "uint32", "u2": "uint16", "u1": "uint8",
    "b1": "bool",
}


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _name_list(attrs: h5py.AttributeManager, key: str) -> list[str]:
    """A Keras name-list attribute, joined from ``key0..keyN`` when it was split."""
    if key in attrs:
        chunks = [attrs[key]]
    else:
        chunks = []
        while f"{key}{len(chunks)}" in attrs:
            chunks.append(attrs[f"{key}{len(chunks)}"])
    names: list[str] = []
    for chunk in chunks:
        arr = np.asarray(chunk)
        if arr.dtype.kind == "f":  # layers without weights store an empty float array
            continue
        names.extend(_text(v) for v in arr.ravel())
    return names


def _open_error(msg: str) -> tuple[str, str, bool]:
    """(cause, reason, retryable) for an error of ``h5py.File()``.

    Only a lock conflict means "being written"; a bad superblock is corruption,
    and retrying it would go on forever.
    """
    low = msg.lower()
    if "unable to lock file" in low or "resource temporarily unavailable" in low:
        return "HDF5 file is locked by its writer", "incomplete", True
    detail = msg.split("(", 1)[1].rstrip(")") if "(" in msg else msg
    detail = detail.strip() or "corrupt"
    if "truncated file" in low or "signature not found" in low:
        return f"not a readable HDF5 file ({detail})", "truncated", True
    return f"not a readable HDF5 file ({detail})", "corrupt", False


def _hard_link(gid: h5py.h5g.GroupID, name: str) -> bool:
    """True when ``name`` in the group is a hard link (not soft, not external)."""
    try:
        return gid.links.get_info(name.encode()).type == h5py.h5l.TYPE_HARD
    except _H5_ERRORS:
        return False


# libhdf5 can spin forever on some corrupt metadata while holding the GIL (B20 in
# docs/reliability.md): no Python-level timeout can interrupt it. So the metadata walk
# is first done in a forked child with a deadline; the parent walks only once the child
# has finished (same file, same library: it cannot spin then), and takes the child's
# answers for the contiguous datasets instead of opening them again (_Facts).
PROBE_SECONDS = 5.0
PROBE_SECONDS_PER_GB = 10.0


def _probe_metadata(path: str, fileobj: io.IOBase | None, base_offset: int,
                    member_size: int | None, direct_io: bool) -> dict[str, _Facts]:
    """Walk the metadata in a child first; return what it learnt of each contiguous
    dataset (the parent's own walk then asks libhdf5 only for the rest)."""
    if not hasattr(os, "fork") or threading.active_count() > 1:
        return {}  # forking a threaded process could copy a held HDF5 lock: skip the probe
    try:
        st = os.stat(path)
    except OSError:
        return {}  # the parent's own open reports it
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, base_offset, member_size)
    if key in _PROBED:
        return {}  # this very file walked cleanly before (a daemon re-reading it)
    size = member_size if member_size is not None else st.st_size
    limit = PROBE_SECONDS + PROBE_SECONDS_PER_GB * size / 2**30
    deadline = time.monotonic() + limit
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: walk everything the parent may touch, then leave at once
        os.close(rfd)
        try:
            _walk_and_report(path, fileobj, base_offset, member_size, direct_io, wfd)
        except BaseException:  # the parent repeats the walk and reports any error
            pass
        finally:
            os._exit(0)
    # the child's exit closes the pipe's write end: wake at once, not on a polling tick
    os.close(wfd)
    report: list[bytes] = []
    try:
        while True:
            left = deadline - time.monotonic()
            ready = select.select([rfd], [], [], max(left, 0.0))[0] if left > 0 else []
            if ready:
                got = os.read(rfd, 1 << 16)
                if not got:
                    break
                report.append(got)
                continue
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise CheckpointError(path, f"HDF5 metadata could not be read within "
                                      f"{limit:.0f} s: libhdf5 hangs on this file (corrupt "
                                      "metadata?)", "corrupt")
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise CheckpointError(path, f"libhdf5 crashed reading the metadata (signal "
                              f"{os.WTERMSIG(status)})", "corrupt")
    _PROBED.add(key)
    return _Facts.load(b"".join(report))


def _walk_and_report(path: str, fileobj: io.IOBase | None, base_offset: int,
                     member_size: int | None, direct_io: bool, fd: int) -> None:
    """In the child: open every dataset (past a failing one: the parent may still
    touch the others), then write the facts of the contiguous ones to ``fd``."""
    reader = KerasH5Reader(path, fileobj, base_offset, member_size, direct_io, probe=False,
                           record=True)
    try:
        record = reader._record if reader._record is not None else {}
        for name in list(reader.names()):
            try:
                reader.info(name)
            except (CheckpointError, KeyError):
                continue
    finally:
        reader.close()
    data = _Facts.dump(record)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass(frozen=True)
class _Facts:
    """What libhdf5 said about one contiguous, numeric dataset: enough for the parent
    to register it without opening it (the child opened it cleanly, with a deadline).
    Only the answers are carried over; every check on them runs in the parent."""

    where: str
    dtype: str
    shape: tuple[int, ...]
    addr: int
    offset: int
    bf16: bool
    big: bool

    @staticmethod
    def dump(facts: dict[str, _Facts]) -> bytes:
        return json.dumps({k: [f.where, f.dtype, list(f.shape), f.addr, f.offset, f.bf16,
                               f.big] for k, f in facts.items()}).encode()

    @staticmethod
    def load(data: bytes) -> dict[str, _Facts]:
        """The child's report; anything malformed is dropped (the parent asks libhdf5)."""
        try:
            raw = json.loads(data) if data else {}
            return {str(k): _Facts(str(v[0]), str(v[1]), tuple(int(d) for d in v[2]),
                                   int(v[3]), int(v[4]), bool(v[5]), bool(v[6]))
                    for k, v in raw.items()}
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            return {}


_PROBED: set[tuple[int, int, int, int, int, int | None]] = set()


def _strip_suffix(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name


def _scoped(layer: str, name: str) -> str:
    """``bn1_1/gamma`` in group ``bn1`` -> ``bn1/gamma``: TF name scopes add ``_N``
    to a layer's weights when a model is built twice in one process (Keras <= 2.2
    files); the group is the layer."""
    head, sep, rest = name.partition("/")
    if sep and head != layer and re.fullmatch(re.escape(layer) + r"_\d+", head):
        return f"{layer}/{rest}"
    return name


class KerasH5Reader(Reader):
    """Keras 2 layouts (``layer_names`` / ``weight_names``) and Keras 3 ``layers/*/vars``."""

    def __init__(self, path: str, fileobj: io.IOBase | None = None, base_offset: int = 0,
                 member_size: int | None = None, direct_io: bool = True,
                 probe: bool = True, record: bool = False):
        """``fileobj``/``base_offset``/``member_size`` describe an HDF5 file stored
        inside another file (a ``.keras`` zip member); ``direct_io=False`` when that
        member is compressed, so byte offsets inside it mean nothing on disk.
        ``probe``: walk the metadata in a forked child first (B20); ``record``: be that
        child, collecting what the parent may take over (:class:`_Facts`)."""
        super().__init__(path)
        # the probe child's answers for contiguous datasets; ``_record``: the child's
        # own collection of them
        self._known: dict[str, _Facts] = {}
        self._record: dict[str, _Facts] | None = {} if record else None
        if probe:
            self._known = _probe_metadata(path, fileobj, base_offset, member_size, direct_io)
        self._direct = direct_io
        self._base = base_offset
        self._datasets: dict[str, h5py.Dataset] = {}
        self._offsets: dict[str, int] = {}
        self._bf16: set[str] = set()
        self._big: set[str] = set()
        # Keras 2 datasets listed by name but not yet opened: (group id, dataset path)
        self._pending: dict[str, tuple[h5py.h5g.GroupID, str]] = {}
        self._order: list[str] = []
        self._listed: set[str] = set()
        self._range: RangeFile | None = None
        # object addresses of the datasets registered: a hard link to one already
        # seen is refused (aliasing multiplies the scan; see B12 in reliability.md)
        self._seen: dict[int, str] = {}
        self._groups: set[int] = set()
        self._contiguous_bytes = 0
        self._declared_bytes = 0
        try:
            self._h5 = h5py.File(fileobj if fileobj is not None else path, "r")
        except OSError as exc:
            cause, reason, retryable = _open_error(str(exc))
            raise self.error(cause, reason, retryable) from None
        try:
            # offsets inside a compressed member mean nothing on disk: no RangeFile
            if direct_io:
                self._range = RangeFile(self.path, base_offset, member_size)
            self._file_size = member_size if member_size is not None else \
                self._h5.id.get_filesize()
            try:
                self._open()
            except _H5_ERRORS as exc:
                raise self.error(f"corrupt HDF5 metadata ({exc.__class__.__name__}: {exc})"
                                 ) from None
        except Exception:
            self.close()
            raise

    # -- layout --------------------------------------------------------------
    def _open(self) -> None:
        root = self._h5
        attrs = root.attrs
        self.meta.framework = "keras"
        self.keras_version = _text(attrs.get("keras_version", ""))
        if "model_config" in attrs:
            try:
                config = json.loads(_text(attrs["model_config"]))
            except (json.JSONDecodeError, RecursionError):
                config = None
                self.meta.notes.append("model_config attribute is not valid JSON; ignored")
            if isinstance(config, dict):
                self.meta.model_config = config
            elif config is not None:
                self.meta.notes.append("model_config attribute is not a JSON object; ignored")
        weights = self._child(root, "model_weights")
        if isinstance(weights, h5py.Group):
            self.format = "keras2-h5"
            self._walk_k2(weights)
        elif "layer_names" in attrs or "layer_names0" in attrs:
            self.format = "keras2-h5"
            self._walk_k2(root)
        elif any(k in root for k in ("layers", "_layer_checkpoint_dependencies", "vars")):
            self.format = "keras3-weights-h5"
            self._walk_k3(root, "")
        else:
            raise self.error("HDF5 file has neither a Keras 2 nor a Keras 3 weights layout",
                             "unsupported")
        optimizer = self._child(root, "optimizer_weights")
        if isinstance(optimizer, h5py.Group):
            self._walk_plain(optimizer, "optimizer_weights")

    def _child(self, group: h5py.Group, key: str) -> Any:
        """``group[key]`` through a hard link only, else None (with a note).

        Soft and external links may point anywhere, other files included: data
        outside the checkpoint is never read, and a dangling link is not an error.
        """
        if _hard_link(group.id, key):
            return group.get(key)
        try:
            exists = group.id.links.exists(key.encode())
        except _H5_ERRORS:
            exists = False
        if exists:
            self.meta.notes.append(f"{group.name.rstrip('/')}/{key} is a soft or external "
                                   "link; not followed")
        return None

    def _walk_k2(self, group: h5py.Group) -> None:
        layers = _name_list(group.attrs, "layer_names") or list(group.keys())
        for layer in layers:
            sub = self._child(group, layer)
            if not isinstance(sub, h5py.Group):
                continue
            for wname in _name_list(sub.attrs, "weight_names"):
                name = _scoped(layer, _strip_suffix(wname))
                if name in self._infos or name in self._pending:
                    name = f"{layer}/{name}"
                # opened on first use: a BN-only scan never touches the other datasets
                self._pending[name] = (sub.id, wname)
                self._list(name)

    def _walk_k3(self, group: h5py.Group, prefix: str) -> None:
        addr = h5py.h5o.get_info(group.id).addr
        if addr in self._groups:  # a hard-link cycle or a group linked twice
            self.meta.notes.append(f"group {group.name} is linked more than once; skipped")
            return
        self._groups.add(addr)
        for key in group:
            item = self._child(group, key)
            path = f"{prefix}{key}"
            if isinstance(item, h5py.Group):
                if key == "vars":
                    for idx in sorted(item.keys(), key=lambda k: (len(k), k)):
                        ds = self._child(item, idx)
                        if isinstance(ds, h5py.Dataset):
                            self._add(f"{path}/{idx}", ds.id, ds.name)
                    label = _text(item.attrs.get("name", ""))
                    if label:
                        self.meta.layer_names[prefix.rstrip("/")] = label
                else:
                    self._walk_k3(item, path + "/")
            elif isinstance(item, h5py.Dataset):
                self._add(path, item.id, item.name)
        if not prefix:
            self.meta.auxiliary = frozenset(n for n in self._infos if n.startswith("optimizer/"))

    def _walk_plain(self, group: h5py.Group, prefix: str) -> None:
        names: list[str] = []
        group.visit(names.append)
        aux = set(self.meta.auxiliary)
        for rel in names:
            ds = group[rel]
            if isinstance(ds, h5py.Dataset):
                name = f"{prefix}/{_strip_suffix(rel)}"
                self._add(name, ds.id, ds.name)
                aux.add(name)
        self.meta.auxiliary = frozenset(aux)

    def _add(self, name: str, dsid: h5py.h5d.DatasetID | None, where: str) -> bool:
        """Register one dataset; False when it holds no numeric tensor. Without
        ``dsid``: a contiguous dataset the probe child described (``_known``)."""
        known = self._known.get(name) if self._direct else None
        if known is not None and known.where == where:
            dtype: str | None = known.dtype
            if known.bf16:
                self._bf16.add(name)
            if known.big:
                self._big.add(name)
            shape, addr, offset = known.shape, known.addr, known.offset
        else:
            if dsid is None:
                raise KeyError(name)
            dtype = self._dtype_of(name, dsid, where)
            if dtype is None:
                return False
            shape = tuple(int(d) for d in dsid.shape)
            addr = h5py.h5o.get_info(dsid).addr
            offset = None
        assert dtype is not None
        info = TensorInfo(name, shape, dtype)
        nbytes = info.size * dtypes.itemsize(dtype)
        if addr in self._seen:
            raise self.error(f"dataset {where} is another hard link to {self._seen[addr]}: "
                             "aliased datasets are refused")
        self._seen[addr] = where
        if known is None or known.where != where:
            assert dsid is not None
            plist = dsid.get_create_plist()
            layout = plist.get_layout()
            if layout == h5py.h5d.VIRTUAL or plist.get_external_count():
                raise self.error(f"dataset {where} keeps its data outside this file (virtual "
                                 "or external storage): refused", "forbidden")
            contiguous = (self._direct and layout == h5py.h5d.CONTIGUOUS
                          and plist.get_nfilters() == 0)
            offset = dsid.get_offset() if contiguous else None
            if offset is not None and self._record is not None:
                self._record[name] = _Facts(where, dtype, shape, addr, offset,
                                            name in self._bf16, name in self._big)
        if offset is not None:
            assert self._range is not None
            if offset + nbytes > self._range.size:
                raise self.error(f"dataset {where} declares {nbytes} bytes at offset {offset}, "
                                 f"past the end of the file ({self._range.size} bytes)",
                                 "truncated", True)
            self._contiguous_bytes += nbytes
            if self._contiguous_bytes > self._range.size:
                raise self.error(f"datasets up to {where} declare {self._contiguous_bytes} "
                                 f"bytes in a file of {self._range.size}: they overlap")
            self._offsets[name] = offset
        else:
            assert dsid is not None
            stored = dsid.get_storage_size()
            if nbytes > stored * _MAX_INFLATION + (1 << 20):
                raise self.error(f"dataset {where} declares shape {shape} ({nbytes} bytes) "
                                 f"but stores only {stored} bytes")
            self._declared_bytes += nbytes
            if self._declared_bytes > self._file_size * _MAX_INFLATION + (1 << 20):
                raise self.error(f"datasets up to {where} declare {self._declared_bytes} bytes "
                                 f"in a file of {self._file_size}", "too_large")
            self._datasets[name] = h5py.Dataset(dsid)
        self._list(name)
        self._infos[name] = info
        return True

    def _list(self, name: str) -> None:
        if name not in self._listed:
            self._listed.add(name)
            self._order.append(name)

    def _dtype_of(self, name: str, dsid: h5py.h5d.DatasetID, where: str) -> str | None:
        dt = dsid.dtype
        if dt.kind == "V" and dt.itemsize == 2 and h5py.h5a.exists(dsid, b"dtype") and \
                _text(h5py.Dataset(dsid).attrs["dtype"]) == "bfloat16":
            self._bf16.add(name)
            return "bfloat16"
        if dt.kind in "SUOV":
            self.meta.notes.append(f"dataset {where} of dtype {dt} skipped (not numeric)")
            return None
        key = f"{dt.kind}{dt.itemsize}"
        if key not in _H5_DTYPES:
            self.meta.notes.append(f"dataset {where} of dtype {dt} skipped")
            return None
        if dt.byteorder == ">":
            self._big.add(name)
        return _H5_DTYPES[key]

    def names(self) -> list[str]:
        return self._order

    def info(self, name: str) -> TensorInfo:
        pending = self._pending.pop(name, None)
        if pending is not None:
            gid, wname = pending
            known = self._known.get(name) if self._direct else None
            if known is not None:  # walked by the probe child: no libhdf5 call here
                self._add(name, None, known.where)
                return super().info(name)
            try:
                where = f"{_text(h5py.h5i.get_name(gid) or b'')}/{wname}"
                self._open_pending(name, gid, wname, where)
            except _H5_ERRORS as exc:
                raise self.error(f"corrupt HDF5 metadata ({exc.__class__.__name__}: {exc})"
                                 ) from None
        return super().info(name)

    def _open_pending(self, name: str, gid: h5py.h5g.GroupID, wname: str, where: str
                      ) -> None:
        """Open a Keras 2 dataset named in ``weight_names``, through hard links only."""
        parts = [p for p in wname.split("/") if p]
        for depth, part in enumerate(parts):
            if not _hard_link(gid, part):
                what = "does not exist" if not gid.links.exists(part.encode()) else \
                    "is reached through a soft or external link"
                if what == "does not exist":
                    raise self.error(f"{where} is listed in weight_names but does not exist",
                                     "truncated", True)
                self.meta.notes.append(f"{where} {what}; not followed")
                self._drop(name)
                return
            if depth < len(parts) - 1:
                try:
                    gid = h5py.h5g.open(gid, part.encode())
                except (KeyError, ValueError, TypeError):
                    raise self.error(f"{where} is listed in weight_names but does not exist",
                                     "truncated", True) from None
        try:  # the low-level API: a fraction of the cost of h5py's wrappers
            dsid = h5py.h5d.open(gid, parts[-1].encode() if parts else b".")
        except (KeyError, ValueError, TypeError):
            raise self.error(f"{where} is listed in weight_names but does not exist",
                             "truncated", True) from None
        if not self._add(name, dsid, where):
            self._drop(name)

    def _drop(self, name: str) -> None:
        self._order.remove(name)
        self._listed.discard(name)

    # -- data ----------------------------------------------------------------
    def _read_flat(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        offset = self._offsets.get(info.name)
        big = info.name in self._big
        if offset is not None:
            assert self._range is not None
            size = dtypes.itemsize(info.dtype)
            raw = self._range.read(offset + start * size, (stop - start) * size)
            return dtypes.decode(raw, info.dtype, big)
        return self._read_h5py(self._datasets[info.name], info, start, stop)

    def raw_extent(self, name: str) -> RawExtent | None:
        offset = self._offsets.get(self.info(name).name)
        if offset is None or self._range is None:
            return None
        return RawExtent(self._range, offset, name in self._big)

    def _read_h5py(self, ds: h5py.Dataset, info: TensorInfo, start: int, stop: int
                   ) -> np.ndarray:
        if ds.ndim == 0:
            flat = np.asarray(ds[()]).reshape(1)
        else:
            row = max(1, info.size // max(1, info.shape[0]))
            r0, r1 = start // row, -(-stop // row)
            try:
                flat = np.asarray(ds[r0:r1]).reshape(-1)[start - r0 * row: stop - r0 * row]
            except OSError as exc:
                raise self.error(f"dataset {ds.name}: {exc}", "truncated", True) from None
            except _H5_ERRORS as exc:
                raise self.error(f"dataset {ds.name}: corrupt ({exc.__class__.__name__}: "
                                 f"{exc})") from None
        if info.dtype == "bfloat16":
            flat = dtypes.decode(flat.view(np.uint16).tobytes(), "bfloat16")
        return flat

    def close(self) -> None:
        if self._range is not None:
            self._range.close()
        h5 = getattr(self, "_h5", None)
        if h5 is not None:
            # closing a half-opened file must never mask the real error
            with contextlib.suppress(Exception):
                h5.close()


def _superblock(head: bytes) -> int | None:
    return next((o for o in (0, 512, 1024) if head[o:o + 8] == HDF5_MAGIC), None)


def incomplete(path: str, fh: BinaryIO, head: bytes, size: int) -> Incomplete:
    """The superblock records the end-of-file address, written at flush and close: a
    shorter file is truncated, a longer one is still open in a writer (libhdf5 grows
    the file and updates the address only when it flushes); both are retried.

    A writer still holding the file (HDF5 >= 1.10 locking) is caught by the
    analysis itself, which reports it as retryable. A writer that closes and
    re-opens the file (in-place saves without locking) leaves consistent files in
    between: the daemon does not take an HDF5 close-after-write as finished, the
    file must also stay unchanged for ``settle_seconds``.
    """
    base = _superblock(head)
    if base is None:
        return None
    version = head[base + 8]
    if version in (0, 1):
        width = head[base + 13]
        at = base + 24 + (4 if version == 1 else 0) + 2 * width
    elif version in (2, 3):
        width = head[base + 9]
        at = base + 12 + 2 * width
    else:
        return None
    if width not in (2, 4, 8) or at + width > len(head):
        return None
    eof = int.from_bytes(head[at:at + width], "little")
    if eof == (1 << (8 * width)) - 1:
        return None
    if base + eof > size:
        return "truncated", f"HDF5 file is {size} bytes, its superblock says {base + eof}"
    if base + eof < size:
        # libhdf5 writes the end-of-file address at flush / close; while a writer has the
        # file open (no file locking on NFS / Lustre) the file has grown past it
        return "incomplete", (f"HDF5 file is {size} bytes, past its superblock's end-of-file "
                              f"address {base + eof}: still being written")
    return None


def _looks_like(head: bytes) -> bool:
    return _superblock(head) is not None


FORMAT = Format("keras-h5", _looks_like, lambda p: _looks_like(p.head), KerasH5Reader,
                incomplete, ("*.h5", "*.hdf5"))
