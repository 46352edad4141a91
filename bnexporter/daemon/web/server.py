"""The HTTP(S) server: wsgiref with one daemon thread per connection, guarded.

The accept loop only accepts: the TLS handshake, the request line and headers are
read in the connection's own thread, so a client that connects and sends nothing
delays nobody. What bounds the rest (issue 13.3):

* **A whole-request deadline.** From accept to the last header (TLS handshake
  included) a connection has ``REQUEST_TIMEOUT`` seconds *in total*, however it
  trickles its bytes; the whole answer then has ``RESPONSE_TIMEOUT`` seconds. A
  reaper thread shuts the socket down when a deadline passes (a timeout per read
  would let one byte a second keep a connection forever). No request body is
  read by any route.
* **Caps.** At most ``MAX_CONNECTIONS`` connections at once and
  ``MAX_PER_CLIENT`` from one address; at most ``MAX_PENDING`` (``MAX_PENDING_PER_CLIENT``
  per address) whose request is not in yet. A new connection beyond a pending cap
  pushes out the *oldest* incomplete one (of that address first): a scraper sends
  its request within milliseconds, so slow clients only ever push each other out
  and cannot lock honest scrapes out, with or without TLS and credentials.
* **A listen backlog** of ``BACKLOG`` (the kernel caps it at
  ``net.core.somaxconn``), so hundreds of scrapers connecting at once are queued,
  not dropped.

Every connection cut early is counted in
``bnexporter_http_connections_closed_total{reason}`` (health.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from bnexporter.daemon import health
from bnexporter.daemon.web.security import WebSecurity
from bnexporter.daemon.web.webconfig import allowed_san

log = logging.getLogger("bnexporter.web")

REQUEST_TIMEOUT = 10.0      # seconds, in total: TLS handshake + request line + headers
RESPONSE_TIMEOUT = 60.0     # seconds, in total: the whole answer
IO_TIMEOUT = 30.0           # seconds any single write may block
MAX_CONNECTIONS = 512       # connections at once
MAX_PER_CLIENT = 256        # connections at once from one address
MAX_PENDING = 128           # connections whose request is not in yet
MAX_PENDING_PER_CLIENT = 64
BACKLOG = 1024              # listen(2) backlog
REAP_EVERY = 0.1            # seconds between deadline checks
HEADER_TIMEOUT = REQUEST_TIMEOUT  # the name older tests and docs use


@dataclass(eq=False)
class _Conn:
    client: str
    sock: Any                        # the live socket object (SSLSocket once wrapped)
    deadline: float
    since: float
    pending: bool = True             # the request is not in yet
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cut(self) -> bool:
        """Shut the socket down (the connection's thread then ends); False if gone."""
        with self.lock:
            if self.sock is None:
                return False
            with contextlib.suppress(OSError):  # the plain socket's shutdown, also for an
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # SSLSocket mid-handshake
            return True

    def release(self) -> None:
        with self.lock:
            self.sock = None


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # per read; the reaper enforces the total

    def parse_request(self) -> bool:
        ok = super().parse_request()
        server: _Server = self.server  # type: ignore[assignment]
        conn = server.conn_of(self)
        if conn is not None:
            server.answered(conn)
        self.connection.settimeout(IO_TIMEOUT)
        return ok

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = BACKLOG
    security: WebSecurity

    def server_activate(self) -> None:
        super().server_activate()
        self._lock = threading.Lock()
        self._by_request: dict[int, _Conn] = {}  # id(accepted socket) -> connection
        self._alias: dict[int, _Conn] = {}       # id(its SSLSocket) -> the same
        self._refused_logged = 0.0
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="http-reaper", daemon=True)
        self._reaper.start()
        health.BOARD.set("http_connections", 0)

    # -- admission (accept thread) -----------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        now = time.monotonic()
        conn = _Conn(client, request, now + REQUEST_TIMEOUT, now)
        evict: list[_Conn] = []
        with self._lock:
            conns = list(self._by_request.values())
            mine = [c for c in conns if c.client == client]
            pending = [c for c in conns if c.pending]
            my_pending = [c for c in mine if c.pending]
            if len(my_pending) >= MAX_PENDING_PER_CLIENT:
                evict.append(min(my_pending, key=lambda c: c.since))
            elif len(pending) >= MAX_PENDING:
                evict.append(min(pending, key=lambda c: c.since))
            refuse = None
            if len(mine) - len(evict) >= MAX_PER_CLIENT:
                refuse = "client_limit"
            elif len(conns) - len(evict) >= MAX_CONNECTIONS:
                if pending and not evict:
                    evict.append(min(pending, key=lambda c: c.since))
                else:
                    refuse = "limit"
            if refuse is None:
                self._by_request[id(request)] = conn
                for c in evict:  # counted once here; the reaper leaves it alone
                    c.pending, c.deadline = False, float("inf")
            n = len(self._by_request)
        for c in evict:
            if c.cut():
                health.BOARD.inc("http_connections_closed", "evicted")
        health.BOARD.set("http_connections", n)
        if refuse is not None:
            health.BOARD.inc("http_connections_closed", refuse)
            if now - self._refused_logged > 60:
                self._refused_logged = now
                log.warning("connection limit reached (%s: %d in all, %d per address); "
                            "closing new connections until some finish", refuse,
                            MAX_CONNECTIONS, MAX_PER_CLIENT)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._forget(request)
            raise

    def conn_of(self, handler: Any) -> _Conn | None:
        with self._lock:
            key = id(handler.request)
            return self._by_request.get(key) or self._alias.get(key)

    def answered(self, conn: _Conn) -> None:
        """The request line and headers are in: from now on the response deadline."""
        with self._lock:
            conn.pending = False
            conn.deadline = time.monotonic() + RESPONSE_TIMEOUT

    def _forget(self, request: Any) -> None:
        with self._lock:
            conn = self._by_request.pop(id(request), None)
            n = len(self._by_request)
        if conn is not None:
            conn.release()
        health.BOARD.set("http_connections", n)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            conn = self._by_request.get(id(request))
        if conn is not None:
            conn.release()
        super().shutdown_request(request)

    # -- deadlines -------------------------------------------------------------------------
    def _reap(self) -> None:
        while not self._stop.wait(REAP_EVERY):
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._by_request.values() if c.deadline <= now]
                for c in late:
                    c.deadline = float("inf")  # cut once
            for c in late:
                if c.cut():
                    health.BOARD.inc("http_connections_closed",
                                     "request_timeout" if c.pending else "response_timeout")
                    log.debug("%s: connection cut (%s deadline)", c.client,
                              "request" if c.pending else "response")

    # -- one connection (its own thread) ------------------------------------------------
    def finish_request(self, request: Any, client_address: Any) -> None:
        """Connection thread: TLS handshake (if configured), then the request."""
        with self._lock:
            conn = self._by_request.get(id(request))
        ctx = self.security.tls_context()
        if ctx is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(REQUEST_TIMEOUT)
        try:
            tls = ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as exc:
            log.debug("%s: TLS setup failed: %s", client_address[0], exc)
            return
        if conn is not None:
            with conn.lock:
                conn.sock = tls
            with self._lock:  # the handler finds its record through the new socket
                self._alias[id(tls)] = conn
        try:
            try:
                tls.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                log.debug("%s: TLS handshake failed: %s", client_address[0], exc)
                return
            allowed = self.security.current().allowed_sans
            if allowed and not allowed_san(tls.getpeercert(), allowed):
                log.debug("%s: client certificate names none of client_allowed_sans",
                          client_address[0])
                return
            super().finish_request(tls, client_address)
        finally:
            if conn is not None:
                conn.release()
            with self._lock:
                self._alias.pop(id(tls), None)
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished or timed out is not worth a traceback on stderr."""
        log.debug("error while serving %s", client_address, exc_info=True)

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()


class _Server6(_Server):
    address_family = socket.AF_INET6


class HTTPServer:
    def __init__(self, host: str, port: int, app: Any):
        cls = _Server6 if ":" in host else _Server
        self.server = make_server(host, port, app, server_class=cls, handler_class=_Handler)
        self.server.security = app.security
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.25}, name="http",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
