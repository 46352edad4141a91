"""Basic auth against bcrypt hashes, and the web config's rate limit.

bcrypt is slow on purpose (cost 10: ~70 ms, cost 12: ~0.3 s): checking it on every
scrape would cost a core at a few scrapes a second. Like exporter-toolkit, a
verified (user, hash, password) triple is remembered; unlike it, the cache key is
an HMAC with a per-process random key, so no password-equivalent is kept in
memory. A cached pair never waits for anything.

* **No user-name oracle.** An unknown user is checked against a dummy hash made
  at start-up with the highest cost among the configured hashes, so it takes as
  long as a real user's wrong password (with users of different costs, as long as
  the costliest).
* **A bounded verification pool.** At most ``VERIFIERS`` bcrypt checks run at once
  (one core: the scrapes keep the other), at most ``MAX_WAITING`` requests wait for
  one, each at most ``VERIFY_WAIT`` seconds, in arrival order. Beyond that the
  answer is ``None`` (the server says 503 with ``Retry-After``) without running
  bcrypt, so a flood of wrong passwords costs one core, never an unbounded queue,
  and a valid password not cached yet is answered (or refused as busy) within
  ``VERIFY_WAIT`` + one verification.
* **Failures are remembered too** (the same HMAC, a bounded LRU): the same wrong
  password again is refused without bcrypt, for a real user and an unknown one
  alike, so a replayed wrong password cannot fill the pool.

Counted in ``bnexporter_auth_verifications_total{result="ok|fail|busy"}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from bnexporter.daemon import health

CACHE_SIZE = 1024      # verified pairs remembered
FAILED_SIZE = 4096     # failed pairs remembered
VERIFIERS = 1          # bcrypt checks at once
MAX_WAITING = 8        # requests waiting for a verifier; more are answered "busy" at once
VERIFY_WAIT = 2.0      # seconds a request may wait for a verifier
_COST = re.compile(r"^\$2[aby]?\$(\d\d)\$")


class BasicAuth:
    def __init__(self, users: Mapping[str, str]):
        import bcrypt  # optional dependency; presence checked when the config is loaded

        self._bcrypt = bcrypt
        self.users = dict(users)
        self._secret = os.urandom(32)
        self._ok: set[bytes] = set()
        self._failed: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()          # the two caches
        self._verifiers = threading.Semaphore(VERIFIERS)
        self._waiting = 0
        costs = [int(m.group(1)) for h in self.users.values() if (m := _COST.match(h))]
        self.dummy_cost = max(costs, default=10)
        self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(),
                                    bcrypt.gensalt(self.dummy_cost))

    def check(self, header: str | None) -> bool | None:
        """Whether an ``Authorization`` header carries valid credentials; ``None``:
        could not verify now (the pool is full), answer 503."""
        creds = parse_basic(header)
        if creds is None:
            return False
        user, password = creds
        hashed = self.users.get(user)
        key = hmac.new(self._secret, b"\0".join((user.encode(), (hashed or "").encode(),
                                                  password.encode())), hashlib.sha256).digest()
        with self._lock:
            if hashed is not None and key in self._ok:
                return True
            if key in self._failed:
                self._failed.move_to_end(key)
                return False
            if self._waiting >= MAX_WAITING:
                health.BOARD.inc("auth_verifications", "busy")
                return None
            self._waiting += 1
        try:
            if not self._verifiers.acquire(timeout=VERIFY_WAIT):
                health.BOARD.inc("auth_verifications", "busy")
                return None
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            try:
                good = self._bcrypt.checkpw(password.encode(),
                                            hashed.encode() if hashed else self._dummy)
            except ValueError:  # a malformed hash (validated at load; be safe anyway)
                good = False
        finally:
            self._verifiers.release()
        good = good and hashed is not None
        with self._lock:
            if good:
                if len(self._ok) >= CACHE_SIZE:
                    self._ok.clear()
                self._ok.add(key)
            else:
                self._failed[key] = None
                if len(self._failed) > FAILED_SIZE:
                    self._failed.popitem(last=False)
        health.BOARD.inc("auth_verifications", "ok" if good else "fail")
        return good


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``Basic base64(user:password)`` -> (user, password)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


class RateLimit:
    """Token bucket: ``burst`` requests at once, then one per ``interval`` seconds."""

    def __init__(self, interval: float, burst: int,
                 clock: Callable[[], float] = time.monotonic):
        self.interval, self.burst, self.clock = interval, burst, clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) / self.interval)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False
