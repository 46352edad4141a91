"""One checkpoint in, one report out: open -> discover BN layers -> analyse."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from bnexporter.detection import conv_moments
from bnexporter.detection.ahead import Ahead, configured_threads
from bnexporter.detection.analysis import TensorScan, TensorStats, Thresholds, classify_channels
from bnexporter.detection.discovery import BNLayer, discover
from bnexporter.detection.extremes import (
    AUX,
    INTEGER,
    MEAN,
    VAR,
    ExtremeThresholds,
    bn_role_map,
    judge,
    never_updated_layers,
    role_of,
)
from bnexporter.detection.kernel import overwriting
from bnexporter.detection.links import Link, find_links
from bnexporter.detection.measured import measure, measure_distilled, sample_for
from bnexporter.detection.order import model_order
from bnexporter.detection.refine import (
    Arena,
    BNParams,
    ConvInput,
    Dist,
    KernelStats,
    Refined,
    conv_inputs,
    kernel_matrix,
    refine_network,
)
from bnexporter.detection.refine import apply as apply_refined
from bnexporter.errors import CheckpointError, printable
from bnexporter.formats import dtypes
from bnexporter.formats.base import DEFAULT_CHUNK_ELEMENTS, RawExtent, Reader, TensorInfo
from bnexporter.formats.sniff import open_reader
from bnexporter.report import CheckpointReport, LayerReport, Summary, TensorReport, failed
from bnexporter.steps import step_from_name
from bnexporter.topology.consumers import ConsumerRules

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

_KERNEL_NAME = re.compile(r"(kernel|weight|/vars/0)$")


@dataclass(frozen=True)
class ScanOptions:
    thresholds: Thresholds = field(default_factory=Thresholds)
    consumers: ConsumerRules = field(default_factory=ConsumerRules)
    bn_only: bool = False
    step_regex: str | None = None
    eps: float | None = None
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    census: str | None = None      # a sample of model inputs (else bnexporter-census.npy beside)
    census_seconds: float = 60.0   # time budget of one census
    distill: bool = False          # without a sample: census over distilled inputs (opt-in)
    distill_warm: str | None = None  # a file keeping the distilled inputs for the next run
    census_enabled: bool = True    # False: no census this time (the daemon's census.every)
    # threads of one full scan (detection/ahead.py): 2 overlaps the refinement with the scan
    threads: int = field(default_factory=configured_threads)


def analyse_path(path: str, opts: ScanOptions | None = None,
                 progress: Progress | None = None,
                 then: Callable[[CheckpointReport, Reader], None] | None = None
                 ) -> CheckpointReport:
    """Never raises for a bad file: the error is in the report. ``then`` is called with
    the analysis and the still open reader (scan_cli's prune plan: no second open)."""
    opts = opts or ScanOptions()
    started = time.perf_counter()
    try:
        # a TF checkpoint prefix (what tf.train.latest_checkpoint() returns) is no file
        st = os.stat(path + ".index" if not os.path.lexists(path)
                     and os.path.isfile(path + ".index") else path)
    except OSError as exc:
        return failed(path, f"{printable(path)}: cannot stat: {exc.strerror}", "io")
    try:
        with open_reader(path) as reader:
            report = _analyse(reader, opts, progress)
            if then is not None:
                then(report, reader)
    except CheckpointError as exc:
        return failed(path, str(exc), exc.reason, step=step_from_name(path, opts.step_regex))
    except (MemoryError, RecursionError) as exc:
        return failed(path, f"{printable(path)}: {exc.__class__.__name__} while analysing",
                      "too_large")
    return CheckpointReport(
        path=path, format=report.format, step=report.step, error=None,
        summary=report.summary, bn_layers=report.bn_layers, tensors=report.tensors,
        notes=report.notes, bn_only=opts.bn_only, size_bytes=st.st_size, mtime=st.st_mtime,
        duration_seconds=time.perf_counter() - started)


def _analyse(reader: Reader, opts: ScanOptions, progress: Progress | None) -> CheckpointReport:
    with Ahead(1 if opts.bn_only else opts.threads) as ahead:
        return _analyse_in(reader, opts, progress, ahead)


def _analyse_in(reader: Reader, opts: ScanOptions, progress: Progress | None,
                ahead: Ahead) -> CheckpointReport:
    th = opts.thresholds
    try:
        layers = discover(reader, opts.consumers, opts.eps)
    except (KeyError, ValueError, TypeError) as exc:
        raise reader.error(f"cannot group BatchNorm tensors: {exc}") from None
    layers = model_order(layers, reader)  # the model's order, never alphabetical
    roles = bn_role_map(layers)
    if ahead.threads > 1:  # the tensors the refinement does not read, scanned meanwhile
        ahead.start(reader, reader.tensors(), _refine_reads(reader, layers, th),
                    lambda info: _scan_tensor(reader, info, th, opts.chunk_elements, roles))
    # a full scan takes the statistics of each refined producer kernel from the
    # refinement's read of it: those bytes are read once, not twice
    scanned: dict[str, TensorStats] | None = None if opts.bn_only else {}
    refined = _refine(reader, layers, th, roles, opts.chunk_elements, scanned) \
        if th.refine else {}
    layer_reports = [_analyse_layer(reader, layer, th, refined.get(layer.name))
                     for layer in layers]
    sample = sample_for(reader.path, opts.census) if opts.census_enabled else None
    if sample is not None and layer_reports:
        layer_reports = measure(reader, layer_reports, sample, th, opts.census_seconds,
                                reader.meta.notes)
    elif opts.distill and opts.census_enabled and layer_reports:
        layer_reports = measure_distilled(reader, layer_reports, th, opts.census_seconds,
                                          reader.meta.notes, opts.distill_warm)
    bn_tensors = {t for layer in layers
                  for t in (layer.gamma, layer.beta, layer.mean, layer.var) if t}
    if opts.bn_only:
        infos = [reader.info(n) for n in reader.names() if n in bn_tensors]
    else:
        infos = reader.tensors()
    total = sum(i.size * dtypes.itemsize(i.dtype) for i in infos)
    done = 0
    tensors: list[TensorReport] = []
    early = ahead.finish()
    for info in infos:
        report = early.get(info.name)
        tensors.append(report if report is not None else _scan_tensor(
            reader, info, th, opts.chunk_elements, roles,
            scanned.pop(info.name, None) if scanned else None))
        done += info.size * dtypes.itemsize(info.dtype)
        if progress:
            progress(done, total)
    nonfinite = sum(t.nonfinite for t in tensors)
    step = step_from_name(reader.path, opts.step_regex) if opts.step_regex else None
    if step is None:
        step = reader.meta.step if reader.meta.step is not None else step_from_name(reader.path)
    stale = never_updated_layers(reader, layers, step)
    if stale:
        layer_reports = [replace(r, never_updated=True) if r.name in stale else r
                         for r in layer_reports]
    return CheckpointReport(
        path=reader.path, format=reader.format, step=step, error=None,
        summary=Summary.build(layer_reports, tensors, nonfinite),
        bn_layers=layer_reports, tensors=tensors, notes=list(reader.meta.notes))


def _refine(reader: Reader, layers: list[BNLayer], th: Thresholds, roles: dict[str, str],
            chunk: int, scanned: dict[str, TensorStats] | None) -> dict[str, Refined]:
    """Refined estimates for the layers whose producer is known (refine.py)."""
    scan = None if scanned is None else _KernelScans(th, roles, chunk, scanned)
    try:
        return refine_layers(reader, layers, th.refine_kernel_max, scan)
    except (KeyError, ValueError, TypeError, IndexError, CheckpointError):
        return {}  # the plain estimate stands


def _refine_reads(reader: Reader, layers: list[BNLayer], th: Thresholds) -> set[str]:
    """The kernels :func:`refine_layers` may read and scan (float32 producers within
    ``refine_kernel_max``): left to it, never to the scan's second thread."""
    if not th.refine:
        return set()
    try:
        links = find_links(reader, layers)
        return {link.kernel for link in links.values()
                if link.feed is not None and link.groups > 0
                and reader.info(link.kernel).dtype == "float32"
                and reader.info(link.kernel).size <= th.refine_kernel_max}
    except (KeyError, ValueError, TypeError, IndexError, CheckpointError):
        return set()


def _analyse_layer(reader: Reader, layer: BNLayer, th: Thresholds,
                   refined: Refined | None = None) -> LayerReport:
    def read(name: str | None) -> np.ndarray | None:
        return None if name is None else reader.read(name)

    res = classify_channels(read(layer.gamma), read(layer.beta), reader.read(layer.mean),
                            reader.read(layer.var), layer.eps, layer.consumer, th)
    if refined is not None and refined.p_active.shape == res.p_active.shape:
        res = apply_refined(res, refined, layer.consumer, th)
    finite = res.p_active[np.isfinite(res.p_active)]
    return LayerReport(
        name=layer.name, channels=layer.channels, eps=layer.eps, eps_source=layer.eps_source,
        consumer=layer.consumer, consumer_source=layer.consumer_source, classes=res.classes(),
        min_p_active=float(finite.min()) if finite.size else None,
        producer=layer.producer, producer_source=layer.producer_source,
        mean_tensor=layer.mean)


def _out_axis(reader: Reader, info: TensorInfo) -> int | None:
    if len(info.shape) < 2 or not dtypes.is_float(info.dtype) or info.name in reader.meta.auxiliary:
        return None
    if not _KERNEL_NAME.search(info.name) or "embed" in info.name.lower():
        return None
    return -1 if reader.meta.framework in ("keras", "tf") else 0


def _role(reader: Reader, info: TensorInfo, roles: dict[str, str] | None) -> str:
    auxiliary = info.name in reader.meta.auxiliary
    is_kernel = (len(info.shape) >= 2 and bool(_KERNEL_NAME.search(info.name))
                 and "embed" not in info.name.lower())
    return role_of(info.name, roles or {}, is_kernel, auxiliary, info.dtype)


def _new_scan(reader: Reader, info: TensorInfo, th: Thresholds, role: str,
              full: bool) -> TensorScan:
    axis = _out_axis(reader, info)
    shape = info.shape
    if axis == -1 and len(shape) == 4 and shape[-1] == 1:  # depthwise (kh, kw, in, 1)
        shape = (*shape[:-2], shape[-2])
    return TensorScan(shape, info.dtype, th, axis, bands=full, negative=full or role == VAR)


def _scan_tensor(reader: Reader, info: TensorInfo, th: Thresholds, chunk: int,
                 roles: dict[str, str] | None = None,
                 done: TensorStats | None = None) -> TensorReport:
    """``done``: the statistics of the first pass when they were taken already (a
    producer kernel scanned while the refinement read it)."""
    auxiliary = info.name in reader.meta.auxiliary
    role = _role(reader, info, roles)

    def run(full: bool) -> TensorStats:
        scan = _new_scan(reader, info, th, role, full)
        # cache-sized raw pieces into one reused buffer (the decoded chunks where the
        # format has no contiguous bytes); ``chunk`` bounds the decoded fallback. Each
        # piece is dropped once scanned: the kernel may mask it in place
        with overwriting():
            for start, part in reader.iter_raw(info.name, min(chunk, scan.piece_elements)):
                scan.update(start, part)
        return scan.result()

    # the band counts and the negatives matter to judge() only for a tensor with a
    # large share of values below 1/T, or one of constant magnitude: only those are
    # read a second time with every count on
    st = done if done is not None else run(False)
    if st.band1 < 0 and _needs_all_counts(st, role):
        st = run(True)
    verdict = judge(st, role, info.dtype)
    kind, detail = verdict if verdict else (None, None)
    if auxiliary:
        # optimizer moments are tiny by nature: only non-finite values mean trouble there
        return TensorReport(info.name, list(info.shape), info.dtype, st.nonfinite, 0, 0,
                            st.zero, st.max_abs, None, role, kind, detail)
    return TensorReport(info.name, list(info.shape), info.dtype, st.nonfinite, st.huge,
                        st.tiny, st.zero, st.max_abs, st.dead_filters, role, kind, detail)


def _needs_all_counts(st: TensorStats, role: str) -> bool:
    if st.nonfinite or role in (AUX, INTEGER, MEAN, VAR) or st.size == 0:
        return False
    constant = st.size > 1 and st.min_abs == st.max_abs
    k = st.tiny - st.deep
    return constant or (k > 0 and k >= ExtremeThresholds().tiny_fraction * (st.size - st.zero))


class _KernelScans:
    """The full scan's first pass over the kernels the refinement reads anyway."""

    def __init__(self, th: Thresholds, roles: dict[str, str], chunk: int,
                 out: dict[str, TensorStats]):
        self.th, self.roles, self.chunk, self.out = th, roles, chunk, out

    def start(self, reader: Reader, info: TensorInfo) -> TensorScan:
        return _new_scan(reader, info, self.th, _role(reader, info, self.roles), False)


def refine_layers(reader: Reader, layers: list[BNLayer], kernel_max: int = 1 << 22,
                  scans: _KernelScans | None = None) -> dict[str, Refined]:
    """Read what the refinement needs (BN vectors, producer kernels) and run it.

    Kernels larger than ``kernel_max`` elements are not read: their layers keep
    the plain estimate, so a BN-only scan of a huge model stays cheap. With
    ``scans`` (a full scan), each float32 kernel read here is also run through the
    full scan's first pass, and its statistics are left in ``scans.out``.
    """
    links = find_links(reader, layers)
    if not links:
        return {}
    def read(name: str | None) -> np.ndarray | None:
        return None if name is None else reader.read(name)

    params = {layer.name: BNParams.of(read(layer.gamma), read(layer.beta),
                                      reader.read(layer.mean), reader.read(layer.var), layer.eps)
              for layer in layers}
    producers: dict[str, _LazyProducer] = {}
    largest = 0
    for name, link in links.items():
        if link.feed is None or link.groups <= 0:
            continue
        size = reader.info(link.kernel).size
        if size > kernel_max:
            continue
        largest = max(largest, size)
        bias = None if link.bias is None else np.asarray(reader.read(link.bias), np.float64)
        producers[name] = _LazyProducer(reader, link, bias, scans)
    # one buffer for every kernel of this analysis (no allocation and page faults per
    # kernel), dropped with it
    buffer, arena = np.empty(largest, np.float32), Arena()
    for prod in producers.values():
        prod.buffer, prod.arena = buffer, arena
    return refine_network(params, producers)


class _LazyProducer:
    """A producer whose kernel is read and reduced only when its layer is refined,
    and not kept: memory stays bounded by the largest kernel, not the model."""

    def __init__(self, reader: Reader, link: Link, bias: np.ndarray | None,
                 scans: _KernelScans | None = None):
        self.link, self.bias, self._reader, self._scans = link, bias, reader, scans
        self.buffer: np.ndarray | None = None
        self.arena: Arena | None = None

    def inputs(self, inf: Dist, train: Dist) -> tuple[ConvInput, ConvInput]:
        rows = self._file_rows() if self.link.groups == 1 and self._scans is None else None
        if rows is not None:  # BN-only: blocks read from the file into cache, no copy
            src, keras, shape = rows
            return conv_moments.streamed(src, keras, shape, inf, train, self.bias, self.arena)
        w = kernel_matrix(_read_kernel(self._reader, self.link.kernel, self.buffer,
                                       self._scans), self.link.layout)
        if self.link.groups == 1:  # one pass over the kernel, no kernel-sized sums
            return conv_moments.conv_inputs(w, inf, train, self.bias, self.arena)
        return conv_inputs(KernelStats.of(w, self.arena), self.link.groups, inf, train,
                           self.bias)

    def _file_rows(self) -> tuple[conv_moments.Rows, bool, tuple[int, int, int]] | None:
        """The kernel as rows read from its bytes on disk, when it lies there as
        native float32 in one run and its layout is a plain (torch / Keras) one."""
        info = self._reader.info(self.link.kernel)
        layout, shape = self.link.layout, info.shape
        if info.dtype != "float32" or not info.size or layout not in ("torch", "keras") \
                or len(shape) < 2 or self.arena is None:
            return None
        ext = self._reader.raw_extent(self.link.kernel)
        if ext is None or ext.big_endian:
            return None
        if layout == "torch":
            out, cin = shape[0], shape[1]
            taps, keras = info.size // (out * cin), False
            height, width = out, cin * taps
        else:
            cin, out = shape[-2], shape[-1]
            taps, keras = info.size // (out * cin), True
            height, width = taps * cin, out
        return _FileRows(ext, height, width, self.arena), keras, (out, cin, taps)


class _FileRows:
    """Rows of a float32 matrix stored C-order at ``ext``, read into one reused buffer."""

    def __init__(self, ext: RawExtent, height: int, width: int, arena: Arena):
        self.ext, self.shape, self.arena = ext, (height, width), arena

    def rows(self, start: int, stop: int) -> np.ndarray:
        width = self.shape[1]
        out = self.arena.get("rows", (stop - start, width))
        self.ext.file.readinto(self.ext.offset + 4 * start * width,
                               out.reshape(-1).view(np.uint8))
        return out


def _read_kernel(reader: Reader, name: str, buffer: np.ndarray | None,
                 scans: _KernelScans | None) -> np.ndarray:
    """A float32 kernel read in cache-sized pieces into ``buffer``; each piece also
    goes through the full scan's first pass when ``scans`` asks for it. Valid until
    the next call (KernelStats keeps nothing of it)."""
    info = reader.info(name)
    if info.dtype != "float32" or not info.size or buffer is None or buffer.size < info.size:
        return reader.read_array(name)
    scan = None if scans is None or name in scans.out else scans.start(reader, info)
    out = buffer[: info.size]
    piece = DEFAULT_CHUNK_ELEMENTS if scan is None else min(scans.chunk if scans else 0,
                                                             scan.piece_elements)
    for start, part in reader.iter_raw(name, piece):
        if scan is not None:
            scan.update(start, part)
        out[start: start + part.size] = part.view(np.float32) if part.dtype == np.uint32 \
            else part
    if scans is not None and scan is not None:
        scans.out[name] = scan.result()
    return out.reshape(info.shape)
