"""bnexporter: find dying BatchNorm + ReLU channels in training checkpoints."""

import os as _os

# One BLAS thread unless the environment says otherwise. The refinement's small
# matrix-vector products gain nothing from a second thread and, on a busy node,
# wait for a core: with OpenBLAS's default pool a BN-only scan took 3-4x longer
# under load (benchmarks/README.md, "Issue 16"). Set here because every entry
# point (the command, ``python -m bnexporter``, the daemon's forkserver, which
# inherits the environment) imports this package before numpy loads; a program
# that imported numpy first keeps its own pool.
for _name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_name, "1")

__version__ = "0.1.0"
