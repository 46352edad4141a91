"""The exporter's own machinery, made visible: a process-wide board of gauges,
counters and health problems that the HTTP server, the web config, the worker
pool and the watchers write to, and that ``/metrics`` and ``/healthz`` read.

Every degradation the daemon survives (a web config it refused, connections it
cut, a stopped forkserver, a lost event queue) is counted or shown here, so
"bounded" is also "visible". A *problem* (``problem(key, text)``) makes
``/healthz`` answer 503 with the text until it is cleared (``problem(key, None)``).

Writers call from any thread; the board takes a lock for each change and scrapes
copy it under the same lock (a few dozen values).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

P = "bnexporter_"

# name -> (type, help, label names); every metric on the board is declared here
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "web_config_last_reload_successful": (
        "gauge", "1 when the web config file in force is the one on disk; 0 when a change "
        "was refused (empty, partial, invalid, or weakening security) and the previous "
        "settings stay.", ()),
    "web_config_last_reload_success_timestamp_seconds": (
        "gauge", "When the web config in force was loaded (Unix seconds).", ()),
    "http_connections": ("gauge", "Connections open right now.", ()),
    "http_connections_closed": (
        "counter", "Connections the server closed before their answer, by reason: "
        "request_timeout (request line and headers not in within the deadline), "
        "response_timeout, limit (server full), client_limit (too many from one address), "
        "evicted (an incomplete request pushed out by a new connection).", ("reason",)),
    "auth_verifications": (
        "counter", "Password hash verifications (cache misses) by result: ok, fail, busy "
        "(the verification pool was full: 503 without a verification).", ("result",)),
    "worker_pool_up": (
        "gauge", "1 while analyses can start and progress; 0 while the forkserver or an "
        "analysis process is stopped or does not answer.", ()),
    "worker_stalls": (
        "counter", "Times the worker watchdog found the forkserver or an analysis process "
        "stopped (SIGSTOP) or not answering, by what.", ("what",)),
    "watcher_overflows": (
        "counter", "inotify event queue overflows (events lost); each starts an immediate "
        "rescan of the root.", ("root",)),
}


class Board:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[str, ...]], float] = {}
        self._problems: dict[str, str] = {}

    def set(self, name: str, value: float, *labels: str) -> None:
        assert name in METRICS, name
        with self._lock:
            self._values[(name, labels)] = float(value)

    def inc(self, name: str, *labels: str, by: float = 1.0) -> None:
        assert name in METRICS, name
        with self._lock:
            key = (name, labels)
            self._values[key] = self._values.get(key, 0.0) + by

    def get(self, name: str, *labels: str) -> float | None:
        with self._lock:
            return self._values.get((name, labels))

    def drop(self, name: str, *labels: str) -> None:
        with self._lock:
            self._values.pop((name, labels), None)

    def problem(self, key: str, text: str | None) -> None:
        with self._lock:
            if text is None:
                self._problems.pop(key, None)
            else:
                self._problems[key] = text

    def problems(self) -> list[str]:
        with self._lock:
            return [self._problems[k] for k in sorted(self._problems)]

    def families(self) -> list[Metric]:
        with self._lock:
            values = dict(self._values)
        out: list[Metric] = []
        for name, (kind, doc, labels) in METRICS.items():
            rows = sorted((k[1], v) for k, v in values.items() if k[0] == name)
            if not rows:
                continue
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(P + name, doc, labels=list(labels))
            else:
                family = GaugeMetricFamily(P + name, doc, labels=list(labels))
            for lbls, v in rows:
                family.add_metric(list(lbls), v)
            out.append(family)
        return out


BOARD = Board()


class BoardCollector(Collector):
    def __init__(self, board: Board = BOARD):
        self.board = board

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.board.families()
