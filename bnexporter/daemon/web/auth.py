"""Basic auth against bcrypt hashes, and the web config's rate limit.

bcrypt is slow on purpose (cost 10: ~70 ms): checking it on every scrape would
cost a core at a few scrapes a second. Like exporter-toolkit, a verified
(user, hash, password) triple is remembered; unlike it, the cache key is an
HMAC with a per-process random key, so no password-equivalent is kept in
memory. Failures are not cached; bcrypt checks run one at a time, so a stream
of wrong passwords costs at most one core. Unknown users are checked against a
dummy hash, so the answer time does not tell which user names exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Mapping

CACHE_SIZE = 1024


class BasicAuth:
    def __init__(self, users: Mapping[str, str]):
        import bcrypt  # optional dependency; presence checked when the config is loaded

        self._bcrypt = bcrypt
        self.users = dict(users)
        self._secret = os.urandom(32)
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()
        self._dummy = bcrypt.hashpw(b"no such user", bcrypt.gensalt(10))

    def check(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries valid credentials."""
        creds = parse_basic(header)
        if creds is None:
            return False
        user, password = creds
        hashed = self.users.get(user)
        key = hmac.new(self._secret, b"\0".join((user.encode(), (hashed or "").encode(),
                                                  password.encode())), hashlib.sha256).digest()
        if hashed is not None and key in self._ok:
            return True
        with self._lock:  # one bcrypt at a time
            try:
                good = self._bcrypt.checkpw(password.encode(),
                                            hashed.encode() if hashed else self._dummy)
            except ValueError:  # a malformed hash (validated at load; be safe anyway)
                good = False
            good = good and hashed is not None
            if good:
                if len(self._ok) >= CACHE_SIZE:
                    self._ok.clear()
                self._ok.add(key)
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
