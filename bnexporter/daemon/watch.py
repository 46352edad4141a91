"""One watchdog observer per watched root, supervised.

Handlers only forward paths to the planner and swallow every exception: an
exception escaping a handler kills watchdog's dispatcher thread silently. The
supervisor still checks every observer (and its emitter threads) each second,
restarts a dead one, counts the restart and asks the planner to rescan the
root, since events were lost meanwhile. When inotify runs out of watches or
instances (ENOSPC / EMFILE) the root falls back to polling.

When the kernel's inotify queue overflows, events are lost; watchdog rebuilds its
watches and says so in its log. That log record is the one signal watchdog gives
(there is no callback), so a logging handler on watchdog's loggers turns it into an
immediate rescan of the root concerned (of every inotify root when the record does
not say which) and counts it in ``bnexporter_watcher_overflows_total{root}``:
the lost checkpoint is found at once, not at the next ``rescan_interval``.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from bnexporter.daemon import health
from bnexporter.daemon.mounts import choose_mode
from bnexporter.daemon.state import Store, WatcherView

log = logging.getLogger("bnexporter.watch")

# no opened / closed-without-write events: our own reads would wake us up
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent, FileDeletedEvent,
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
]
Notify = Callable[[str, str, bool], None]


class Handler(FileSystemEventHandler):
    def __init__(self, notify: Notify):
        self.notify = notify
        self.crash_next = False  # test hook: let the next event kill the dispatcher

    def dispatch(self, event: FileSystemEvent) -> None:
        if self.crash_next:
            self.crash_next = False
            raise RuntimeError("test hook: crashing the watcher's dispatcher thread")
        try:
            if isinstance(event, DirModifiedEvent):
                return  # a file event in it follows; nothing to learn from the folder
            self.notify(os.fsdecode(event.src_path), event.event_type, event.is_directory)
            dest = getattr(event, "dest_path", "")
            if dest:
                self.notify(os.fsdecode(dest), "moved", event.is_directory)
        except Exception:
            log.exception("error while handling %s", event)


@dataclass
class Watch:
    root: str
    mode: str             # configured: auto | inotify | poll
    observer: BaseObserver | None = None
    handler: Handler | None = None
    polling: bool = False
    why: str = ""
    up: bool = False
    started_once: bool = False


_OVERFLOW_LOGGERS = ("watchdog.observers.inotify", "watchdog.observers.inotify_c")


class _OverflowHook(logging.Handler):
    """watchdog's "Inotify queue overflowed" log records -> ``on_overflow(root | None)``."""

    def __init__(self, on_overflow: Callable[[str | None], None]):
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if "overflow" not in str(record.msg).lower():
                return
            root = None
            if "below" in str(record.msg) and record.args:
                args = record.args if isinstance(record.args, tuple) else (record.args,)
                root = os.fsdecode(args[0]) if isinstance(args[0], (str, bytes)) else None
            self.on_overflow(root)
        except Exception:  # a logging handler must never raise into watchdog's thread
            pass


class Watchers:
    def __init__(self, store: Store, notify: Notify, rescan: Callable[[str], None],
                 poll_interval: float, supervise_interval: float = 1.0):
        self.store = store
        self.notify = notify
        self.rescan = rescan
        self.poll_interval = poll_interval
        self.supervise_interval = supervise_interval
        self._watches: dict[str, Watch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="watch-supervisor",
                                        daemon=True)
        self._hook = _OverflowHook(self._overflowed)
        self._overflow_at: dict[str, float] = {}

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        for name in _OVERFLOW_LOGGERS:
            logging.getLogger(name).addHandler(self._hook)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for name in _OVERFLOW_LOGGERS:
            logging.getLogger(name).removeHandler(self._hook)
        with self._lock:
            watches = list(self._watches.values())
        for w in watches:
            self._halt(w)

    def set_roots(self, roots: dict[str, str], poll_interval: float) -> None:
        """Start, stop or restart observers so exactly ``roots`` are watched."""
        with self._lock:
            changed = poll_interval != self.poll_interval
            self.poll_interval = poll_interval
            for root in list(self._watches):
                w = self._watches[root]
                if root not in roots or roots[root] != w.mode or (changed and w.polling):
                    self._halt(w)
                    del self._watches[root]
            for root, mode in roots.items():
                if root not in self._watches:
                    w = Watch(root, mode)
                    self._watches[root] = w
                    self._launch(w)
        self._publish()

    # -- observers ----------------------------------------------------------------
    def _launch(self, w: Watch) -> bool:
        try:  # watchdog silently watches nothing in a folder it may not read
            with os.scandir(w.root):
                pass
        except OSError as exc:
            return self._launch_failed(w, exc)
        mode, why = choose_mode(w.root, w.mode)
        handler = Handler(self.notify)
        observer: BaseObserver | None = None
        if mode == "inotify":
            try:
                observer = Observer()
                observer.schedule(handler, w.root, recursive=True, event_filter=EVENTS)
                observer.start()
            except OSError as exc:
                self._halt_observer(observer)
                observer = None
                if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                    return self._launch_failed(w, exc)
                why = (f"inotify limit reached ({exc.strerror}; raise "
                       "fs.inotify.max_user_watches/max_user_instances)")
                log.warning("%s: %s; polling every %g s instead", w.root, why,
                            self.poll_interval)
                mode = "poll"
        if observer is None:
            try:
                observer = PollingObserver(timeout=self.poll_interval)
                observer.schedule(handler, w.root, recursive=True, event_filter=EVENTS)
                observer.start()
            except OSError as exc:
                self._halt_observer(observer)
                return self._launch_failed(w, exc)
        w.observer, w.handler = observer, handler
        w.polling, w.why, w.up = mode == "poll", why, True
        log.info("watching %s with %s (%s)", w.root, "polling" if w.polling else "inotify", why)
        w.started_once = True
        return True

    def _launch_failed(self, w: Watch, exc: OSError) -> bool:
        if w.up or not w.started_once:
            log.error("%s: cannot watch: %s", w.root, exc.strerror or exc)
        w.observer, w.up = None, False
        w.started_once = True
        return False

    @staticmethod
    def _halt_observer(observer: BaseObserver | None) -> None:
        if observer is None:
            return
        try:
            observer.stop()
            if observer.is_alive():
                observer.join(2)
        except Exception:  # stopping is best effort; the thread is a daemon anyway
            log.debug("error while stopping an observer", exc_info=True)

    def _halt(self, w: Watch) -> None:
        self._halt_observer(w.observer)
        w.observer = None

    @staticmethod
    def alive(w: Watch) -> bool:
        o = w.observer
        return o is not None and o.is_alive() and all(e.is_alive() for e in o.emitters)

    def _overflowed(self, root: str | None) -> None:
        """Events were lost: rescan now (the root, or every inotify root)."""
        with self._lock:
            roots = [r for r, w in self._watches.items() if w.up and not w.polling
                     and (root is None or r == root)]
        now = time.monotonic()
        for r in roots:
            if now - self._overflow_at.get(r, -1.0) < 1.0:
                continue  # watchdog logs one overflow twice (with and without the root)
            self._overflow_at[r] = now
            log.warning("%s: inotify event queue overflowed (events lost); rescanning now", r)
            health.BOARD.inc("watcher_overflows", r)
            self.rescan(r)

    # -- supervision --------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stop.wait(self.supervise_interval):
            try:
                self.check()
            except Exception:
                log.exception("watch supervisor error")

    def check(self) -> None:
        """Restart dead observers (a missing root stays down until it reappears)."""
        restarts = 0
        rescan: list[str] = []
        with self._lock:
            for w in self._watches.values():
                if self._stop.is_set() or self.alive(w):
                    continue
                was_up = w.up
                if was_up:
                    log.warning("%s: watcher thread died; restarting it", w.root)
                self._halt(w)
                w.up = False
                if not os.path.isdir(w.root):
                    if was_up:
                        log.warning("%s: folder is gone; will watch it again when it "
                                    "reappears", w.root)
                    continue
                if self._launch(w):
                    restarts += 1
                    rescan.append(w.root)
        for root in rescan:
            self.rescan(root)
        self._publish(restarts)

    def _publish(self, restarts: int = 0) -> None:
        with self._lock:
            views = {r: WatcherView(r, w.up, w.polling, w.why) for r, w in self._watches.items()}
        old = self.store.snapshot.watchers
        if restarts or dict(old) != views:
            self.store.set_watchers(views, restarts)

    # -- test hook ----------------------------------------------------------------
    def crash(self, root: str | None = None) -> list[str]:
        """Make each matching observer's dispatcher die on a synthetic event."""
        hit = []
        with self._lock:
            for w in self._watches.values():
                if (root is None or w.root == root) and w.observer and w.handler:
                    w.handler.crash_next = True
                    watch = next(iter(w.observer._watches), None)
                    if watch is not None:
                        w.observer.event_queue.put((FileModifiedEvent(w.root), watch))
                        hit.append(w.root)
        return hit
