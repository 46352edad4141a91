"""The web config currently in force, swapped atomically.

exporter-toolkit re-reads its file on every request so rotated certificates
are picked up at once. Here the file and the files it names are stat-ed at most
once a second, on new connections, and re-read when one changed; SIGHUP and
``POST /-/reload`` re-read it too.

Fail closed. A change is applied only once the files have stopped changing (the
same size and mtime at two checks a second apart: a file being rewritten is not
read half-way). A file that is empty, does not validate, or would turn TLS, basic
auth or client-certificate verification off while running is refused: the
previous settings stay, the log says why, and
``bnexporter_web_config_last_reload_successful`` is 0 until a good file is loaded.
Turning protection off takes a restart, as changing ``listen`` does.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, replace

from bnexporter.daemon import health
from bnexporter.daemon.config import ConfigError
from bnexporter.daemon.web.auth import BasicAuth, RateLimit
from bnexporter.daemon.web.webconfig import WebConfig, load_web_config, ssl_context

log = logging.getLogger("bnexporter.web")

CHECK_EVERY = 1.0  # seconds between checks of the files' modification times


@dataclass(frozen=True)
class Settings:
    web: WebConfig | None = None
    ctx: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    limit: RateLimit | None = None
    headers: tuple[tuple[str, str], ...] = ()
    allowed_sans: tuple[str, ...] = ()
    stamps: tuple[tuple[str, int, int], ...] = ()   # (file, mtime_ns, size)


def _stamps(paths: list[str]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((p, -1, -1))
    return tuple(out)


def build(path: str | None) -> Settings:
    """Settings from a web config file (``None``: plain HTTP, no auth)."""
    if path is None:
        return Settings()
    files = [path]
    web = load_web_config(path)
    ctx = auth = limit = None
    if web.tls is not None:
        ctx = ssl_context(web)
        files += web.tls.files()
    if web.users:
        auth = BasicAuth(web.users)
    if web.rate_limit is not None:
        limit = RateLimit(*web.rate_limit)
    return Settings(web, ctx, auth, limit, web.headers,
                    web.tls.client_allowed_sans if web.tls else (), _stamps(files))


_VERIFY = {"NoClientCert": 0, "VerifyClientCertIfGiven": 1, "RequireAndVerifyClientCert": 2}


def weakened(old: Settings, new: Settings) -> str | None:
    """What ``new`` would switch off that ``old`` has (None: nothing)."""
    lost = []
    if old.ctx is not None and new.ctx is None:
        lost.append("TLS")
    if old.auth is not None and new.auth is None:
        lost.append("basic auth")
    if old.ctx is not None and new.ctx is not None and old.web and new.web:
        before = _VERIFY.get(old.web.tls.client_auth_type if old.web.tls else "", 0)
        after = _VERIFY.get(new.web.tls.client_auth_type if new.web.tls else "", 0)
        if after < before:
            lost.append("client certificate verification")
        elif old.allowed_sans and not new.allowed_sans:
            lost.append("client_allowed_sans")
    return " and ".join(lost) or None


class WebSecurity:
    def __init__(self, path: str | None, settings: Settings | None = None):
        self.path = path
        self._settings = settings if settings is not None else build(path)
        self._lock = threading.RLock()
        self._checked = time.monotonic()
        self._moving: tuple[tuple[str, int, int], ...] | None = None  # changed, not settled
        if path is not None:
            self._loaded(True)
        for note in (self._settings.web.notes if self._settings.web else ()):
            log.warning("%s", note)

    @property
    def tls(self) -> bool:
        return self._settings.ctx is not None

    def describe(self) -> str:
        s = self._settings
        if s.web is None:
            return "no TLS, no authentication"
        parts = ["TLS" if s.ctx else "no TLS"]
        if s.ctx and s.web.tls and s.web.tls.client_auth_type != "NoClientCert":
            parts.append(f"client certificates ({s.web.tls.client_auth_type})")
        parts.append(f"basic auth ({len(s.web.users)} users)" if s.auth else
                     "no authentication")
        return ", ".join(parts) + f" from {s.web.source}"

    def current(self) -> Settings:
        return self._settings

    def tls_context(self) -> ssl.SSLContext | None:
        """The context for a new connection, refreshed when its files changed."""
        if self.path is not None and time.monotonic() - self._checked >= CHECK_EVERY:
            self._refresh()
        return self._settings.ctx

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._checked < CHECK_EVERY:
                return
            self._checked = time.monotonic()
            old = self._settings
            now = _stamps([f for f, _, _ in old.stamps])
            if now == old.stamps:
                self._moving = None
                return
            if now != self._moving:  # changed since the last look: let the writer finish
                self._moving = now
                return
            self._moving = None
            try:
                self.reload(self.path)
            except ConfigError as exc:
                log.error("web config changed but is not valid (or would switch protection "
                          "off); keeping the previous settings: %s", exc)
                # do not retry every second until it changes again
                self._settings = replace(old, stamps=now)

    def _loaded(self, ok: bool) -> None:
        health.BOARD.set("web_config_last_reload_successful", 1.0 if ok else 0.0)
        if ok:
            health.BOARD.set("web_config_last_reload_success_timestamp_seconds", time.time())

    def reload(self, path: str | None) -> None:
        """Re-read (``ConfigError`` leaves the current settings in force)."""
        with self._lock:
            try:
                new = build(path)
                lost = weakened(self._settings, new)
                if lost is not None:
                    raise ConfigError(f"{path or 'no web config file'}: would turn {lost} off "
                                      "while running; that takes a restart")
            except ConfigError:
                if path is not None or self.path is not None:
                    self._loaded(False)
                raise
            quiet = path is None and self.path is None  # nothing configured, nothing to say
            self.path = path
            if (new.ctx is None) != (self._settings.ctx is None):
                log.warning("web config: TLS switched %s", "on" if new.ctx else "off")
            self._settings = new
            if path is not None:
                self._loaded(True)
        for note in (new.web.notes if new.web else ()):
            log.warning("%s", note)
        if not quiet:
            log.info("web config: %s", self.describe())
