"""Benchmark the daemon (`bnexporter run`) end to end: latency, scrapes under load, idle cost.

    python benchmarks/bench_daemon.py [--quick] [--parts latency,scrape,idle] [--json FILE]

Three parts, each against a real `python -m bnexporter run` subprocess listening on
127.0.0.1 (port picked by the kernel), on folders in a new temporary directory that is
deleted at the end (the daemons are stopped with SIGTERM, then killed if needed):

- latency: time from a checkpoint's completion (rename into place; or written in place,
  clock at close) to its step being served on /metrics, with inotify and with polling
  (poll_interval 1 s), each with the default settle period (2 s) and a short one (0.5 s);
- scrape: /metrics latency (gzip, as Prometheus asks) for N models x 150 BN layers,
  while idle and while the daemon runs a full scan of one more ~4 GB checkpoint;
- idle: CPU (% of one core, utime+stime of the daemon's process tree) and RSS / PSS
  (summed over the tree) with 1,000 watched model folders under a `{model}` root, with
  inotify and with polling (default poll interval 10 s), no scrapes during the window.

Needs bnexporter's runtime dependencies (numpy, h5py, pyyaml, watchdog, ...). Peak disk
use is the big checkpoint (4 GB; 1 GB with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import synth  # noqa: E402

GB = 1_000_000_000
_LISTEN = re.compile(r"listening on (http://\S+/) ")
SCRAPE_P99_TARGET_MS = 100.0
IDLE_CPU_TARGET_PCT = 1.0
IDLE_RSS_TARGET_MB = 150.0


# -- the daemon under test ------------------------------------------------------------

class Daemon:
    """One `bnexporter run --config` subprocess; stopped and reaped by ``stop``."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        import yaml

        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "log_level": "info",
                                       **config}))
        self.log_path = workdir / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "bnexporter", "run",
                                      "--config", str(cfg)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        self.host, self.port = self._wait_listening()

    def _wait_listening(self) -> tuple[str, int]:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            m = _LISTEN.search(self.log_path.read_text(errors="replace"))
            if m:
                u = urlsplit(m.group(1))
                return u.hostname or "127.0.0.1", u.port or 0
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("daemon did not start:\n" + self.tail())

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def get(self, path: str, gzip: bool = False) -> tuple[float, bytes]:
        """One request on a new connection; seconds from connect to the last body byte."""
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("GET", path, headers={"Accept-Encoding": "gzip"} if gzip else {})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        finally:
            conn.close()
        return time.perf_counter() - t0, body

    def metric(self, name: str) -> dict[str, float]:
        """Samples of one metric family, keyed by their label string (filtered scrape)."""
        _, body = self.get(f"/metrics?name%5B%5D={name}")
        out = {}
        for line in body.decode().splitlines():
            if line.startswith(name):
                key, _, value = line.rpartition(" ")
                out[key[len(name):]] = float(value)
        return out

    def successes(self) -> int:
        return int(self.metric("bnexporter_analyses_total").get('{outcome="success"}', 0))

    def wait_successes(self, n: int, timeout: float) -> float:
        t0 = time.monotonic()
        while self.successes() < n:
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + self.tail())
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"only {self.successes()} of {n} analyses after {timeout} s")
            time.sleep(0.5)
        return time.monotonic() - t0

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# -- /proc ---------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()   # fields from 3 (state) on


def proc_tree(root: int) -> list[int]:
    """``root`` and all its descendants now."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError):
                children.setdefault(int(_stat_fields(int(d))[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (+ reaped children's) of the processes, in seconds."""
    ticks = 0
    for p in pids:
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        ticks += sum(int(x) for x in f[11:15])   # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_mb(pids: list[int]) -> tuple[float, float | None]:
    """Summed RSS and PSS (None when smaps_rollup is unavailable) of the processes."""
    rss, pss, have_pss = 0.0, 0.0, True
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                rss += next((int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")), 0)
        except OSError:
            continue
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                pss += next((int(ln.split()[1]) for ln in fh if ln.startswith("Pss:")), 0)
        except OSError:
            have_pss = False
    return rss / 1024, (pss / 1024 if have_pss else None)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- checkpoints ---------------------------------------------------------------------

def templates(base: Path) -> dict[str, bytes]:
    """The small checkpoints, written once and copied: 150 BN layers (Keras 2 .h5) and
    8 BN layers (safetensors, for the 1,000-folder idle test)."""
    content = synth.Content()
    out = {}
    for key, fmt, n_bn in (("h5_150", "h5", 150), ("st_8", "safetensors", 8)):
        path = base / f"template-{key}{synth.SUFFIX[fmt]}"
        synth.WRITERS[fmt](str(path), synth.bn_chain(n_bn), content)
        out[key] = path.read_bytes()
        path.unlink()
    return out


# -- part 1: completion -> served ------------------------------------------------------

def served_step(d: Daemon, model: str) -> float:
    return d.metric("bnexporter_model_checkpoint_step").get(f'{{model="{model}"}}', -1.0)


def latency_part(base: Path, ckpt: bytes, reps: int) -> list[dict[str, Any]]:
    rows = []
    rng = random.Random(1)
    for watch, settle in (("inotify", 2.0), ("inotify", 0.5), ("poll", 2.0), ("poll", 0.5)):
        work = base / f"latency-{watch}-{settle}"
        folder = work / "model"
        folder.mkdir(parents=True)
        d = Daemon(work, {"watch": watch, "settle_seconds": settle, "poll_interval": 1,
                          "models": [{"name": "m", "path": str(folder)}]})
        try:
            time.sleep(1.5)   # observer up
            step = 0
            for how in ("rename", "in place"):
                lat, dur = [], []
                for _ in range(reps):
                    step += 1
                    final = folder / f"ckpt-{step}.h5"
                    if how == "rename":
                        tmp = folder / f"ckpt-{step}.h5.tmp"     # ignored by the daemon
                        tmp.write_bytes(ckpt)
                        t0 = time.monotonic()
                        os.rename(tmp, final)
                    else:   # a writer streaming the file in 4 pieces, 50 ms apart
                        with open(final, "wb") as fh:
                            q = len(ckpt) // 4 + 1
                            for i in range(0, len(ckpt), q):
                                fh.write(ckpt[i:i + q])
                                fh.flush()
                                time.sleep(0.05)
                        t0 = time.monotonic()
                    while served_step(d, "m") < step:
                        if time.monotonic() - t0 > 120:
                            raise RuntimeError(f"step {step} not served after 120 s\n"
                                               + d.tail())
                        time.sleep(0.02)
                    lat.append(time.monotonic() - t0)
                    dur.append(d.metric("bnexporter_model_analysis_duration_seconds")
                               .get('{model="m"}', float("nan")))
                    for old in folder.glob("ckpt-*.h5"):
                        if old != final:
                            old.unlink()
                    time.sleep(rng.uniform(0.3, 1.3))   # vary the phase against the poller
                rows.append({"watch": watch, "settle_seconds": settle, "poll_interval": 1,
                             "how": how, "reps": reps, "min": min(lat),
                             "median": statistics.median(lat), "max": max(lat),
                             "analysis_median": statistics.median(dur), "all": lat})
                print(f"# latency {watch} settle {settle} {how}: "
                      + " ".join(f"{x:.2f}" for x in lat), flush=True)
        finally:
            d.stop()
            shutil.rmtree(work, ignore_errors=True)
    return rows


# -- part 2: scrapes while a big checkpoint is analysed --------------------------------

def scrape_loop(d: Daemon, rate: float, seconds: float | None, done=None
                ) -> tuple[list[float], int]:
    """Scrape /metrics (gzip) at ``rate``/s for ``seconds`` or until ``done()``; missed
    slots are skipped, not bunched. ``done`` is checked about once a second, unmeasured."""
    lat: list[float] = []
    size = 0
    start = time.monotonic()
    nxt, check = start, start + 1.0
    while True:
        now = time.monotonic()
        if seconds is not None and now - start >= seconds:
            break
        if done is not None and now >= check:
            if done():
                break
            check = time.monotonic() + 1.0
        if now < nxt:
            time.sleep(nxt - now)
        t, body = d.get("/metrics", gzip=True)
        lat.append(t)
        size = len(body)
        nxt += 1.0 / rate
        nxt = max(nxt, time.monotonic())
    return lat, size


def _lat_summary(lat: list[float]) -> dict[str, Any]:
    ms = [1000 * x for x in lat]
    return {"n": len(ms), "p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "max": max(ms),
            "over_100ms": sum(x > 100 for x in ms), "all_ms": [round(x, 2) for x in ms]}


def _short(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "all_ms"}


def scrape_part(base: Path, ckpt: bytes, models: int, big_gb: float, idle_seconds: float
                ) -> dict[str, Any]:
    work = base / "scrape"
    root, staging = work / "models", work / "staging"
    staging.mkdir(parents=True)
    for i in range(models):
        (root / f"m{i:03d}").mkdir(parents=True)
        (root / f"m{i:03d}" / "ckpt-1.h5").write_bytes(ckpt)
    d = Daemon(work, {"watch": "inotify", "models": [{"path": str(root / "{model}")}]})
    out: dict[str, Any] = {"models": models, "bn_layers_per_model": 150, "big_gb": big_gb}
    try:
        out["initial_analysis_seconds"] = d.wait_successes(models, timeout=1800)
        time.sleep(2)
        d.get("/metrics", gzip=True)          # the first scrape after the last change
        lat, size = scrape_loop(d, 10, idle_seconds)
        out["idle"] = _lat_summary(lat)
        out["gzip_bytes"] = size
        _, plain = d.get("/metrics")
        out["plain_bytes"] = len(plain)
        out["samples"] = sum(1 for ln in plain.splitlines() if ln and not ln.startswith(b"#"))
        print(f"# scrape idle: {json.dumps(_short(out['idle']))}", flush=True)

        (root / "big").mkdir()
        t0 = time.monotonic()
        tmp = staging / "ckpt-1.safetensors"
        synth.write("safetensors", str(tmp), int(big_gb * GB))
        out["big_bytes"] = tmp.stat().st_size
        out["big_write_seconds"] = time.monotonic() - t0
        time.sleep(1)
        os.rename(tmp, root / "big" / "ckpt-1.safetensors")

        def big_done() -> bool:
            return '{model="big"}' in d.metric("bnexporter_model_last_analysis_timestamp_seconds")

        t0 = time.monotonic()
        lat, _ = scrape_loop(d, 10, None, big_done)
        out["busy_wall_seconds"] = time.monotonic() - t0
        out["busy"] = _lat_summary(lat)
        out["big_analysis_seconds"] = d.metric(
            "bnexporter_model_analysis_duration_seconds").get('{model="big"}')
        print(f"# scrape during big analysis: {json.dumps(_short(out['busy']))}", flush=True)
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


# -- part 3: idle cost with 1,000 model folders --------------------------------------

def idle_part(base: Path, ckpt: bytes, models: int, window: float) -> list[dict[str, Any]]:
    rows = []
    for watch in ("inotify", "poll"):
        work = base / f"idle-{watch}"
        root = work / "models"
        for i in range(models):
            (root / f"m{i:04d}").mkdir(parents=True)
            (root / f"m{i:04d}" / "ckpt-1.safetensors").write_bytes(ckpt)
        d = Daemon(work, {"watch": watch, "models": [{"path": str(root / "{model}")}]})
        try:
            startup = d.wait_successes(models, timeout=1800)
            time.sleep(10)   # let the last jobs and their children finish
            pids = proc_tree(d.proc.pid)
            c0, t0 = cpu_seconds(pids), time.monotonic()
            rss_max = 0.0
            pss_max: float | None = None
            while time.monotonic() - t0 < window:
                time.sleep(min(5.0, window - (time.monotonic() - t0)))
                rss, pss = memory_mb(proc_tree(d.proc.pid))
                rss_max = max(rss_max, rss)
                pss_max = pss if pss_max is None or pss is None else max(pss_max, pss)
            pids_end = proc_tree(d.proc.pid)
            cpu = cpu_seconds(pids_end) - c0
            elapsed = time.monotonic() - t0
            rss, pss = memory_mb(pids_end)
            served = d.metric("bnexporter_models_watched").get("", float("nan"))
            rows.append({"watch": watch, "models": models, "models_watched": served,
                         "startup_analysis_seconds": startup, "window_seconds": elapsed,
                         "cpu_pct": 100 * cpu / elapsed, "rss_mb": rss, "pss_mb": pss,
                         "rss_max_mb": rss_max, "pss_max_mb": pss_max,
                         "processes": len(pids_end),
                         "processes_changed": sorted(pids) != sorted(pids_end)})
            print(f"# idle {watch}: {json.dumps(rows[-1])}", flush=True)
        finally:
            d.stop()
            shutil.rmtree(work, ignore_errors=True)
    return rows


# -- report --------------------------------------------------------------------------

def report(res: dict[str, Any]) -> str:
    lines = []
    if "latency" in res:
        lines += ["completion -> served on /metrics (s), 150-BN-layer .h5, "
                  "poll_interval 1 s for polling",
                  "| watch | settle_seconds | checkpoint | n | min | median | max | "
                  "analysis s (median) |", "|---|---|---|---|---|---|---|---|"]
        for r in res["latency"]:
            lines.append(f"| {r['watch']} | {r['settle_seconds']:g} | {r['how']} | {r['reps']} "
                         f"| {r['min']:.2f} | {r['median']:.2f} | {r['max']:.2f} | "
                         f"{r['analysis_median']:.2f} |")
        lines.append("")
    if "scrape" in res:
        s = res["scrape"]
        lines += [f"/metrics latency (ms), {s['models']} models x 150 BN layers, "
                  f"{s.get('samples', 0)} samples, {s.get('plain_bytes', 0) / 1e6:.1f} MB "
                  f"({s.get('gzip_bytes', 0) / 1e6:.2f} MB gzip), 10 scrapes/s, gzip",
                  "| while | scrapes | p50 | p99 | max | > 100 ms |", "|---|---|---|---|---|---|"]
        for key, label in (("idle", "idle"), ("busy", f"full scan of a "
                                                      f"{s.get('big_bytes', 0) / GB:.2f} GB "
                                                      "safetensors")):
            if key in s:
                x = s[key]
                lines.append(f"| {label} | {x['n']} | {x['p50']:.1f} | {x['p99']:.1f} | "
                             f"{x['max']:.1f} | {x['over_100ms']} |")
        if "busy" in s:
            ok = s["busy"]["p99"] < SCRAPE_P99_TARGET_MS
            lines.append(f"\nbig analysis {s.get('big_analysis_seconds') or 0:.1f} s "
                         f"(scraped for {s['busy_wall_seconds']:.1f} s); initial analysis of "
                         f"{s['models']} models {s['initial_analysis_seconds']:.1f} s; "
                         f"target p99 < {SCRAPE_P99_TARGET_MS:.0f} ms: "
                         f"{'met' if ok else 'MISSED'}")
        lines.append("")
    if "idle" in res:
        lines += ["idle cost, daemon process tree, no scrapes",
                  "| watch | model folders | window s | CPU % of a core | RSS MB (max) | "
                  "PSS MB (max) | processes | start-up analysis s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["idle"]:
            pss = "-" if r["pss_mb"] is None else f"{r['pss_mb']:.0f} ({r['pss_max_mb']:.0f})"
            lines.append(f"| {r['watch']} | {r['models']} | {r['window_seconds']:.0f} | "
                         f"{r['cpu_pct']:.2f} | {r['rss_mb']:.0f} ({r['rss_max_mb']:.0f}) | "
                         f"{pss} | {r['processes']} | {r['startup_analysis_seconds']:.0f} |")
        for r in res["idle"]:
            cpu_ok = r["cpu_pct"] < IDLE_CPU_TARGET_PCT
            rss_ok = r["rss_max_mb"] < IDLE_RSS_TARGET_MB
            lines.append(f"- {r['watch']}: CPU < {IDLE_CPU_TARGET_PCT:g} %: "
                         f"{'met' if cpu_ok else 'MISSED'}; RSS < {IDLE_RSS_TARGET_MB:.0f} MB: "
                         f"{'met' if rss_ok else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 repetitions, 1 GB big file, 15 s idle window, 5 s idle scrapes")
    ap.add_argument("--parts", default="latency,scrape,idle")
    ap.add_argument("--reps", type=int, help="repetitions per latency case (default 7)")
    ap.add_argument("--big-gb", type=float, help="big checkpoint size in GB (default 4)")
    ap.add_argument("--scrape-models", type=int, default=100)
    ap.add_argument("--idle-models", type=int, default=1000)
    ap.add_argument("--idle-window", type=float, help="seconds (default 60)")
    ap.add_argument("--json", help="also write the measurements to this file")
    args = ap.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds through the finally blocks: daemons stopped,
    # temporary folders removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reps = args.reps or (3 if args.quick else 7)
    big_gb = args.big_gb or (1.0 if args.quick else 4.0)
    window = args.idle_window or (15.0 if args.quick else 60.0)
    parts = [p for p in args.parts.split(",") if p]
    res: dict[str, Any] = {"loadavg_start": os.getloadavg(), "cores": os.cpu_count(),
                           "python": sys.version.split()[0]}
    print(f"# load average at start: {res['loadavg_start']}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="bnexporter-bench-daemon-"))
    try:
        tpl = templates(base)
        if "latency" in parts:
            res["latency"] = latency_part(base, tpl["h5_150"], reps)
        if "scrape" in parts:
            res["scrape"] = scrape_part(base, tpl["h5_150"], args.scrape_models, big_gb,
                                        5.0 if args.quick else 10.0)
        if "idle" in parts:
            res["idle"] = idle_part(base, tpl["st_8"], args.idle_models, window)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    print()
    print(report(res))
    print(f"\nload average start / end: {res['loadavg_start']} / {res['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
