"""Soak: run the real daemon for a while under a steady stream of checkpoints and
scrapes, and watch its resources for drift.

    python benchmarks/soak.py --minutes 10 --models 50 --rate 1
    python benchmarks/soak.py --minutes 2 --models 20 --rate 3 --json soak.json

``--models`` training runs write checkpoints into ``ROOT/<run>/`` (one
``{model}`` template watches them all), ``--rate`` checkpoints per second
overall, round-robin, each with the demo writer (a Keras 2 .h5 whose channels
die over the steps); each run keeps its newest ``--keep`` files and deletes the
rest, like a CheckpointManager. A scraper asks for ``/metrics`` every
``--scrape-interval`` seconds, as Prometheus would. Every ``--sample`` seconds
the daemon's RSS, open file descriptors, threads and child processes are read
from /proc, with its analysis counters.

Printed: the samples, then drift = last sample - the first sample after the
``--warmup`` (the first analyses, imports and caches are not a leak), the RSS
slope over the post-warm-up samples, scrape latencies and how far the exported
steps lag behind the writer. ``--json FILE`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bnexporter.daemon.demo import write_checkpoint

STEP = 100
_LISTEN = re.compile(r"listening on (http://\S+/) ")
_SAMPLE = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')


@dataclass
class Sample:
    t: float          # seconds since start
    rss_mb: float     # daemon process
    fds: int
    threads: int
    children: int     # processes below the daemon (forkserver, analyses, tracker)
    children_rss_mb: float
    analyses: int     # bnexporter_analyses_total{outcome="success"}
    errors: int       # sum of bnexporter_errors_total
    pending: int      # bnexporter_queue_pending
    analysis_procs: int = 0  # live analysis processes (children of the forkserver)
    helper_procs: int = 0    # live direct children: forkserver, resource tracker


@dataclass
class Result:
    args: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    written: int = 0
    deleted: int = 0
    scrapes: int = 0
    scrape_failures: int = 0
    scrape_ms: dict[str, float] = field(default_factory=dict)
    lag_steps: dict[str, float] = field(default_factory=dict)
    models_exported: int = 0
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def _proc_tree(pid: int) -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            ppid = int(data[data.rfind(b")") + 2:].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"VmRSS:\s+(\d+)", text)
    return int(m.group(1)) / 1024 if m else 0.0


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (an exited analysis not reaped yet)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:data.rfind(b")") + 3] != b"Z"


def _is_forkserver(pid: int) -> bool:
    try:
        return b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def process_roles(pid: int) -> tuple[int, int]:
    """(helpers, analyses) of the daemon ``pid``, counting live processes only.

    Helpers are its direct children (the forkserver and the resource tracker),
    which live as long as the daemon; analyses are the forkserver's children.
    Exited processes not reaped yet are not counted."""
    tree = _proc_tree(pid)
    helpers = [c for c in tree.get(pid, []) if _alive(c)]
    servers = [c for c in helpers if _is_forkserver(c)]
    return len(helpers), sum(1 for s in servers for c in tree.get(s, []) if _alive(c))


def measure(pid: int) -> tuple[float, int, int, int, float]:
    """RSS (MB), fds, threads, descendants and their total RSS (MB) of ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    tree = _proc_tree(pid)
    below, stack = [], list(tree.get(pid, []))
    while stack:
        p = stack.pop()
        below.append(p)
        stack.extend(tree.get(p, []))
    return _rss_mb(pid), fds, threads, len(below), sum(_rss_mb(p) for p in below)


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


class Writer(threading.Thread):
    """Round-robin checkpoints over the runs at ``rate`` per second, keeping ``keep``."""

    def __init__(self, root: Path, runs: list[str], rate: float, keep: int):
        super().__init__(name="soak-writer", daemon=True)
        self.root, self.runs, self.rate, self.keep = root, runs, rate, keep
        self.stop = threading.Event()
        self.steps = dict.fromkeys(runs, 0)
        self.written = self.deleted = 0
        self._files: dict[str, list[Path]] = {r: [] for r in runs}

    def run(self) -> None:
        i = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            run = self.runs[i % len(self.runs)]
            i += 1
            self.steps[run] += STEP
            path = self.root / run / f"ckpt-{self.steps[run]}.h5"
            write_checkpoint(str(path), self.steps[run], seed=self.runs.index(run))
            self.written += 1
            files = self._files[run]
            files.append(path)
            while len(files) > self.keep:
                with contextlib.suppress(OSError):
                    files.pop(0).unlink()
                    self.deleted += 1
            next_at += 1.0 / self.rate
            self.stop.wait(max(0.0, next_at - time.monotonic()))


class Scraper(threading.Thread):
    def __init__(self, url: str, interval: float):
        super().__init__(name="soak-scraper", daemon=True)
        self.url, self.interval = url, interval
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.failures = 0
        self.last: dict[tuple[str, str], float] = {}

    def scrape(self) -> dict[tuple[str, str], float]:
        t0 = time.monotonic()
        with urllib.request.urlopen(self.url + "metrics", timeout=10) as resp:
            text = resp.read().decode()
        self.latencies.append(time.monotonic() - t0)
        return parse_metrics(text)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.last = self.scrape()
            except OSError:
                self.failures += 1


def _config(root: Path, isolation: str, poll: bool) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "log_level": "info", "settle_seconds": 1,
            "poll_interval": 2, "rescan_interval": 60, "isolation": isolation,
            "models": [{"path": str(root / "{model}"), "watch": "poll" if poll else "auto"}]}


def run(minutes: float, models: int, rate: float, keep: int = 3, sample: float = 5.0,
        scrape_interval: float = 1.0, warmup: float | None = None,
        isolation: str = "process", poll: bool = False, workdir: str | None = None,
        progress: bool = True) -> Result:
    """Run one soak; the daemon is stopped (SIGTERM) at the end."""
    import yaml

    duration = minutes * 60
    warmup = min(60.0, duration / 4) if warmup is None else warmup
    res = Result(args={"minutes": minutes, "models": models, "rate": rate, "keep": keep,
                       "sample": sample, "scrape_interval": scrape_interval,
                       "warmup": warmup, "isolation": isolation, "poll": poll})
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bnexporter-soak-"))
    root = base / "runs"
    root.mkdir(parents=True, exist_ok=True)
    runs = [f"run{i:03d}" for i in range(models)]
    for r in runs:
        (root / r).mkdir(exist_ok=True)
    cfg = base / "soak.yaml"
    cfg.write_text(yaml.safe_dump(_config(root, isolation, poll)))
    log_path = base / "daemon.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "bnexporter", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    writer = scraper = None
    try:
        url = _wait_url(log_path, proc)
        writer = Writer(root, runs, rate, keep)
        scraper = Scraper(url, scrape_interval)
        start = time.monotonic()
        writer.start()
        scraper.start()
        next_sample = start
        while time.monotonic() - start < duration:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}")
            now = time.monotonic()
            if now >= next_sample:
                res.samples.append(_sample(proc.pid, scraper, now - start))
                if progress:
                    _print_sample(res.samples[-1], header=len(res.samples) == 1)
                next_sample += sample
            time.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
        writer.stop.set()
        writer.join(10)
        time.sleep(3)  # let the last checkpoints be analysed
        res.samples.append(_sample(proc.pid, scraper, time.monotonic() - start))
        if progress:
            _print_sample(res.samples[-1], header=False)
        final = scraper.scrape()
        lags = [writer.steps[r] - final.get(("bnexporter_model_checkpoint_step",
                                             f'model="{r}"'), 0.0) for r in runs]
        res.lag_steps = {"max": max(lags), "mean": statistics.fmean(lags)}
        res.models_exported = sum(1 for r in runs if ("bnexporter_model_checkpoint_step",
                                                      f'model="{r}"') in final)
        res.written, res.deleted = writer.written, writer.deleted
    finally:
        for t in (writer, scraper):
            if t is not None:
                t.stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                res.exit_code = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                res.exit_code = proc.wait(5)
        else:
            res.exit_code = proc.returncode
        log.close()
    if scraper is not None:
        lat = sorted(scraper.latencies)
        res.scrapes, res.scrape_failures = len(lat), scraper.failures
        if lat:
            res.scrape_ms = {"p50": 1000 * lat[len(lat) // 2],
                             "p99": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                             "max": 1000 * lat[-1]}
    res.summary = summarise(res.samples, warmup)
    if workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return res


def _wait_url(log_path: Path, proc: subprocess.Popen[bytes]) -> str:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        m = _LISTEN.search(log_path.read_text(errors="replace"))
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    raise RuntimeError("daemon did not start")


def _sample(pid: int, scraper: Scraper, t: float) -> Sample:
    rss, fds, threads, children, children_rss = measure(pid)
    helpers, running = process_roles(pid)
    try:
        m = scraper.scrape()
    except OSError:
        m = scraper.last
    errors = sum(v for (n, _), v in m.items() if n == "bnexporter_errors_total")
    return Sample(round(t, 1), round(rss, 1), fds, threads, children, round(children_rss, 1),
                  int(m.get(("bnexporter_analyses_total", 'outcome="success"'), 0)),
                  int(errors), int(m.get(("bnexporter_queue_pending", ""), 0)), running, helpers)


def _print_sample(s: Sample, header: bool) -> None:
    if header:
        print(f"{'t/s':>7} {'RSS/MB':>7} {'fds':>4} {'thr':>4} {'kids':>4} {'kidsMB':>7} "
              f"{'analysed':>8} {'errors':>6} {'pending':>7}", flush=True)
    print(f"{s.t:7.0f} {s.rss_mb:7.1f} {s.fds:4d} {s.threads:4d} {s.children:4d} "
          f"{s.children_rss_mb:7.1f} {s.analyses:8d} {s.errors:6d} {s.pending:7d}", flush=True)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second)."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def summarise(samples: list[Sample], warmup: float) -> dict[str, Any]:
    if not samples:
        return {}
    after = [s for s in samples if s.t >= warmup] or samples[-1:]
    base, last = after[0], samples[-1]
    return {
        "rss_start_mb": samples[0].rss_mb, "rss_after_warmup_mb": base.rss_mb,
        "rss_end_mb": last.rss_mb, "rss_max_mb": max(s.rss_mb for s in samples),
        "rss_drift_mb": round(last.rss_mb - base.rss_mb, 1),
        "rss_slope_mb_per_hour": round(3600 * _slope([(s.t, s.rss_mb) for s in after]), 1),
        "fds_after_warmup": base.fds, "fds_end": last.fds,
        "fds_max": max(s.fds for s in samples),
        "threads_after_warmup": base.threads, "threads_end": last.threads,
        "threads_max": max(s.threads for s in samples),
        "children_after_warmup": base.children, "children_end": last.children,
        "children_max": max(s.children for s in samples),
        # the long-lived helpers (forkserver, resource tracker) apart from the analyses
        "helpers_after_warmup": base.helper_procs, "helpers_end": last.helper_procs,
        "analysis_procs_end": last.analysis_procs,
        "analysis_procs_max": max(s.analysis_procs for s in samples),
        "analyses": last.analyses, "errors": last.errors,
        "duration_s": last.t,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--rate", type=float, default=1.0, help="checkpoints per second, overall")
    ap.add_argument("--keep", type=int, default=3, help="checkpoints kept per run")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--scrape-interval", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before the baseline sample (default min(60, 1/4 run))")
    ap.add_argument("--isolation", choices=("process", "thread"), default="process")
    ap.add_argument("--poll", action="store_true", help="watch by polling, not inotify")
    ap.add_argument("--workdir", help="keep the files (and daemon.log) here")
    ap.add_argument("--json", metavar="FILE", help="write samples and summary here")
    args = ap.parse_args(argv)
    res = run(args.minutes, args.models, args.rate, args.keep, args.sample,
              args.scrape_interval, args.warmup, args.isolation, args.poll, args.workdir)
    s = res.summary
    print(f"\n{res.written} checkpoints written ({res.deleted} deleted), "
          f"{s['analyses']} analysed, {s['errors']} given up, {res.models_exported}/"
          f"{args.models} runs exported, step lag max {res.lag_steps.get('max', 0):.0f} "
          f"(mean {res.lag_steps.get('mean', 0):.0f}; {STEP} per checkpoint)")
    print(f"RSS MB: start {s['rss_start_mb']}, after warm-up {s['rss_after_warmup_mb']}, "
          f"end {s['rss_end_mb']}, max {s['rss_max_mb']}; drift {s['rss_drift_mb']:+} MB, "
          f"slope {s['rss_slope_mb_per_hour']:+} MB/h")
    print(f"fds {s['fds_after_warmup']} -> {s['fds_end']} (max {s['fds_max']}); threads "
          f"{s['threads_after_warmup']} -> {s['threads_end']} (max {s['threads_max']}); "
          f"child processes {s['children_after_warmup']} -> {s['children_end']} "
          f"(max {s['children_max']})")
    print(f"scrapes: {res.scrapes} ({res.scrape_failures} failed), latency ms "
          + ", ".join(f"{k} {v:.1f}" for k, v in res.scrape_ms.items()))
    print(f"daemon exit status after SIGTERM: {res.exit_code}")
    if args.json:
        doc = asdict(res)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0 if res.exit_code == 0 and res.scrape_failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
