"""The refinement's products of a plain (groups 1) kernel, in one cache-resident pass.

``refine.conv_input`` is given a kernel's tap sums (``KernelStats``: seven
kernel-sized arrays written out) and then runs nine matrix-vector products over
them, each reading kernel-sized memory again. For a ResNet-152 that was most of
the refinement's fixed cost. Here the kernel is cut into blocks of ~64 Ki
elements; each block's tap sums stay in L2 and are multiplied at once with every
vector the refinement needs (inference and training feeds stacked as columns).
Same formulas and float32 products as ``conv_input``, so the same results up to
float32 rounding (checked: every layer's classes on the fixtures, tests).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from bnexporter.detection.refine import Arena, ConvInput, Dist

_BLOCK_ELEMENTS = 1 << 16  # kernel elements per block: the temporaries stay in L2
# the products per output channel and their columns (inference, training / lo, hi)
_WIDTH = {"mean": 2, "var_ind": 2, "var_full": 2, "k3_ind": 1, "k3_full": 1, "pos": 2,
          "neg": 2}


class Rows(Protocol):
    """A float32 kernel as a C-order (height, width) matrix, read block by block:
    torch (out, in * taps) or Keras (taps * in, out)."""

    shape: tuple[int, int]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``; valid until the next call."""
        ...


class ArrayRows:
    """Rows of a kernel already in memory."""

    def __init__(self, flat: np.ndarray):
        self.flat, self.shape = flat, (int(flat.shape[0]), int(flat.shape[1]))

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.flat[start: stop]


def conv_inputs(w: np.ndarray, inf: Dist, train: Dist, bias: np.ndarray | None,
                arena: Arena | None = None) -> tuple[ConvInput, ConvInput]:
    """(inference-mode x, training-mode x with mean / variances only) of a groups-1
    conv ``w`` (out, in, taps): what ``conv_input`` gives for ``inf`` and, with
    ``variance_only``, for ``train``."""
    out, cin, taps = w.shape
    base = w.transpose(2, 1, 0)  # Keras layout: (taps, in, out) in memory
    if base.flags.c_contiguous and not w.flags.c_contiguous:
        return streamed(ArrayRows(base.reshape(taps * cin, out)), True, w.shape, inf, train,
                        bias, arena)
    flat = np.ascontiguousarray(w).reshape(out, cin * taps)
    return streamed(ArrayRows(flat), False, w.shape, inf, train, bias, arena)


def streamed(src: Rows, keras: bool, shape: tuple[int, int, int], inf: Dist, train: Dist,
             bias: np.ndarray | None, arena: Arena | None = None
             ) -> tuple[ConvInput, ConvInput]:
    """:func:`conv_inputs` of a kernel given as rows (``keras``: (taps * in, out),
    else (out, in * taps)) of the (out, in, taps) kernel ``shape``."""
    out, cin, taps = shape
    if inf.mean.shape[0] != cin or train.mean.shape[0] != cin:
        raise ValueError("kernel does not match its input")
    if src.shape != ((taps * cin, out) if keras else (out, cin * taps)):
        raise ValueError("kernel rows do not match the kernel shape")
    a = arena if arena is not None else Arena()
    lo, hi = inf.lo, inf.hi
    if taps > 1:  # zero padding feeds zeros at the borders
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    k3 = np.broadcast_to(np.asarray(inf.k3, np.float64), inf.mean.shape)
    # the vectors, float32 as in conv_input, stacked as columns of one operand each
    means = _columns(a, "means", inf.mean, train.mean)
    variances = _columns(a, "vars", inf.var, train.var)
    ranges = _columns(a, "ranges", lo, hi)
    cubes = _columns(a, "cubes", k3)
    res = _Sums(a, out, taps > 1)
    if keras:
        _by_inputs(src, shape, a, res, means, variances, ranges, cubes)
    else:
        _by_outputs(src, shape, a, res, means, variances, ranges, cubes)
    b = np.zeros(out) if bias is None else np.asarray(bias, np.float64)
    f64 = res.as_float64()
    mean, mean_t = f64["mean"][0] + b, f64["mean"][1] + b
    var_ind, var_ind_t = f64["var_ind"][0], f64["var_ind"][1]
    if taps > 1:
        var_full, var_full_t = f64["var_full"][0], f64["var_full"][1]
        k3_full = f64["k3_full"][0]
    else:  # one tap: both limits are the same product (and the same object)
        var_full, var_full_t, k3_full = var_ind, var_ind_t, f64["k3_ind"][0]
    k3_ind = f64["k3_ind"][0] if taps > 1 else k3_full
    pos, neg = f64["pos"], f64["neg"]  # rows: (. @ lo, . @ hi)
    ci = ConvInput(mean=mean, lo=pos[0] + neg[1] + b, hi=pos[1] + neg[0] + b,
                   moments=inf.moments, var_ind=var_ind, var_full=var_full,
                   k3_ind=k3_ind, k3_full=k3_full)
    zero = np.zeros(out)
    ct = ConvInput(mean_t, zero, zero, train.moments, var_ind_t, var_full_t, zero, zero)
    return ci, ct


def _columns(a: Arena, key: str, *vectors: np.ndarray) -> np.ndarray:
    """(len, k) float32, C order: one column per vector."""
    m = a.get(key, (vectors[0].shape[0], len(vectors)))
    for j, v in enumerate(vectors):
        m[:, j] = v
    return m


class _Sums:
    """Per output channel, float32 rows accumulated over the blocks: (k, out) each."""

    def __init__(self, a: Arena, out: int, full: bool):
        self.full = full
        self.rows = {n: a.get(f"sum_{n}", (k, out)) for n, k in _WIDTH.items()
                     if full or n not in ("var_full", "k3_full")}
        for r in self.rows.values():
            r.fill(0.0)

    def as_float64(self) -> dict[str, np.ndarray]:
        return {n: r.astype(np.float64) for n, r in self.rows.items()}


def _by_outputs(src: Rows, shape: tuple[int, int, int], a: Arena, res: _Sums,
                means: np.ndarray, variances: np.ndarray, ranges: np.ndarray,
                cubes: np.ndarray) -> None:
    """Torch layout, (out, in, taps) C order: blocks of output rows.

    Sums over the taps and the inputs of w, w+, w-, w^2, w^3 against the vectors
    repeated per tap: one product over (rows, in * taps), no per-pair tap sums.
    """
    out, cin, taps = shape
    rep = [np.repeat(v, taps, axis=0) if taps > 1 else v
           for v in (means, variances, ranges, cubes)]
    rows = max(1, _BLOCK_ELEMENTS // (cin * taps))
    ones = a.get("ones", (taps,))
    ones.fill(1.0)
    for o in range(0, out, rows):
        blk = src.rows(o, min(out, o + rows))
        n = blk.shape[0]
        sl = slice(o, o + n)
        for name, part in _elementwise(blk, a, rep):
            res.rows[name][:, sl] = part.T
        if res.full:  # taps alike: the per-pair tap sum, squared and cubed
            s = np.matmul(blk.reshape(n * cin, taps), ones, out=a.get("s", (n * cin,)))
            s = s.reshape(n, cin)
            s2 = np.multiply(s, s, out=a.get("s2", s.shape))
            res.rows["var_full"][:, sl] = (s2 @ variances).T
            res.rows["k3_full"][:, sl] = (np.multiply(s2, s, out=s2) @ cubes).T


def _by_inputs(src: Rows, shape: tuple[int, int, int], a: Arena, res: _Sums,
               means: np.ndarray, variances: np.ndarray, ranges: np.ndarray,
               cubes: np.ndarray) -> None:
    """Keras layout, (taps, in, out) C order: blocks of (tap, input) rows, every output
    accumulated; the vectors tiled per tap."""
    out, cin, taps = shape
    rep = [np.tile(v, (taps, 1)) if taps > 1 else v for v in (means, variances, ranges, cubes)]
    rows = max(1, _BLOCK_ELEMENTS // out)
    s = a.get("s", (cin, out)) if res.full else None
    if s is not None:
        s.fill(0.0)
    for r in range(0, taps * cin, rows):
        blk = src.rows(r, min(taps * cin, r + rows))
        part = [v[r: r + blk.shape[0]] for v in rep]
        for name, got in _elementwise(blk, a, part, transposed=True):
            res.rows[name] += got
        if s is not None:  # the per-pair tap sums, tap by tap
            _add_taps(s, blk, r, cin)
    if s is not None:
        s2 = np.multiply(s, s, out=a.get("s2", s.shape))
        res.rows["var_full"] += variances.T @ s2
        res.rows["k3_full"] += cubes.T @ np.multiply(s2, s, out=s2)


def _add_taps(s: np.ndarray, blk: np.ndarray, start: int, cin: int) -> None:
    """Add (tap, input) rows ``start ...`` of a Keras block to the per-input sums."""
    done, n = 0, blk.shape[0]
    while done < n:
        i = (start + done) % cin
        k = min(n - done, cin - i)
        s[i: i + k] += blk[done: done + k]
        done += k


def _elementwise(blk: np.ndarray, a: Arena, vectors: list[np.ndarray],
                 transposed: bool = False) -> list[tuple[str, np.ndarray]]:
    """w, w+, w-, w^2, w^3 of one block against (means, variances, ranges, cubes):
    (rows, k) products, or (k, cols) with ``transposed`` (the block's rows are inputs)."""
    means, variances, ranges, cubes = vectors

    def prod(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        return v.T @ x if transposed else x @ v

    # 2 max(w, 0) = w + |w| and 2 min(w, 0) = w - |w|, exactly; halving the products
    # is exact too (a power of two), so they equal those of max / min
    p = np.abs(blk, out=a.get("p", blk.shape))
    n = np.subtract(blk, p, out=a.get("n", blk.shape))
    np.add(blk, p, out=p)
    out = [("mean", prod(blk, means)), ("pos", prod(p, ranges) * np.float32(0.5)),
           ("neg", prod(n, ranges) * np.float32(0.5))]
    q = np.multiply(blk, blk, out=p)
    out.append(("var_ind", prod(q, variances)))
    out.append(("k3_ind", prod(np.multiply(q, blk, out=n), cubes)))
    return out
