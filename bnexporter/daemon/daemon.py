"""Wire the parts together: store, planner, workers, watchers, HTTP; reload; stop."""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry

from bnexporter.daemon import testhooks
from bnexporter.daemon.config import Config
from bnexporter.daemon.health import BoardCollector
from bnexporter.daemon.models import watch_roots
from bnexporter.daemon.planner import Planner
from bnexporter.daemon.state import Store
from bnexporter.daemon.validate import ConfigError, Overrides, load_config, parse_listen
from bnexporter.daemon.watch import Watchers
from bnexporter.daemon.web.app import App, HTTPServer
from bnexporter.daemon.web.collector import SnapshotCollector
from bnexporter.daemon.web.security import WebSecurity
from bnexporter.daemon.worker import Runner, WorkerPool

log = logging.getLogger("bnexporter")


def set_log_level(level: str) -> None:
    logging.getLogger("bnexporter").setLevel(level.upper())


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None,
                 overrides: Overrides | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides
        self.store = Store()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.store))
        self.registry.register(BoardCollector())  # the server's and workers' own (health.py)
        self.security = WebSecurity(cfg.web_config_file)  # ConfigError: refuse to start
        self.planner = Planner(cfg, self.store)
        self.runner = Runner(cfg.isolation, cfg.analysis_timeout, self.planner.stop_event,
                             cfg.stall_timeout)
        self.pool = WorkerPool(cfg.workers, self.planner.take, self.planner.done, self.runner)
        self.watchers = Watchers(self.store, self.planner.notify, self.planner.rescan,
                                 cfg.poll_interval)
        hooks = None
        if testhooks.ENABLED:
            hooks = {"crash-watcher": lambda: " ".join(self.watchers.crash()) or "none"}
        host, port = parse_listen(cfg.listen)
        self._started = threading.Event()  # /-/ready: watchers, planner and workers run
        self.http = HTTPServer(host, port, App(self.store, self.registry, self.reload, hooks,
                                               self.security, cfg.telemetry_path,
                                               self._started.is_set))
        self._reload_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, _ = parse_listen(self.cfg.listen)
        shown = "localhost" if host in ("0.0.0.0", "::", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        scheme = "https" if self.security.tls else "http"
        return f"{scheme}://{shown}:{self.http.port}/"

    def start(self) -> None:
        self.http.start()
        log.info("listening on %s (metrics at %s%s)", self.url, self.url.rstrip("/"),
                 self.cfg.telemetry_path)
        log.info("endpoint security: %s", self.security.describe())
        # watchers first: events that arrive while the planner lists folders are queued
        self.watchers.set_roots(watch_roots(self.cfg), self.cfg.poll_interval)
        self.watchers.start()
        self.planner.start()
        self.pool.start()
        self._started.set()

    def reload(self) -> tuple[bool, str]:
        """Re-read the configuration; on any error keep running with the old one."""
        with self._reload_lock:
            try:
                cfg = load_config(self.config_path, self.overrides)
            except ConfigError as exc:
                log.error("reload failed, keeping the previous configuration: %s", exc)
                return False, f"reload failed: {exc}"
            try:
                self.security.reload(cfg.web_config_file)
            except ConfigError as exc:
                log.error("reload failed, keeping the previous configuration: %s", exc)
                return False, f"reload failed: {exc}"
            for key in ("listen", "telemetry_path", "workers", "isolation", "log_format"):
                if getattr(cfg, key) != getattr(self.cfg, key):
                    log.warning("reload: %s changed; it takes effect after a restart", key)
            self.runner.timeout = cfg.analysis_timeout
            self.runner.stall_timeout = cfg.stall_timeout
            set_log_level(cfg.log_level)
            self.planner.reconfigure(cfg).wait(30)
            self.watchers.set_roots(watch_roots(cfg), cfg.poll_interval)
            self.cfg = cfg
            n = len(self.store.snapshot.models)
            log.info("configuration reloaded: %d models", n)
            return True, f"reloaded: {n} models watched"

    def stop(self) -> None:
        """Stop within a few seconds even mid-analysis (children are killed)."""
        t0 = time.monotonic()
        self.planner.stop()
        self.watchers.stop()
        t1 = time.monotonic()
        self.pool.join(3.0)
        t2 = time.monotonic()
        self.planner.join(1.0)
        self.http.stop()
        log.debug("stopped: watchers %.2f s, workers %.2f s, rest %.2f s", t1 - t0, t2 - t1,
                  time.monotonic() - t2)
