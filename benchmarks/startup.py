"""Where a BN-only scan's time goes, stage by stage, in one fresh process.

    python benchmarks/startup.py FILE [--no-refine]

Prints one JSON line, milliseconds: ``imports`` (``bnexporter.cli`` and what it pulls
in, the command's own import), then the stages in the order ``scan._analyse`` runs
them, with the project's own functions: ``open`` (sniff + parse), ``discover``
(grouping + model order), ``refine`` (links + producer kernels + refinement),
``classify`` (the 155 layers), ``scan_bn`` (the BN vectors through TensorScan), and
``total``. Run it under ``python -X importtime`` for the per-module import cost; the
interpreter's own start is ``python -c pass`` timed from outside. Also lists which
of h5py / prometheus_client / watchdog / yaml got imported (a BN-only scan of a
non-HDF5 file should list none).

Time it with cached bytecode, as an installed package has: this environment sets
``PYTHONDONTWRITEBYTECODE=1``, so run ``env -u PYTHONDONTWRITEBYTECODE
PYTHONPYCACHEPREFIX=/tmp/pyc python benchmarks/startup.py FILE`` (once to fill it);
otherwise every bnexporter module is compiled at each start (~150 ms more).
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.perf_counter()
import bnexporter.cli  # noqa: E402,F401  (what `bnexporter scan` imports)

T_IMPORT = time.perf_counter() - T0


def main(argv: list[str]) -> None:
    from bnexporter import scan
    from bnexporter.detection.discovery import discover
    from bnexporter.detection.extremes import bn_role_map
    from bnexporter.detection.order import model_order
    from bnexporter.formats.sniff import open_reader

    path = argv[0]
    opts = scan.ScanOptions(bn_only=True)
    th = opts.thresholds
    refine = "--no-refine" not in argv
    ms: dict[str, float] = {"imports": 1000 * T_IMPORT}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        ms[name] = 1000 * (now - t)
        t = now

    t_all = t
    with open_reader(path) as reader:
        lap("open")
        layers = model_order(discover(reader, opts.consumers, opts.eps), reader)
        lap("discover")
        roles = bn_role_map(layers)
        refined = scan._refine(reader, layers, th, roles, opts.chunk_elements, None) \
            if refine else {}
        lap("refine")
        reports = [scan._analyse_layer(reader, layer, th, refined.get(layer.name))
                   for layer in layers]
        lap("classify")
        names = {n for layer in layers for n in (layer.gamma, layer.beta, layer.mean,
                                                 layer.var) if n}
        for name in reader.names():
            if name in names:
                scan._scan_tensor(reader, reader.info(name), th, opts.chunk_elements, roles)
        lap("scan_bn")
    ms["total"] = 1000 * (time.perf_counter() - t_all)
    loaded = [m for m in ("h5py", "prometheus_client", "watchdog", "yaml") if m in sys.modules]
    print(json.dumps({"file": path, "layers": len(reports), "ms": {k: round(v, 1) for k, v in
                                                                   ms.items()},
                      "loaded": loaded}))


if __name__ == "__main__":
    main(sys.argv[1:])
