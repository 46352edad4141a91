"""One measurement per process: ``python probes.py KIND FORMAT PATH`` prints one JSON line.

Why a fresh process each: peak RSS is a high-water mark, so only a process that
did nothing but this one job reports a clean peak. Imports happen
before the clock starts; ``base_rss_mb`` is the peak after imports, so the
job's own memory is ``peak_rss_mb - base_rss_mb``.

Kinds: raw (sequential 8 MB reads, no parsing), bn (bnexporter ``--bn-only``
with the default refined estimate), bnplain (``--bn-only --no-refine``: the plain
estimate, no producer kernels read), full (bnexporter full scan, default
settings), naive (the seed's approach: every tensor loaded whole, then numpy
``abs`` comparisons), torch (``torch.load(mmap=True)`` and the BN-only job in
torch; needs torch). Nothing here imports torch except ``torch``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import statistics
import struct
import sys
import time
import zipfile
from collections import OrderedDict
from typing import Any, ClassVar

BLOCK = 8 << 20
THRESHOLD = 1e5          # the seed's warning_threshold
BN_REPEATS = 5


def peak_rss_mb() -> float:
    """This process's own peak RSS.

    Linux keeps ``ru_maxrss`` across ``execve``, and Python starts children with
    vfork, so ``ru_maxrss`` of a fresh child includes the *parent's* peak. VmHWM
    belongs to the current address space only, so read that when there is one.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _tf_data(path: str) -> str:
    return path[: -len(".index")] + ".data-00000-of-00001"


def raw_read(path: str, fmt: str) -> dict[str, Any]:
    """Sequential reads of every file of the checkpoint (index and data shard for tf)."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    paths = [path, _tf_data(path)] if fmt == "tf" else [path]
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def mmap_reduce(path: str, fmt: str) -> dict[str, Any]:
    """One numpy pass over the mapped file (``np.frombuffer(mmap).max()``): the
    memory-bandwidth reference of a one-pass reduction."""
    import mmap

    import numpy as np

    paths = [path, _tf_data(path)] if fmt == "tf" else [path]
    t0 = time.perf_counter()
    top = 0
    for p in paths:
        with open(p, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            n = len(mm) // 4 * 4
            top = max(top, int(np.frombuffer(mm, np.uint32, n // 4).max()))
            del mm
    return {"seconds": time.perf_counter() - t0, "result": {"max_bits": top}}


def _summary(report: Any) -> dict[str, Any]:
    s = report.summary
    return {"error": report.error, "format": report.format, "bn_layers": s.bn_layers,
            "channels": s.channels, "dead": s.dead, "near_dead": s.near_dead,
            "nonfinite": s.nonfinite, "tensors": s.tensors,
            "would_be_dead": s.counts.get("would_be_dead", 0),
            "unknown_consumers": s.unknown_consumers}


def bnexporter_scan(path: str, bn_only: bool, refine: bool = True) -> dict[str, Any]:
    from dataclasses import replace

    from bnexporter.detection.analysis import Thresholds
    from bnexporter.scan import ScanOptions, analyse_path

    opts = ScanOptions(bn_only=bn_only, thresholds=replace(Thresholds(), refine=refine))
    t0 = time.perf_counter()
    report = analyse_path(path, opts)
    first = time.perf_counter() - t0
    out: dict[str, Any] = {"seconds": first, "result": _summary(report)}
    if bn_only:  # the daemon's steady state: process and imports already warm
        times = []
        for _ in range(BN_REPEATS):
            t0 = time.perf_counter()
            analyse_path(path, opts)
            times.append(time.perf_counter() - t0)
        out["repeat_median"] = statistics.median(times)
        out["repeat_min"] = min(times)
    return out


# -- naive baseline -------------------------------------------------------------

def _naive_h5(path: str) -> dict[str, Any]:
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        def grab(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                arrays[name] = obj[()]
        f.visititems(grab)
    return arrays


def _naive_safetensors(path: str) -> dict[str, Any]:
    import numpy as np

    with open(path, "rb") as fh:
        data = fh.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    kinds = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
    arrays = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        dt = np.dtype(kinds[e["dtype"]])
        arrays[name] = np.frombuffer(data, dt, (end - b) // dt.itemsize, 8 + n + b
                                     ).reshape(e["shape"])
    return arrays


class _StandIns(pickle.Unpickler):
    """Just enough of torch's pickle to learn (storage key, dtype, shape) per tensor."""

    _STORAGE: ClassVar[dict[str, str]] = {"FloatStorage": "<f4", "HalfStorage": "<f2",
                                           "DoubleStorage": "<f8",
                                           "LongStorage": "<i8", "IntStorage": "<i4",
                                           "ByteStorage": "u1"}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, size)
        if module == "torch" and name in self._STORAGE:
            return self._STORAGE[name]
        raise pickle.UnpicklingError(f"{module}.{name} not expected in a benchmark file")

    def persistent_load(self, pid: Any) -> Any:
        return pid[2], pid[1]


def _naive_pt(path: str) -> dict[str, Any]:
    import io

    import numpy as np

    with open(path, "rb") as fh:
        data = fh.read()
    zf = zipfile.ZipFile(io.BytesIO(data))
    root = zf.namelist()[0].split("/", 1)[0]
    state = _StandIns(io.BytesIO(zf.read(f"{root}/data.pkl"))).load()
    arrays = {}
    for name, ((key, dtype), offset, size) in state.items():
        zi = zf.getinfo(f"{root}/data/{key}")
        h = zi.header_offset
        n, m = struct.unpack("<HH", data[h + 26:h + 30])
        dt = np.dtype(dtype)
        arrays[name] = np.frombuffer(data, dt, math.prod(size),
                                     h + 30 + n + m + offset * dt.itemsize).reshape(size)
    return arrays


def _naive_tf(path: str) -> dict[str, Any]:
    """Index parsed with bnexporter's SSTable code (small, not what is timed here),
    then every tensor read whole from the data shard with numpy."""
    import numpy as np

    from bnexporter.formats.tf_bundle import load_index, resolve_prefix

    bundle = load_index(resolve_prefix(path))
    arrays = {}
    with open(_tf_data(path), "rb") as fh:
        for key, e in bundle.entries.items():
            if e.dtype != 1:  # DT_FLOAT only; synth writes nothing else
                continue
            fh.seek(e.offset)
            arrays[key] = np.fromfile(fh, "<f4", e.size // 4).reshape(e.shape)
    return arrays


def _naive_npz(path: str) -> dict[str, Any]:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _naive_keras(path: str) -> dict[str, Any]:
    """The weights file read out of the archive, then every dataset with h5py."""
    import io

    import h5py

    with zipfile.ZipFile(path) as zf:
        data = io.BytesIO(zf.read("model.weights.h5"))
    arrays = {}
    with h5py.File(data, "r") as f:
        def grab(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                arrays[name] = obj[()]
        f.visititems(grab)
    return arrays


def naive(path: str, fmt: str) -> dict[str, Any]:
    import numpy as np

    loader = {"h5": _naive_h5, "safetensors": _naive_safetensors, "pt": _naive_pt,
              "tf": _naive_tf, "npz": _naive_npz, "keras": _naive_keras}[fmt]
    t0 = time.perf_counter()
    arrays = loader(path)
    t_load = time.perf_counter() - t0
    flagged = 0
    for w in arrays.values():  # the seed's method, exactly
        flagged += bool(np.sum(np.abs(w) > THRESHOLD) + np.sum(np.abs(w) < 1.0 / THRESHOLD))
    return {"seconds": time.perf_counter() - t0, "load_seconds": t_load,
            "result": {"tensors": len(arrays), "flagged_tensors": flagged}}


# -- torch peer -----------------------------------------------------------------

def torch_bn(path: str) -> dict[str, Any]:
    """torch's cheapest route to the same BN-only answer: mmap load, four vectors per BN."""
    import torch

    torch.set_num_threads(1)

    def job() -> tuple[float, int, int]:
        t0 = time.perf_counter()
        sd = torch.load(path, weights_only=True, mmap=True)
        t_load = time.perf_counter() - t0
        dead = layers = 0
        for key in sd:
            if not key.endswith(".running_mean"):
                continue
            p = key[: -len("running_mean")]
            g, b = sd[p + "weight"].double(), sd[p + "bias"].double()
            var = sd[p + "running_var"].double()
            s = g.abs() * torch.sqrt(var / (var + 1e-5))
            dead += int((torch.special.ndtr(b / s) < 1e-3).sum())
            layers += 1
        return t_load, dead, layers

    t0 = time.perf_counter()
    t_load, dead, layers = job()
    first = time.perf_counter() - t0
    times = []
    for _ in range(BN_REPEATS):
        t0 = time.perf_counter()
        job()
        times.append(time.perf_counter() - t0)
    return {"seconds": first, "load_seconds": t_load, "repeat_median": statistics.median(times),
            "repeat_min": min(times), "result": {"bn_layers": layers, "dead": dead},
            "torch": torch.__version__}


def _import_bnexporter(fmt: str) -> None:
    """Load the scan code and the format's reader before the clock starts: a daemon
    has them loaded after its first file, and h5py's import alone takes ~0.1 s."""
    import importlib

    importlib.import_module("bnexporter.scan")
    reader = {"h5": "hdf5_keras", "safetensors": "safetensors", "pt": "torch_zip",
              "tf": "tf_bundle", "npz": "npz", "keras": "keras_zip"}[fmt]
    importlib.import_module(f"bnexporter.formats.{reader}")


def main(argv: list[str]) -> None:
    kind, fmt, path = argv
    import numpy  # noqa: F401
    if kind in ("bn", "bnplain", "full"):
        _import_bnexporter(fmt)
    elif kind == "torch":
        import torch  # noqa: F401
    base = peak_rss_mb()
    if kind == "raw":
        out = raw_read(path, fmt)
    elif kind == "mmap":
        out = mmap_reduce(path, fmt)
    elif kind in ("bn", "bnplain", "full"):
        out = bnexporter_scan(path, bn_only=kind != "full", refine=kind != "bnplain")
    elif kind == "naive":
        out = naive(path, fmt)
    elif kind == "torch":
        out = torch_bn(path)
    else:
        raise SystemExit(f"unknown probe {kind!r}")
    out.update(kind=kind, format=fmt, base_rss_mb=base, peak_rss_mb=peak_rss_mb(),
               pid=os.getpid())
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
