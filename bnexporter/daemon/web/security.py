"""The web config currently in force, swapped atomically.

exporter-toolkit re-reads its file on every request so rotated certificates
are picked up at once. Here the file and the files it names are stat-ed at most
once a second, on new connections, and re-read when one changed; SIGHUP and
``POST /-/reload`` re-read it too. A file that no longer validates is logged
and the previous settings stay (never fall open to no auth).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, replace

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


class WebSecurity:
    def __init__(self, path: str | None, settings: Settings | None = None):
        self.path = path
        self._settings = settings if settings is not None else build(path)
        self._lock = threading.RLock()
        self._checked = time.monotonic()
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
            if _stamps([f for f, _, _ in old.stamps]) == old.stamps:
                return
            try:
                self.reload(self.path)
            except ConfigError as exc:
                log.error("web config changed but is not valid; keeping the previous "
                          "settings: %s", exc)
                # do not retry every second until it changes again
                self._settings = replace(old, stamps=_stamps([f for f, _, _ in old.stamps]))

    def reload(self, path: str | None) -> None:
        """Re-read (``ConfigError`` leaves the current settings in force)."""
        with self._lock:
            new = build(path)
            quiet = path is None and self.path is None  # nothing configured, nothing to say
            self.path = path
            if (new.ctx is None) != (self._settings.ctx is None):
                log.warning("web config: TLS switched %s", "on" if new.ctx else "off")
            self._settings = new
        for note in (new.web.notes if new.web else ()):
            log.warning("%s", note)
        if not quiet:
            log.info("web config: %s", self.describe())
