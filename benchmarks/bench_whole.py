"""Whole-process timings, round-robin: bnexporter's BN-only and full scans against the
interpreter, numpy's import, ``cat`` and the library peers (peers.py).

    python benchmarks/bench_whole.py FILE [FILE ...] [--rounds 5] [--fw PYTHON]
                                     [--kinds pass,numpy,cat,bn,bnplain,full,peer]
                                     [--json OUT]

Each round runs every command once, in order, each in a fresh process (so a load
change hits all commands of a round alike); a cell is the median wall time over the
rounds and the median of the per-round ratios against ``numpy`` (``python -c 'import
numpy'``) or ``cat`` (for the full scan). CPU is user + sys of the child (``wait4``),
peak RSS its ``ru_maxrss`` (this runner imports nothing heavy: ~10 MB of it may be
the runner's own, inherited through vfork). bnexporter is run as ``python -m
bnexporter scan FILE --bn-only [--no-refine]``; its answer (layers, dead) is
checked against the peer's. The format comes from the file name (synth.py's suffixes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = {".safetensors": "safetensors", ".pt": "torch"}
# children get cached bytecode, as an installed package has (pip compiles on install):
# with PYTHONDONTWRITEBYTECODE (set in this environment) every start would compile every
# bnexporter module again, ~150 ms that no deployment pays
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV.setdefault("PYTHONPYCACHEPREFIX", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "bnexporter-bench-pycache"))


def run(cmd: list[str], stdout: int | None = subprocess.PIPE) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, cwd=REPO, env=ENV)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    # communicate() reaped the child: its rusage comes from RUSAGE_CHILDREN deltas
    return {"wall": wall, "rc": proc.returncode, "out": out or b"", "err": err}


def timed(cmd: list[str], quiet: bool) -> dict[str, Any]:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = run(cmd, subprocess.DEVNULL if quiet else subprocess.PIPE)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: take it per command below
    return r


def peak_rss(cmd: list[str]) -> float:
    """The child's own peak RSS (VmHWM via /usr/bin/time when there, else ru_maxrss)."""
    if os.access("/usr/bin/time", os.X_OK):
        p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
        return int(p.stderr.strip().splitlines()[-1]) / 1024.0
    return float("nan")


def commands(path: str, kinds: list[str], fw: str | None) -> dict[str, list[str]]:
    py = sys.executable
    suffix = Path(path).suffix
    files = [path, path[: -len(".index")] + ".data-00000-of-00001"] if suffix == ".index" \
        else [path]
    # timed with the default text output; the answer is checked from one extra, untimed
    # ``--json`` run (``--json`` adds the prune plan, ~50 ms for 155 layers; it cost
    # ~0.3 s, an HDF5 file opened a second time, before issue 16 part 4)
    scan = [py, "-m", "bnexporter", "scan", path]
    table = {
        "pass": [py, "-c", "pass"],
        "numpy": [py, "-c", "import numpy"],
        "cat": ["cat", *files],
        "bn": [*scan, "--bn-only"],
        "bnplain": [*scan, "--bn-only", "--no-refine"],
        "full": scan,
    }
    if fw and suffix in PEER:
        table["peer"] = [fw, str(HERE / "peers.py"), PEER[suffix], path]
    return {k: v for k, v in table.items() if k in kinds}


def answer(kind: str, out: bytes) -> dict[str, Any] | None:
    if kind not in ("bn", "bnplain", "full", "peer") or not out.strip():
        return None
    d = json.loads(out)
    if kind == "peer":
        return d
    r = d["checkpoints"][0] if "checkpoints" in d else d
    s = r.get("summary") or {}
    return {"bn_layers": s.get("bn_layers"), "dead": s.get("dead"),
            "would_be_dead": s.get("would_be_dead"), "nonfinite": s.get("nonfinite"),
            "error": r.get("error")}


def bench(path: str, kinds: list[str], rounds: int, fw: str | None) -> dict[str, Any]:
    cmds = commands(path, kinds, fw)
    load0 = os.getloadavg()
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in cmds}
    for k in ("cat",):  # warm the page cache
        if k in cmds:
            run(cmds[k], subprocess.DEVNULL)
    for _ in range(rounds):
        for k, cmd in cmds.items():
            r = timed(cmd, quiet=True)
            if r["rc"] not in (0, 1):
                raise SystemExit(f"{' '.join(cmd)}: exit {r['rc']}: {r['err'][-500:]!r}")
            rows[k].append(r)
    answers = {k: answer(k, run([*cmd, "--json"] if k != "peer" else cmd)["out"])
               for k, cmd in cmds.items() if k in ("bn", "bnplain", "full", "peer")}
    res: dict[str, Any] = {"path": path, "bytes": sum(os.path.getsize(f) for f in
                                                      cmds.get("cat", [path])[1:] or [path]),
                           "loadavg_before": load0, "kinds": {}}
    for k, rs in rows.items():
        ref = "cat" if k in ("full", "cat") and "cat" in rows else "numpy"
        ratios = [r["wall"] / rows[ref][i]["wall"] for i, r in enumerate(rs)] \
            if ref in rows else []
        res["kinds"][k] = {
            "wall": statistics.median(r["wall"] for r in rs),
            "cpu": statistics.median(r["cpu"] for r in rs),
            "ref": ref, "x_ref": statistics.median(ratios) if ratios else None,
            "answer": answers.get(k),
            "peak_rss_mb": peak_rss(cmds[k]) if k != "cat" else None,
        }
    res["loadavg_after"] = os.getloadavg()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fw", default="/work/venv-fw/bin/python" if os.access(
        "/work/venv-fw/bin/python", os.X_OK) else None, help="python with torch/safetensors")
    ap.add_argument("--kinds", default="pass,numpy,cat,bn,bnplain,full,peer")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    results = []
    print("| file | GB | command | wall s | x ref | CPU s | peak RSS MB | answer | load before "
          "-> after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.files:
        res = bench(path, kinds, args.rounds, args.fw)
        results.append(res)
        la = f"{res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}"
        for k, v in res["kinds"].items():
            x = "" if v["x_ref"] is None else f"x{v['x_ref']:.2f} {v['ref']}"
            a = v["answer"] or {}
            ans = "" if not a else f"{a.get('bn_layers')} BN / {a.get('dead')} dead" + (
                f" ({a['would_be_dead']} would-be)" if a.get("would_be_dead") else "")
            rss = "" if v["peak_rss_mb"] is None else f"{v['peak_rss_mb']:.0f}"
            print(f"| {Path(path).name} | {res['bytes'] / 1e9:.2f} | {k} | {v['wall']:.3f} | "
                  f"{x} | {v['cpu']:.3f} | {rss} | {ans} | {la} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
