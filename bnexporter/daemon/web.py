"""HTTP: ``/metrics``, ``/``, ``/healthz``, ``POST /-/reload``.

A small WSGI app composed around ``prometheus_client.make_wsgi_app`` (which
keeps content negotiation, gzip and ``name[]`` filtering), served by wsgiref
with one daemon thread per connection, so a slow client never blocks a scrape.
Scrapes that accept the text format (Prometheus always does) get the same bytes
from ``exposition.FastText``, which caches the per-model part between changes.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, gzip_accepted

from . import landing
from .exposition import FastText
from .state import Store

log = logging.getLogger("bnexporter.web")

StartResponse = Callable[..., Any]
Reload = Callable[[], tuple[bool, str]]


class App:
    def __init__(self, store: Store, registry: CollectorRegistry, reload: Reload,
                 hooks: dict[str, Callable[[], str]] | None = None):
        self.store = store
        self.metrics = make_wsgi_app(registry)
        self.fast = FastText(store)
        self.reload = reload
        self.hooks = hooks or {}

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if path == "/metrics":
                if method == "GET" and _text_ok(environ):
                    gz = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", ""))
                    body = self.fast.body(gz)
                    return _send_bytes(start, body, CONTENT_TYPE_PLAIN_0_0_4,
                                       [("Content-Encoding", "gzip")] if gz else [])
                return self.metrics(environ, start)
            if path == "/":
                return _send(start, "200 OK", landing.render(self.store.snapshot),
                             "text/html; charset=utf-8")
            if path == "/healthz":
                return self._health(start)
            if path == "/-/reload":
                if method != "POST":
                    return _send(start, "405 Method Not Allowed", "use POST\n",
                                 extra=[("Allow", "POST")])
                ok, message = self.reload()
                return _send(start, "200 OK" if ok else "500 Internal Server Error",
                             message + "\n")
            if path.startswith("/-/test/") and path[8:] in self.hooks and method == "POST":
                return _send(start, "200 OK", self.hooks[path[8:]]() + "\n")
            return _send(start, "404 Not Found", "not found; try /metrics\n")
        except Exception:
            log.exception("error while serving %s", path)
            return _send(start, "500 Internal Server Error", "internal error\n")

    def _health(self, start: StartResponse) -> Iterable[bytes]:
        snap = self.store.snapshot
        dead = sorted(r for r, w in snap.watchers.items() if not w.up)
        if dead:
            return _send(start, "503 Service Unavailable",
                         "".join(f"watcher dead: {r}\n" for r in dead))
        return _send(start, "200 OK", "ok\n")


def _text_ok(environ: dict[str, Any]) -> bool:
    """No ``name[]`` filter, and the client takes the classic text format."""
    if "name[]" in environ.get("QUERY_STRING", ""):
        return False
    accept = environ.get("HTTP_ACCEPT") or ""
    if "application/openmetrics-text" not in accept:
        return True
    types = [part.split(";")[0].strip() for part in accept.split(",")]
    return any(t in ("text/plain", "*/*", "text/*") for t in types)


def _send_bytes(start: StartResponse, data: bytes, ctype: str,
                extra: list[tuple[str, str]]) -> list[bytes]:
    start("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(data))), *extra])
    return [data]


def _send(start: StartResponse, status: str, body: str,
          ctype: str = "text/plain; charset=utf-8",
          extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = body.encode("utf-8")
    start(status, [("Content-Type", ctype), ("Content-Length", str(len(data))),
                   ("Cache-Control", "no-store"), *(extra or [])])
    return [data]


class _Handler(WSGIRequestHandler):
    timeout = 60  # a stalled client gives its thread back eventually

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class HTTPServer:
    def __init__(self, host: str, port: int, app: App):
        cls = _Server6 if ":" in host else _Server
        self.server = make_server(host, port, app, server_class=cls, handler_class=_Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.25}, name="http",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
