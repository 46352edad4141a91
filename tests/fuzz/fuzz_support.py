"""Seeds, mutation strategies and run settings shared by the fuzz tests.

Runs are reproducible by default (``derandomize=True``: the same examples every
run, so CI is stable). For longer, exploring runs:

    BNEXPORTER_FUZZ_EXAMPLES=20000 BNEXPORTER_FUZZ_RANDOM=1 python -m pytest tests/fuzz

``BNEXPORTER_FUZZ_EXAMPLES`` multiplies nothing: it replaces every test's
example count.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from tests.hostile import builders as b

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXAMPLES = os.environ.get("BNEXPORTER_FUZZ_EXAMPLES")
RANDOM = os.environ.get("BNEXPORTER_FUZZ_RANDOM") == "1"


def fuzz_settings(ci_examples: int, shrink: bool = True) -> settings:
    """Settings for one fuzz test: ``ci_examples`` in CI, the env override otherwise.
    ``shrink=False`` where one example costs a subprocess round trip (the recipe of a
    failing example prints compactly anyway)."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=int(EXAMPLES) if EXAMPLES else ci_examples,
        phases=phases,
        derandomize=not RANDOM,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much, HealthCheck.large_base_example],
        print_blob=True,
    )


# -- mutations ----------------------------------------------------------------------------

# values that make length and offset fields lie in interesting ways
INTERESTING = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1)

_edit = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 1 << 30), st.integers(0, 255)),
    st.tuples(st.just("head"), st.integers(0, 4095), st.integers(0, 255)),
    st.tuples(st.just("int"), st.integers(0, 1 << 30), st.sampled_from(INTERESTING),
              st.sampled_from((1, 2, 4, 8))),
    st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30), st.just(0)),
    st.tuples(st.just("copy"), st.integers(0, 1 << 30), st.integers(0, 1 << 30)),
)


def apply_edits(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, pos, arg, *rest in edits:
        if not out:
            out += b"\0"
        n = len(out)
        if kind == "byte":
            out[pos % n] = arg
        elif kind == "head":
            out[pos % min(n, 4096)] = arg
        elif kind == "int":
            width = rest[0]
            at = (pos % n) & ~(width - 1)
            out[at:at + width] = (arg & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif kind == "delete":
            del out[pos % n:pos % n + arg]
        elif kind == "insert":
            out[pos % n:pos % n] = arg
        elif kind == "truncate":
            del out[max(1, pos % n):]
        elif kind == "copy":  # duplicate a 16-byte window elsewhere (structure-shaped junk)
            src = out[arg % n:arg % n + 16]
            out[pos % n:pos % n + len(src)] = src
    return bytes(out)


class Mutant:
    """A seed plus edits; its repr is the recipe, so a failing example prints in one
    line instead of as a megabyte of bytes (replay: ``apply_edits(seeds[i], edits)``)."""

    def __init__(self, seeds: list[bytes], index: int, edits: list[tuple]):
        self.index, self.edits = index % len(seeds), edits
        self.data = apply_edits(seeds[self.index], edits)

    def __repr__(self) -> str:
        return f"Mutant(seed={self.index}, edits={self.edits!r})"


def mutants(seeds: list[bytes], max_edits: int = 6) -> st.SearchStrategy[Mutant]:
    """A seed with a few edits: mostly still parseable, so the parser goes deep."""
    return st.builds(Mutant, st.just(seeds), st.integers(0, max(len(seeds) - 1, 0)),
                     st.lists(_edit, min_size=1, max_size=max_edits))


# -- seeds ------------------------------------------------------------------------------


@functools.cache
def safetensors_seeds() -> list[bytes]:
    return [b.safetensors_bytes(b.bn_arrays(), metadata={"step": "3"}),
            b.safetensors_bytes({"a": np.arange(6, dtype=np.float16).reshape(2, 3),
                                 "conv.weight": np.ones((2, 1, 1, 1), np.float32)})]


@functools.cache
def npz_seeds() -> list[bytes]:
    out = []
    for fn in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        fn(buf, **b.bn_arrays(4))
        out.append(buf.getvalue())
    return out


def _real(rel: str) -> bytes | None:
    p = FIXTURES / rel
    return p.read_bytes() if p.is_file() else None


@functools.cache
def torch_zip_seeds() -> list[bytes]:
    out = [b.torch_zip_from(b.TorchCheckpoint(b.bn_arrays(4),
                                              wrap={"key": "state_dict", "global_step": 5}))]
    for rel in ("torch/resnet_sd.pt", "torch/mobilenet_module_eps1e-3.pt",
                "torch/mobilenet_views_f8.pt"):
        raw = _real(rel)
        if raw is not None:
            out.append(raw)
    return out


@functools.cache
def torch_legacy_seeds() -> list[bytes]:
    out = [b.torch_legacy_from(b.TorchCheckpoint(b.bn_arrays(4)))]
    raw = _real("torch/mobilenet_legacy.pt")
    if raw is not None:
        out.append(raw)
    return out


@functools.cache
def pickle_seeds() -> list[bytes]:
    """``data.pkl`` of every torch zip seed, plus a synthetic Lightning-style pickle."""
    out = [b.state_dict_pickle(b.TorchCheckpoint(b.bn_arrays(4)).refs,
                               wrap={"key": "state_dict", "epoch": 2})]
    for raw in torch_zip_seeds():
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            out += [zf.read(n) for n in zf.namelist() if n.endswith("/data.pkl")]
    return out


@functools.cache
def zip_seeds() -> list[bytes]:
    out = list(torch_zip_seeds()[:2]) + npz_seeds()
    raw = _real("keras/k3_nested.keras")
    if raw is not None:
        out.append(raw)
    return out


def tf_prefixes() -> list[Path]:
    return sorted(p.with_suffix("") for p in (FIXTURES / "tf").glob("*/*.index"))


@functools.cache
def tf_bundles() -> list[tuple[bytes, bytes]]:
    """(index, single data shard) of every single-shard real TF fixture."""
    out = []
    for prefix in tf_prefixes():
        shard = Path(f"{prefix}.data-00000-of-00001")
        if shard.exists():
            out.append((Path(f"{prefix}.index").read_bytes(), shard.read_bytes()))
    return out


@functools.cache
def tf_graphs() -> list[bytes]:
    """Object graphs of the real TF2 fixtures."""
    from bnexporter.formats import tf_bundle

    out = []
    for prefix in tf_prefixes():
        try:
            bundle = tf_bundle.load_index(str(prefix))
        except Exception:
            continue
        e = bundle.entries.get(tf_bundle.OBJECT_GRAPH_KEY)
        if e is None:
            continue
        shard = Path(tf_bundle.data_filename(str(prefix), e.shard, bundle.num_shards))
        raw = shard.read_bytes()[e.offset:e.offset + e.size]
        out.append(tf_bundle.decode_string_scalar(raw, e.crc, "g"))
    return out


@functools.cache
def h5_seeds() -> list[bytes]:
    return [raw for rel in ("keras/k3_small.weights.h5", "keras/k2_nested.h5")
            if (raw := _real(rel)) is not None]


@functools.cache
def keras_seeds() -> list[bytes]:
    return [raw for rel in ("keras/k3_nested.keras",) if (raw := _real(rel)) is not None]


def u64(n: int) -> bytes:
    return struct.pack("<Q", n & ((1 << 64) - 1))


@functools.cache
def torchscript_seeds() -> list[bytes]:
    """Real TorchScript archives (torch.jit.save of traced and scripted modules)."""
    rels = [*(f"graph_sources/{p.name}" for p in sorted((FIXTURES / "graph_sources").glob(
        "*_[ts][rc]*ed.pt"))), "torch/ts_dtypes.pt", "torch/torchscript_tiny.pt"]
    return [raw for rel in rels if (raw := _real(rel)) is not None]


@functools.cache
def pt2_seeds() -> list[bytes]:
    """Real torch.export archives."""
    rels = [*(f"graph_sources/{p.name}" for p in sorted((FIXTURES / "graph_sources").glob(
        "*.pt2"))), "torch/export_dtypes.pt2"]
    return [raw for rel in rels if (raw := _real(rel)) is not None]
