"""Head series of a real Prometheus scraping ``bnexporter demo`` (issue 14's acceptance).

    python benchmarks/head_series.py --minutes 30 [--interval 1] [--scrape 1] [--warmup 2]

Starts the demo (a checkpoint every ``--interval`` seconds) and a Prometheus
(``/usr/bin/prometheus``) that scrapes only it, then samples Prometheus's own
``prometheus_tsdb_head_series`` and ``count({job="bnexporter"})`` every few seconds.
Head series never shrink between head compactions (2 h), so any series that appears
per checkpoint (a path or step in a label) shows as growth. Exit 1 unless the head is
flat after the warm-up. ``--json FILE`` keeps the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _query(prom: str, expr: str) -> float | None:
    try:
        doc = json.loads(_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
    except OSError:
        return None
    result = doc.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def _head_series(prom: str) -> float | None:
    try:
        text = _get(f"{prom}/metrics")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("prometheus_tsdb_head_series "):
            return float(line.split()[1])
    return None


def _wait(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            _get(url, 2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


@dataclass
class Run:
    seconds: float
    interval: float
    scrape: float
    warmup: float
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)
    # (seconds since start, head series, bnexporter series, checkpoints analysed)

    def after_warmup(self) -> list[tuple[float, float, float, float]]:
        return [s for s in self.samples if s[0] >= self.warmup]

    @property
    def flat(self) -> bool:
        rest = self.after_warmup()
        return len(rest) >= 2 and len({s[1] for s in rest}) == 1 and rest[-1][3] > rest[0][3]


def measure(seconds: float, interval: float = 1.0, scrape: float = 1.0, warmup: float = 120.0,
            every: float = 10.0, log: bool = True) -> Run:
    """Run demo + Prometheus for ``seconds``; sample the head every ``every`` seconds."""
    tmp = tempfile.mkdtemp(prefix="bnexporter-head-")
    dport, pport = free_port(), free_port()
    target = f"127.0.0.1:{dport}"
    with open(os.path.join(tmp, "prometheus.yml"), "w", encoding="utf-8") as fh:
        fh.write(f"global:\n  scrape_interval: {scrape:g}s\n  evaluation_interval: {scrape:g}s\n"
                 f"scrape_configs:\n  - job_name: bnexporter\n    static_configs:\n"
                 f"      - targets: ['{target}']\n")
    demo = subprocess.Popen([sys.executable, "-m", "bnexporter", "demo", "--interval",
                             str(interval), "--web.listen-address", target, "--dir",
                             os.path.join(tmp, "ckpt"), "--log.level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp}/prometheus.yml",
                             f"--storage.tsdb.path={tmp}/data",
                             f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    purl = f"http://127.0.0.1:{pport}"
    run = Run(seconds, interval, scrape, warmup)
    try:
        _wait(f"http://{target}/-/ready", 30, demo)
        _wait(f"{purl}/-/ready", 60, prom)
        t0 = time.monotonic()
        while True:
            now = time.monotonic() - t0
            head = _head_series(purl)
            ours = _query(purl, 'count({job="bnexporter"})')
            done = _query(purl, 'bnexporter_analyses_total{outcome="success"}')
            if head is not None and ours is not None:
                run.samples.append((round(now, 1), head, ours, done or 0.0))
                if log:
                    print(f"{now:7.0f} s  head series {head:6.0f}  bnexporter series {ours:6.0f}"
                          f"  checkpoints analysed {done or 0:6.0f}", flush=True)
            if now >= seconds:
                break
            time.sleep(min(every, max(0.0, seconds - now)) or 0.1)
    finally:
        for p in (demo, prom):
            p.send_signal(signal.SIGTERM)
        for p in (demo, prom):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between checkpoints")
    ap.add_argument("--scrape", type=float, default=1.0, help="scrape interval (s)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up minutes")
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    run = measure(args.minutes * 60, args.interval, args.scrape, args.warmup * 60, args.every)
    rest = run.after_warmup()
    if rest:
        low, high = min(s[1] for s in rest), max(s[1] for s in rest)
        verdict = "flat" if run.flat else "NOT flat"
        print(f"after warm-up: head series {low:.0f}..{high:.0f} while "
              f"{rest[-1][3] - rest[0][3]:.0f} checkpoints were analysed: {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(asdict(run), fh, indent=1)
    return 0 if run.flat else 1


if __name__ == "__main__":
    sys.exit(main())
