"""Benchmark bnexporter's checkpoint analysis against a naive loader and a raw read.

    python benchmarks/bench_scan.py [--sizes 1,4] [--formats h5,safetensors,pt,tf,npz,keras]
                                    [--out DIR]
                                    [--keep] [--probes raw,bn,bnplain,full,naive,torch]

Writes synthetic ResNet-152-like checkpoints (see synth.py) of each size, then
for each file runs every probe in its own fresh process (probes.py) with the
file in the page cache, and prints a table with the targets of issues 2, 3 and 16.
Needs only bnexporter's runtime dependencies; ``safetensors`` (optional) is
used to cross-check the written safetensors file, and torch (optional, any
interpreter given by --torch-python) for the ``torch.load(mmap=True)`` peer. Whole-process
timings against the peers: bench_whole.py; the BN-only stage breakdown: startup.py.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import synth  # noqa: E402

GB = 1_000_000_000
GENERATOR_VERSION = 2
READERS = {"h5": "hdf5_keras", "safetensors": "safetensors", "pt": "torch_zip",
           "tf": "tf_bundle", "npz": "npz", "keras": "keras_zip"}
BN_TARGET_MS = {"h5": 100.0, "safetensors": 100.0, "pt": 150.0, "tf": 100.0, "npz": 100.0,
                "keras": 100.0}
# issue 16: peak RSS < 150 MB at 4 GB, full scan <= 2x a raw read and >= 5x the seed's
RSS_TARGET_MB = 150.0
SPEEDUP_TARGET = 5.0
RAW_RATIO_TARGET = 2.0
# a TF bundle has no graph: its ReLU consumers are unknown, so the planted dead
# channels are reported as would-be dead
NO_GRAPH = ("tf",)
TORCH_CANDIDATES = ("/work/venv-fw/bin/python", "/work/venv-torch/bin/python")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4", help="file sizes in GB (1e9 bytes), comma list")
    ap.add_argument("--formats", default="h5,safetensors,pt",
                    help="any of h5,safetensors,pt,tf,npz,keras")
    ap.add_argument("--probes", default="raw,mmap,bn,bnplain,full,naive,torch")
    ap.add_argument("--out", help="directory for the big files (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the files (reused next run)")
    ap.add_argument("--torch-python", help="interpreter with torch for the torch peer "
                    "(default: this one if it has torch, else /work/venv-torch/bin/python)")
    ap.add_argument("--json", help="also write all measurements to this file")
    return ap.parse_args(argv)


def torch_python(choice: str | None) -> str | None:
    if choice:
        return choice
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return next((p for p in TORCH_CANDIDATES if os.access(p, os.X_OK)), None)


@functools.cache
def has_reader(fmt: str) -> bool:
    """Whether this checkout of bnexporter can read ``fmt`` (torch_zip came later)."""
    code = f"import bnexporter.formats.{READERS[fmt]}"
    return subprocess.run([sys.executable, "-c", code], env=child_env(),
                          capture_output=True).returncode == 0


def child_env() -> dict[str, str]:
    """The caller's environment unchanged (OPENBLAS_CORETYPE etc.), plus the repo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def warm(paths: list[str]) -> float:
    """Read the whole checkpoint once so every probe sees a warm page cache."""
    buf = bytearray(8 << 20)
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def run_probe(kind: str, fmt: str, path: str, python: str) -> dict[str, Any]:
    warm(synth.files(fmt, path))
    proc = subprocess.run([python, str(HERE / "probes.py"), kind, fmt, path],
                          env=child_env(), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"kind": kind, "failed": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_file(fmt: str, size_gb: float, out: Path) -> tuple[str, synth.Model, float | None]:
    """Write the checkpoint unless an identical one (same manifest) is already there."""
    target = int(size_gb * GB)
    path = out / f"synth-{size_gb:g}gb{synth.SUFFIX[fmt]}"
    manifest = {"version": GENERATOR_VERSION, "format": fmt, "target_bytes": target}
    side = Path(str(path) + ".manifest.json")
    if all(os.path.exists(p) for p in synth.files(fmt, str(path))) and side.exists() \
            and json.loads(side.read_text()) == manifest:
        return str(path), synth.build_model(target), None
    t0 = time.perf_counter()
    model = synth.write(fmt, str(path), target)
    seconds = time.perf_counter() - t0
    side.write_text(json.dumps(manifest))
    return str(path), model, seconds


def crosscheck_safetensors(path: str, model: synth.Model) -> str:
    """Read one BN vector back with the official library when it is installed."""
    if importlib.util.find_spec("safetensors") is None:
        return "safetensors library not installed: not cross-checked"
    import numpy as np
    from safetensors import safe_open

    t = next(x for x in model.tensors if x.torch_name == "bn1.running_var")
    with safe_open(path, framework="np") as f:
        got = f.get_tensor(t.torch_name)
    want = next(synth.Content().chunks(t, 1))
    return "safetensors library reads it back: " + ("ok" if np.array_equal(got, want)
                                                     else "MISMATCH")


def check(probe: dict[str, Any], model: synth.Model) -> list[str]:
    """Compare a probe's findings with what synth planted."""
    res = probe.get("result", {})
    problems = []
    if probe["kind"] in ("bn", "bnplain", "full", "torch"):
        if res.get("error"):
            problems.append(f"error: {res['error']}")
        if res.get("bn_layers") != model.bn_layers():
            problems.append(f"bn_layers {res.get('bn_layers')} != {model.bn_layers()}")
        dead = res.get("dead", 0) + (res.get("would_be_dead", 0)
                                     if probe.get("format") in NO_GRAPH else 0)
        if dead != model.planted_dead:
            problems.append(f"dead {res.get('dead')} != planted {model.planted_dead}")
    if probe["kind"] == "full" and res.get("nonfinite") != model.planted_nonfinite():
        problems.append(f"nonfinite {res.get('nonfinite')} != {model.planted_nonfinite()}")
    return problems


def machine_notes() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                       "?")
    except OSError:
        pass
    import h5py
    import numpy as np

    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": os.getloadavg(),
            "python": platform.python_version(), "numpy": np.__version__,
            "h5py": h5py.__version__, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| format | size GB | raw read s (GB/s) | mmap one-pass s | "
            "BN-only ms first / steady | "
            "BN-only no-refine ms first / steady | "
            "full scan s (GB/s) | full peak RSS MB | naive s | naive peak RSS MB | "
            "full vs naive | full / raw | torch mmap BN-only ms first / steady |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        p = r["probes"]
        raw, mm, bn, bp, full, nv, tc = (p.get(k, {}) for k in
                                     ("raw", "mmap", "bn", "bnplain", "full", "naive", "torch"))
        gb = r["bytes"] / GB
        tput = lambda d, gb=gb: f"{_s(d.get('seconds'))} ({gb / d['seconds']:.2f})" \
            if d.get("seconds") else "-"  # noqa: E731
        speed = f"{nv['seconds'] / full['seconds']:.1f}x" \
            if nv.get("seconds") and full.get("seconds") else "-"
        ratio = f"{full['seconds'] / raw['seconds']:.1f}x" \
            if raw.get("seconds") and full.get("seconds") else "-"
        lines.append(
            f"| {r['format']} | {gb:.2f} | {tput(raw)} | {_s(mm.get('seconds'))} | "
            f"{_ms(bn.get('seconds'))} / {_ms(bn.get('repeat_median'))} | "
            f"{_ms(bp.get('seconds'))} / {_ms(bp.get('repeat_median'))} | {tput(full)} | "
            f"{_mb(full.get('peak_rss_mb'))} | {_s(nv.get('seconds'))} | "
            f"{_mb(nv.get('peak_rss_mb'))} | {speed} | {ratio} | "
            f"{_ms(tc.get('seconds'))} / {_ms(tc.get('repeat_median'))} |")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Target checks; the absolute ones apply to the largest file of each format."""
    out = []
    for fmt in dict.fromkeys(r["format"] for r in rows):
        mine = sorted((r for r in rows if r["format"] == fmt), key=lambda r: r["bytes"])
        big = mine[-1]
        p = big["probes"]
        for kind, label in (("bn", "BN-only"), ("bnplain", "BN-only no-refine")):
            bn = p.get(kind, {})
            if bn.get("seconds") is not None:
                lim = BN_TARGET_MS[fmt]
                first, steady = 1000 * bn["seconds"], 1000 * bn["repeat_median"]
                verdict = "met" if first < lim else "met steady only" if steady < lim \
                    else "MISSED"
                out.append(f"{fmt}: {label} {first:.0f} ms first / {steady:.0f} ms steady at "
                           f"{big['bytes'] / GB:.1f} GB, peak RSS "
                           f"{bn.get('peak_rss_mb', 0):.0f} MB, target < {lim:.0f} ms: "
                           f"{verdict}")
            if len(mine) > 1 and bn.get("repeat_median") and \
                    mine[0]["probes"].get(kind, {}).get("repeat_median"):
                small = mine[0]["probes"][kind]["repeat_median"]
                out.append(f"{fmt}: {label} steady time {mine[0]['bytes'] / GB:.1f} GB -> "
                           f"{big['bytes'] / GB:.1f} GB: x{bn['repeat_median'] / small:.2f} "
                           "(must not grow with file size)")
        full, nv, raw = p.get("full", {}), p.get("naive", {}), p.get("raw", {})
        if full.get("seconds"):
            if full.get("peak_rss_mb") is not None:
                ok = full["peak_rss_mb"] < RSS_TARGET_MB
                out.append(f"{fmt}: full-scan peak RSS {full['peak_rss_mb']:.0f} MB, target < "
                           f"{RSS_TARGET_MB:.0f} MB: {'met' if ok else 'MISSED'}")
            if nv.get("seconds"):
                x = nv["seconds"] / full["seconds"]
                out.append(f"{fmt}: full scan {x:.1f}x faster than naive, target >= "
                           f"{SPEEDUP_TARGET:.0f}x: {'met' if x >= SPEEDUP_TARGET else 'MISSED'}")
            if raw.get("seconds"):
                x = full["seconds"] / raw["seconds"]
                out.append(f"{fmt}: full scan {x:.1f}x the raw read time, target <= "
                           f"{RAW_RATIO_TARGET:.0f}x: "
                           f"{'met' if x <= RAW_RATIO_TARGET else 'MISSED'}")
        for r in mine:
            for kind, problems in r.get("problems", {}).items():
                if problems:
                    out.append(f"{fmt} {r['bytes'] / GB:.1f} GB {kind}: WRONG RESULT: "
                               + "; ".join(problems))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    probes = [p for p in args.probes.split(",") if p]
    for f in formats:
        if f not in synth.WRITERS:
            raise SystemExit(f"unknown format {f!r}; known: {', '.join(synth.WRITERS)}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bnexporter-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    tpy = torch_python(args.torch_python)
    notes = machine_notes()
    print(f"# files in {out}; torch peer: {tpy or 'not available'}", flush=True)
    print("# " + json.dumps(notes), flush=True)
    rows: list[dict[str, Any]] = []
    created: list[Path] = []
    try:
        for size in sizes:
            for fmt in formats:
                path, model, wrote = ensure_file(fmt, size, out)
                parts = [Path(p) for p in synth.files(fmt, path)]
                created += [*parts, Path(path + ".manifest.json")]
                nbytes = sum(p.stat().st_size for p in parts)
                row: dict[str, Any] = {"format": fmt, "size_gb": size, "bytes": nbytes,
                                       "write_seconds": wrote, "probes": {}, "problems": {},
                                       "notes": []}
                print(f"# {fmt} {nbytes / GB:.2f} GB "
                      + (f"written in {wrote:.1f} s" if wrote else "reused"), flush=True)
                if fmt == "safetensors":
                    row["notes"].append(crosscheck_safetensors(path, model))
                    print(f"#   {row['notes'][-1]}", flush=True)
                reader = has_reader(fmt)
                if not reader:
                    row["notes"].append(f"bnexporter has no {fmt} reader here: bn/full skipped")
                for kind in probes:
                    if kind in ("bn", "bnplain", "full") and not reader:
                        continue
                    if kind == "torch" and (fmt != "pt" or tpy is None):
                        continue
                    python = tpy if kind == "torch" else sys.executable
                    res = run_probe(kind, fmt, path, python)
                    row["probes"][kind] = res
                    row["problems"][kind] = [res["failed"]] if "failed" in res \
                        else check(res, model)
                    shown = {k: v for k, v in res.items() if k not in ("format", "pid")}
                    print(f"#   {kind}: {json.dumps(shown)}", flush=True)
                rows.append(row)
                if not args.keep:
                    for p in (*parts, Path(path + ".manifest.json")):
                        p.unlink(missing_ok=True)
    finally:
        if not args.keep:
            for p in created:
                p.unlink(missing_ok=True)
            if not args.out:
                shutil.rmtree(out, ignore_errors=True)
    notes["loadavg_after"] = os.getloadavg()
    print()
    print(table(rows))
    print()
    for line in verdicts(rows):
        print("- " + line)
    for r in rows:
        for n in r["notes"]:
            print(f"- {r['format']} {r['bytes'] / GB:.1f} GB: {n}")
    print(f"- load average before / after: {notes['loadavg']} / {notes['loadavg_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": notes, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
