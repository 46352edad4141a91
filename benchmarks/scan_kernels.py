"""Where the full scan's time goes: the per-chunk work, timed piece by piece.

    python benchmarks/scan_kernels.py [--mb 256] [--repeat 3]

Why: bench_scan.py shows the full scan far from a raw read; this isolates the
parts (reading a chunk, the anomaly counts, the filter norms) and times
candidate replacements on the same float32 data, so a change to
``bnexporter.detection.analysis.TensorScan`` can be judged before it is made. Each
candidate is checked against the current code's counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnexporter.detection.analysis import TensorScan, Thresholds, extreme_limits

INF_BITS = 0x7F800000


def current(chunks: list[np.ndarray], out_axis: int | None, shape: tuple[int, ...]
            ) -> tuple[int, int, int, int, float]:
    """``bnexporter.detection.analysis.TensorScan`` as it is."""
    scan = TensorScan(shape, "float32", Thresholds(), out_axis)
    start = 0
    for c in chunks:
        scan.update(start, c)
        start += c.size
    r = scan.result()
    return r.nonfinite, r.huge, r.tiny, r.zero, r.max_abs


def bits(chunks: list[np.ndarray], out_axis: int | None, shape: tuple[int, ...]
         ) -> tuple[int, int, int, int, float]:
    """Counts on the IEEE bit patterns: ``|w|`` is ``bits & 0x7fffffff``, and for
    non-negative floats the order of the bit patterns is the order of the values,
    so every test is one integer compare into a reused buffer; NaN/Inf are the
    patterns >= 0x7f800000 and need no separate isfinite pass unless present."""
    huge_t, tiny_t = extreme_limits("float32", Thresholds().extreme)
    hb = int(np.float32(huge_t).view(np.uint32))
    tb = int(np.float32(tiny_t).view(np.uint32))
    n = max(c.size for c in chunks)
    mbuf = np.empty(n, np.uint32)
    bbuf = np.empty(n, np.bool_)
    nonfinite = huge = tiny = zero = 0
    top = 0
    for c in chunks:
        m = np.bitwise_and(c.view(np.uint32), 0x7FFFFFFF, out=mbuf[: c.size])
        b = bbuf[: c.size]
        cmax = cmax_all = int(m.max())
        bad = 0
        if cmax_all >= INF_BITS:  # rare: count them and take the largest finite value
            bad = int(np.count_nonzero(np.greater_equal(m, INF_BITS, out=b)))
            nonfinite += bad
            cmax = int(np.where(b, 0, m).max())
        if cmax_all > hb:  # the max already proves "no huge value" for ordinary chunks
            huge += int(np.count_nonzero(np.greater(m, hb, out=b))) - bad
        top = max(top, cmax)
        z = int(np.count_nonzero(np.equal(m, 0, out=b)))
        zero += z
        tiny += int(np.count_nonzero(np.less(m, tb, out=b))) - z
    return nonfinite, huge, tiny, zero, float(np.uint32(top).view(np.float32))


def sumsq_current(chunks: list[np.ndarray], out_axis: int, shape: tuple[int, ...]) -> np.ndarray:
    filters = shape[out_axis]
    row = shape[-1] if out_axis == -1 else int(np.prod(shape[1:]))
    acc = np.zeros(filters)
    start = 0
    for c in chunks:
        sq = np.square(np.abs(c), dtype=np.float64)
        if out_axis == -1:
            acc += sq.reshape(-1, filters).sum(axis=0)
        else:
            first = start // row
            rows = sq.reshape(-1, row).sum(axis=1)
            acc[first: first + rows.shape[0]] += rows
        start += c.size
    return acc


def sumsq_einsum(chunks: list[np.ndarray], out_axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 products, float64 accumulation per chunk: einsum's fused multiply-add
    needs no squared temporary; NaN/Inf only matter when present (counted above)."""
    filters = shape[out_axis]
    row = shape[-1] if out_axis == -1 else int(np.prod(shape[1:]))
    acc = np.zeros(filters)
    start = 0
    for c in chunks:
        x = c.reshape(-1, row)
        if out_axis == -1:
            acc += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        else:
            first = start // row
            acc[first: first + x.shape[0]] += np.einsum("ij,ij->i", x, x, dtype=np.float64)
        start += c.size
    return acc


def sumsq_blas(chunks: list[np.ndarray], out_axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """Squares in float32 then a matrix-vector product with ones (BLAS sgemv)."""
    filters = shape[out_axis]
    row = shape[-1] if out_axis == -1 else int(np.prod(shape[1:]))
    acc = np.zeros(filters)
    start = 0
    buf = np.empty(max(c.size for c in chunks), np.float32)
    for c in chunks:
        sq = np.multiply(c, c, out=buf[: c.size]).reshape(-1, row)
        if out_axis == -1:
            acc += np.ones(sq.shape[0], np.float32) @ sq
        else:
            first = start // row
            acc[first: first + sq.shape[0]] += sq @ np.ones(row, np.float32)
        start += c.size
    return acc


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def read_chunks(path: str, nbytes: int, chunk_bytes: int, into: bool) -> int:
    """pread into a fresh bytes object per chunk (what RangeFile does) vs preadv into
    one reused buffer."""
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(chunk_bytes)
    total = 0
    try:
        for off in range(0, nbytes, chunk_bytes):
            k = min(chunk_bytes, nbytes - off)
            if into:
                total += os.preadv(fd, [memoryview(buf)[:k]], off)
            else:
                total += len(os.pread(fd, k, off))
    finally:
        os.close(fd)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="float32 data per test, MB")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.mb * (1 << 20) // 4
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(n, dtype=np.float32) * 0.05)
    data[::1000] = 0.0
    data[[5, 7]] = [np.nan, np.inf]
    ns = lambda s: f"{1e9 * s / n:5.2f} ns/elem ({4 * n / s / 1e9:5.2f} GB/s)"  # noqa: E731
    print(f"{args.mb} MB of float32, best of {args.repeat}; {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    for elems in (1 << 22, 1 << 20, 1 << 18, 1 << 16):
        chunks = [data[i:i + elems] for i in range(0, n, elems)]
        t_cur, r_cur = timed(lambda c=chunks: current(c, None, (n,)), args.repeat)
        t_bit, r_bit = timed(lambda c=chunks: bits(c, None, (n,)), args.repeat)
        same = "same counts" if r_cur == r_bit else f"DIFFER {r_cur} vs {r_bit}"
        print(f"chunk {elems:>8} elems: counts current {ns(t_cur)} | bit-pattern {ns(t_bit)}"
              f" | {same}")
    for out_axis, shape in ((-1, (n // 4096, 4096)), (0, (4096, n // 4096))):
        row = shape[-1] if out_axis == -1 else shape[1]
        elems = max(row, ((1 << 20) // row) * row)
        chunks = [data[i:i + elems] for i in range(0, n, elems)]
        clean = [np.nan_to_num(c, posinf=0.0) for c in chunks]
        t0, a = timed(lambda c=clean, x=out_axis, s=shape: sumsq_current(c, x, s), args.repeat)
        t1, b = timed(lambda c=clean, x=out_axis, s=shape: sumsq_einsum(c, x, s), args.repeat)
        t2, c_ = timed(lambda c=clean, x=out_axis, s=shape: sumsq_blas(c, x, s), args.repeat)
        ok = np.allclose(a, b, rtol=1e-4) and np.allclose(a, c_, rtol=1e-3)
        print(f"filter norms axis {out_axis:2d} {shape}: current {ns(t0)} | einsum {ns(t1)} | "
              f"f32 square + sgemv {ns(t2)} | {'agree' if ok else 'DISAGREE'}")
    with tempfile.NamedTemporaryFile(prefix="bnexporter-kern-") as tmp:
        data.tofile(tmp.name)
        read_chunks(tmp.name, 4 * n, 16 << 20, True)  # page cache
        for chunk in (16 << 20, 4 << 20, 1 << 20):
            t_new, _ = timed(lambda k=chunk: read_chunks(tmp.name, 4 * n, k, False), args.repeat)
            t_into, _ = timed(lambda k=chunk: read_chunks(tmp.name, 4 * n, k, True), args.repeat)
            print(f"read {chunk >> 20:>2} MB chunks: pread new bytes {ns(t_new)} | "
                  f"preadv into one buffer {ns(t_into)}")


if __name__ == "__main__":
    main()
