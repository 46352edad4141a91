"""``bnexporter run``, ``check-config`` and ``demo``: argument parsing and the
main thread's signal loop (SIGHUP reloads, SIGTERM/SIGINT stop, exit 0)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

import yaml

from bnexporter.daemon import logformat
from bnexporter.daemon.config import (
    DEFAULT_LISTEN,
    DEFAULT_TELEMETRY_PATH,
    DEMO_LISTEN,
    LOG_FORMATS,
    LOG_LEVELS,
    PLACEHOLDER,
    WATCH_MODES,
)
from bnexporter.daemon.demo import Trainer
from bnexporter.daemon.validate import (
    ConfigError,
    Overrides,
    build_config,
    load_config,
    parse_listen,
)

EXIT_OK, EXIT_CONFIG = 0, 2
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def add_subcommands(sub: Any) -> None:
    run = sub.add_parser("run", help="watch checkpoint folders and serve Prometheus metrics",
                         description="Watch checkpoint folders and serve Prometheus metrics. "
                         "Flags override the config file.")
    run.add_argument("--config.file", "--config", dest="config", metavar="FILE",
                     help="YAML configuration (see config.example.yaml); SIGHUP or POST "
                     "/-/reload re-reads it")
    run.add_argument("--watch", action="append", default=[], metavar="[NAME=]DIR",
                     help="a model folder (name: the folder's name), or a root with a "
                     "{model} placeholder; repeatable")
    run.add_argument("--web.listen-address", "--listen", dest="listen", metavar="HOST:PORT",
                     help=f"HTTP address (default {DEFAULT_LISTEN})")
    run.add_argument("--web.telemetry-path", dest="telemetry_path", metavar="PATH",
                     help=f"path of the metrics (default {DEFAULT_TELEMETRY_PATH})")
    run.add_argument("--poll-interval", type=float, metavar="S",
                     help="seconds between polls where polling is used (default 10)")
    run.add_argument("--watch-mode", choices=WATCH_MODES,
                     help="auto: polling on network/FUSE filesystems, inotify elsewhere")
    _log_flags(run, None)
    run.add_argument("--shard", metavar="I/N", help="watch only the models whose name hashes "
                     "to shard I of N (0-based)")
    run.add_argument("--bn-only", action="store_const", const=True, default=None,
                     help="analyse BatchNorm layers only (skip the full tensor scan)")
    run.add_argument("--workers", type=int, metavar="N", help="parallel analyses (default 1)")
    run.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                     help="exporter-toolkit web config: TLS and basic auth (bcrypt)")

    check = sub.add_parser("check-config", help="validate a configuration file and print "
                           "the effective configuration")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--strict", action="store_true",
                       help="a model folder missing on this machine is an error, as for run")

    demo = sub.add_parser("demo", help="write a synthetic training run and export it")
    demo.add_argument("--duration", type=float, default=0.0, metavar="S",
                      help="stop after S seconds (default: run until Ctrl-C)")
    demo.add_argument("--interval", type=float, default=3.0, metavar="S",
                      help="seconds between checkpoints (default 3)")
    demo.add_argument("--web.listen-address", "--listen", dest="listen", default=None,
                      metavar="HOST:PORT", help=f"HTTP address (default {DEMO_LISTEN}: this "
                      "machine only; a free port if taken)")
    _log_flags(demo, "info")
    demo.add_argument("--dir", metavar="DIR",
                      help="write checkpoints here instead of a temporary folder (kept)")


def _log_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--log.level", "--log-level", dest="log_level", choices=LOG_LEVELS,
                   default=default, help="default info")
    p.add_argument("--log.format", dest="log_format", choices=LOG_FORMATS,
                   default="logfmt" if default else None,
                   help="logfmt (default) or json; RFC 3339 UTC timestamps with milliseconds")


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run(args)
    if args.command == "check-config":
        return check_config(args.file, args.strict)
    if args.command == "demo":
        return run_demo(args)
    raise SystemExit(f"bnexporter: unknown command {args.command!r}")


def setup_logging(level: str, fmt: str = "logfmt") -> None:
    """One line per message on stderr (logfmt or JSON); names cannot forge lines."""
    logformat.setup(level, fmt)


def overrides_from(args: argparse.Namespace) -> Overrides:
    return Overrides(watch=list(args.watch), listen=args.listen,
                     poll_interval=args.poll_interval, log_level=args.log_level,
                     log_format=args.log_format, telemetry_path=args.telemetry_path,
                     shard=args.shard, bn_only=args.bn_only, watch_mode=args.watch_mode,
                     workers=args.workers, web_config_file=args.web_config_file)


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from(args)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"bnexporter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log_level, cfg.log_format)
    return serve(cfg, args.config, overrides)


def serve(cfg: Any, config_path: str | None, overrides: Overrides | None,
          ready: Any = None) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; ``ready(daemon)`` after start."""
    from bnexporter.daemon.daemon import Daemon

    waiter = SignalWaiter()  # before any thread exists, so all inherit the mask
    try:
        daemon = Daemon(cfg, config_path, overrides)
    except ConfigError as exc:  # the web config file
        waiter.restore()
        print(f"bnexporter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        waiter.restore()
        print(f"bnexporter: cannot listen on {cfg.listen}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_CONFIG
    daemon.start()
    if ready is not None:
        ready(daemon)
    log = logging.getLogger("bnexporter")
    try:
        while True:
            sig = waiter.wait(1.0)
            if sig == signal.SIGHUP:
                log.info("SIGHUP: reloading the configuration")
                daemon.reload()
            elif sig is not None:
                log.info("%s: stopping", signal.Signals(sig).name)
                break
    finally:
        daemon.stop()
        waiter.restore()
    return EXIT_OK


class SignalWaiter:
    """Signals are taken synchronously in the main thread (``sigtimedwait``), so
    no handler ever runs in the middle of a lock held by the interrupted code.

    They are blocked in the main thread, and every thread started later inherits
    that. Threads a native library starts at import (numpy's OpenBLAS pool) exist
    before and do not block them: a signal the kernel hands to one of those gets its
    default action, and for SIGHUP or SIGTERM that kills the process (two quick
    reloads did: the second arrives while the main thread is busy reloading). So
    handlers are installed as well: in such a thread only Python's C-level handler
    runs (it sets a flag), and the Python one, run later in the main thread, only
    records the signal for ``wait``. A storm of signals coalesces: ``wait`` drains
    everything pending and returns a stop before a reload, and a reload once.
    """

    POLL = 0.25  # seconds: how late a signal a native thread took is seen at most

    def __init__(self) -> None:
        self._sync = hasattr(signal, "sigtimedwait") and hasattr(signal, "pthread_sigmask")
        self._got: list[int] = []
        self._old = {s: signal.signal(s, self._record) for s in _SIGNALS}
        if self._sync:
            self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)

    def _record(self, signum: int, _frame: Any) -> None:
        self._got.append(signum)

    def wait(self, timeout: float) -> int | None:
        end = time.monotonic() + timeout
        while True:
            got = self._drain()
            left = end - time.monotonic()
            if got is not None or left <= 0:
                return got
            if self._sync:
                info = signal.sigtimedwait(_SIGNALS, min(left, self.POLL))
                if info is not None:
                    self._got.append(info.si_signo)
            else:  # pragma: no cover - non-Linux fallback
                time.sleep(min(left, self.POLL))

    def _drain(self) -> int | None:
        """Everything pending, folded into one answer: a stop wins, reloads coalesce."""
        if self._sync:
            while (info := signal.sigtimedwait(_SIGNALS, 0)) is not None:
                self._got.append(info.si_signo)
        pending = set(self._got)
        self._got.clear()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if sig in pending:
                return sig
        return None

    def restore(self) -> None:
        if self._sync:
            self._drain()  # nothing pending may meet the default action once unblocked
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
        for s, handler in self._old.items():
            signal.signal(s, handler)


def missing_folders(cfg: Any) -> list[str]:
    """Model folders (or {model} bases) that do not exist on this machine."""
    out = []
    for spec in cfg.models:
        where = f"models[{spec.index}]" if spec.origin == "models" else spec.origin
        folder = spec.template_parts()[0] if PLACEHOLDER in spec.path else spec.path
        if not os.path.isdir(folder):
            out.append(f"{where}.path: {folder}: not a directory here")
    return out


def check_config(path: str, strict: bool = False) -> int:
    """Validate every value; folders missing on this machine are warnings (``run`` needs
    them), errors with ``--strict``."""
    try:
        cfg = load_config(path, check_paths=strict)
        if cfg.web_config_file is not None:
            from bnexporter.daemon.web.security import build

            build(cfg.web_config_file)  # certificates load, hashes parse, bcrypt present
    except ConfigError as exc:
        print(f"bnexporter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from bnexporter.daemon.models import targets

    found = targets(cfg)
    missing = missing_folders(cfg)
    for line in missing:
        print(f"bnexporter: warning: {path}: {line} (bnexporter run refuses to start until "
              "it exists)", file=sys.stderr)
    print(f"# {path}: valid{' (see the warnings)' if missing else ''}. Effective "
          "configuration (defaults filled in):")
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False))
    names = ", ".join(sorted(found)) or "none yet"
    print(f"# models this replica (shard {cfg.shard[0]}/{cfg.shard[1]}) watches now: {names}")
    return EXIT_OK


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_demo(args: argparse.Namespace) -> int:
    listen = args.listen or DEMO_LISTEN
    host, port = parse_listen(listen)
    if args.listen is None and not _port_free(host, port):
        listen = f"{host}:0"  # the default port is taken: any free one will do for a demo
    keep = args.dir is not None
    root = os.path.abspath(args.dir) if keep else tempfile.mkdtemp(prefix="bnexporter-demo-")
    folder = os.path.join(root, "demo-run")
    os.makedirs(folder, exist_ok=True)
    try:
        cfg = build_config({"listen": listen, "settle_seconds": 0.5, "poll_interval": 1.0,
                            "models": [{"name": "demo-run", "path": folder}]},
                           "demo", root)
    except ConfigError as exc:
        print(f"bnexporter: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)
    trainer = Trainer(folder, args.interval)

    def ready(daemon: Any) -> None:
        trainer.start()
        print(f"\nbnexporter demo: a synthetic run writes a checkpoint every {args.interval:g}"
              f" s into {folder}\n  open {daemon.url}  (metrics: {daemon.url}metrics)\n"
              "  Ctrl-C stops it.\n", flush=True)
        if args.duration > 0:
            timer = threading.Timer(args.duration, os.kill, (os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()

    try:
        return serve(cfg, None, None, ready=ready)
    finally:
        trainer.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        logging.getLogger("bnexporter").info("demo finished")
