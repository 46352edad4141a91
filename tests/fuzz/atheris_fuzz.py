"""Coverage-guided fuzzing of one parser with atheris (libFuzzer), for long local runs.

    pip install atheris                      # dev only; never a runtime dependency
    python tests/fuzz/atheris_fuzz.py TARGET [CORPUS_DIR] [libFuzzer flags...]

    python tests/fuzz/atheris_fuzz.py pickle /tmp/fz/pickle -max_total_time=300 \\
        -rss_limit_mb=3000 -timeout=10

TARGET is one of the names in TARGETS below. CORPUS_DIR (created if missing) is
seeded with the same real files the hypothesis tests mutate, and libFuzzer adds
every input that reaches new code. A finding is written as ``crash-<sha1>``
(or ``timeout-``/``oom-``) in the working directory; replay it with
``python tests/fuzz/atheris_fuzz.py TARGET crash-<sha1>``. ``CheckpointError``
(and the unpickler's ``Refused``) are the only allowed outcomes besides success;
anything else propagates and is reported by atheris as a crash.

Set BNEXPORTER_FUZZ_IGNORE_KNOWN=1 to keep going past the bugs already listed in
docs/reliability.md. The ``h5`` and ``keras`` targets run libhdf5 in-process:
a C-level spin there (bug B20) holds the GIL, libFuzzer's timeout never fires and
the run stalls; fuzz HDF5 with tests/fuzz/test_fuzz_hdf5.py (sandboxed) instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["bnexporter"]):
    import bnexporter.formats.hdf5_keras
    import bnexporter.formats.keras_zip
    import bnexporter.scan  # noqa: F401
    from tests.fuzz import targets

from tests.fuzz import fuzz_support as fs  # noqa: E402


def _tf(data: bytes) -> None:
    """First byte picks a real bundle; the rest replaces its index (CRCs and all)."""
    bundles = fs.tf_bundles()
    if not data:
        return
    _index, shard = bundles[data[0] % len(bundles)]
    targets.target_tf_bundle(data[1:], shard)


TARGETS = {
    "safetensors": (targets.target_safetensors, fs.safetensors_seeds),
    "npz": (targets.target_npz, fs.npz_seeds),
    "zip": (targets.target_zipmember, fs.zip_seeds),
    "pickle": (targets.target_pickle, fs.pickle_seeds),
    "torch": (targets.target_torch_zip, fs.torch_zip_seeds),
    "torch-legacy": (targets.target_torch_legacy, fs.torch_legacy_seeds),
    "torchscript": (targets.target_torchscript, fs.torchscript_seeds),
    "torch-export": (targets.target_torch_export, fs.pt2_seeds),
    "sstable": (targets.target_sstable, lambda: [i for i, _ in fs.tf_bundles()]),
    "tf": (_tf, lambda: [bytes([n]) + i for n, (i, _) in enumerate(fs.tf_bundles())]),
    "tf-graph": (targets.target_tf_graph, fs.tf_graphs),
    "h5": (targets.target_h5, fs.h5_seeds),
    "keras": (targets.target_keras_zip, fs.keras_seeds),
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [CORPUS_DIR] [libFuzzer flags]")
    name = sys.argv.pop(1)
    fn, seeds = TARGETS[name]
    args = list(sys.argv)
    corpus = next((a for a in args[1:] if not a.startswith("-")), None)
    if corpus and not os.path.isfile(corpus):
        os.makedirs(corpus, exist_ok=True)
        for i, seed in enumerate(seeds()):
            path = os.path.join(corpus, f"seed-{i}")
            if not os.path.exists(path):
                with open(path, "wb") as fh:
                    fh.write(seed)
    atheris.Setup(args, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
