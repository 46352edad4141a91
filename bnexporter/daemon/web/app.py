"""HTTP: ``/metrics`` (``--web.telemetry-path``), ``/``, ``/healthz`` = ``/-/healthy``,
``/-/ready``, ``/api/v1/models`` (JSON), ``POST /-/reload``; HEAD wherever GET works.

A small WSGI app composed around ``prometheus_client.make_wsgi_app`` (which
keeps content negotiation, gzip and ``name[]`` filtering), served by wsgiref
with one daemon thread per connection, so a slow client never blocks a scrape.
Scrapes that accept the text format (Prometheus always does) get the same bytes
from ``exposition.FastText``, which caches the per-model part between changes.

The accept loop only accepts: the TLS handshake, the request line and headers
are read in the connection's own thread, under ``HEADER_TIMEOUT``, so a client
that connects and sends nothing (or half a request) holds one thread for a few
seconds and nothing else. ``MAX_CONNECTIONS`` bounds those threads. With a web
config file (``security.WebSecurity``) every path needs basic auth, like the
exporter-toolkit, including ``/healthz``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, unquote

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, gzip_accepted

from bnexporter.daemon import health, names
from bnexporter.daemon.state import Snapshot, Store
from bnexporter.daemon.web import landing, page
from bnexporter.daemon.web.exposition import FastText
from bnexporter.daemon.web.security import WebSecurity
from bnexporter.daemon.web.server import HEADER_TIMEOUT, HTTPServer

log = logging.getLogger("bnexporter.web")

# the server itself (deadlines, connection caps, backlog) lives in server.py
__all__ = ["HEADER_TIMEOUT", "App", "HTTPServer"]

StartResponse = Callable[..., Any]
Reload = Callable[[], tuple[bool, str]]


class App:
    def __init__(self, store: Store, registry: CollectorRegistry, reload: Reload,
                 hooks: dict[str, Callable[[], str]] | None = None,
                 security: WebSecurity | None = None, telemetry_path: str = "/metrics",
                 ready: Callable[[], bool] | None = None):
        self.store = store
        self.telemetry_path = telemetry_path
        self.ready = ready or (lambda: True)
        self.metrics = make_wsgi_app(registry)
        self.fast = FastText(store)
        self.reload = reload
        self.hooks = hooks or {}
        self.security = security or WebSecurity(None)

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        sec = self.security.current()
        if sec.headers:
            start = _with_headers(start, sec.headers)
        if sec.limit is not None and not sec.limit.allow():
            return _send(start, "429 Too Many Requests", "Too Many Requests\n")
        verdict = True if sec.auth is None else sec.auth.check(environ.get("HTTP_AUTHORIZATION"))
        if verdict is None:  # the bounded verification pool is full (auth.py)
            return _send(start, "503 Service Unavailable", "busy verifying passwords\n",
                         extra=[("Retry-After", "1")])
        if not verdict:
            return _send(start, "401 Unauthorized", "Unauthorized\n",
                         extra=[("WWW-Authenticate", 'Basic realm="bnexporter"')])
        return self._route(environ, start)

    def _route(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "HEAD":  # the headers GET would send (Content-Length too), no body
            for _ in self._route({**environ, "REQUEST_METHOD": "GET"}, start):
                pass
            return []
        try:
            if path == self.telemetry_path:
                wanted = _name_filter(environ)
                if method == "GET" and wanted:  # our collectors describe no names
                    body = _only_families(self.fast.body(False), wanted)
                    return _send_bytes(start, body, CONTENT_TYPE_PLAIN_0_0_4, [])
                if method == "GET" and _text_ok(environ):
                    gz = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", ""))
                    body = self.fast.body(gz)
                    return _send_bytes(start, body, CONTENT_TYPE_PLAIN_0_0_4,
                                       [("Content-Encoding", "gzip")] if gz else [])
                return self.metrics(environ, start)
            if path == "/":
                return _send(start, "200 OK", landing.render(self.store.snapshot),
                             "text/html; charset=utf-8", list(page.HEADERS))
            if path.startswith("/model/"):  # one model's page
                html = landing.model_page(self.store.snapshot, unquote(path[7:]))
                if html is None:
                    return _send(start, "404 Not Found", "no such model\n")
                return _send(start, "200 OK", html, "text/html; charset=utf-8",
                             list(page.HEADERS))
            if path in ("/healthz", "/-/healthy", "/-/ready", "/api/v1/models"):
                return self._status(path, start)
            if path == "/-/reload":
                if method != "POST":
                    return _send(start, "405 Method Not Allowed", "use POST\n",
                                 extra=[("Allow", "POST")])
                ok, message = self.reload()
                return _send(start, "200 OK" if ok else "500 Internal Server Error",
                             message + "\n")
            if path.startswith("/-/test/") and path[8:] in self.hooks and method == "POST":
                return _send(start, "200 OK", self.hooks[path[8:]]() + "\n")
            return _send(start, "404 Not Found", f"not found; try {self.telemetry_path}\n")
        except Exception:
            log.exception("error while serving %s", path)
            return _send(start, "500 Internal Server Error", "internal error\n")

    def _status(self, path: str, start: StartResponse) -> Iterable[bytes]:
        """Health (``/healthz`` = ``/-/healthy``), readiness, the models as JSON."""
        if path == "/api/v1/models":
            return _send(start, "200 OK", models_json(self.store.snapshot), "application/json")
        if path == "/-/ready" and not self.ready():
            return _send(start, "503 Service Unavailable", "starting\n")
        return self._health(start)

    def _health(self, start: StartResponse) -> Iterable[bytes]:
        snap = self.store.snapshot
        dead = sorted(r for r, w in snap.watchers.items() if not w.up)
        problems = [f"watcher dead: {r}" for r in dead] + health.BOARD.problems()
        if problems:  # e.g. a stopped worker pool (health.py)
            return _send(start, "503 Service Unavailable", "".join(p + "\n" for p in problems))
        return _send(start, "200 OK", "ok\n")


def models_json(snap: Snapshot) -> str:
    """Each model's state and exported checkpoint (its path is here, not in a label)."""
    out = []
    for name in sorted(snap.models):
        view = snap.models[name]
        r = view.report
        doc = None if r is None else r.to_json()
        out.append({
            "name": name, "folder": view.folder, "up": view.up, "error": view.error,
            "checkpoint": None if doc is None else {
                k: doc[k] for k in ("path", "format", "step", "size_bytes", "mtime",
                                    "duration_seconds")},
            "analysed_at": view.analysed_at,
            "summary": None if doc is None else doc["summary"],
            "notes": [] if doc is None else list(doc.get("notes", [])),
            "errors": dict(view.errors)})
    return json.dumps({"models": out}, indent=1) + "\n"


def _name_filter(environ: dict[str, Any]) -> set[str]:
    """The ``name[]`` values of the query, percent-decoded (``name%5B%5D=x`` too)."""
    query = environ.get("QUERY_STRING", "")
    if "name" not in query:
        return set()
    return set(parse_qs(query).get("name[]", []))


def _only_families(body: bytes, wanted: set[str]) -> bytes:
    """The text-format families named in ``wanted`` (their HELP, TYPE and samples)."""
    out, keep = [], False
    for line in body.split(b"\n"):
        if line.startswith((b"# HELP ", b"# TYPE ")):
            keep = line.split(b" ", 3)[2].decode("utf-8", "replace") in wanted
        elif not line.startswith(b"#") and line and not keep:
            name = line.split(b"{", 1)[0].split(b" ", 1)[0].decode("utf-8", "replace")
            keep = name in wanted  # a sample with no HELP / TYPE before it
        if keep and line:
            out.append(line)
    return b"\n".join(out) + b"\n" if out else b""


def _text_ok(environ: dict[str, Any]) -> bool:
    """No ``name[]`` filter, and the client takes the classic text format."""
    if _name_filter(environ):
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
    data = names.encode(body)  # a name that is not UTF-8 is escaped, never a 500
    start(status, [("Content-Type", ctype), ("Content-Length", str(len(data))),
                   ("Cache-Control", "no-store"), *(extra or [])])
    return [data]


def _with_headers(start: StartResponse, headers: tuple[tuple[str, str], ...]
                  ) -> StartResponse:
    def wrapped(status: str, response_headers: list[tuple[str, str]], *exc: Any) -> Any:
        return start(status, [*response_headers, *headers], *exc)
    return wrapped


