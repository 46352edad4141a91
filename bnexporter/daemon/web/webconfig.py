"""The Prometheus exporter-toolkit web configuration file: TLS and basic auth.

Operators who already protect node_exporter & co. with a ``--web.config.file``
can point bnexporter at the same file. Supported, with the toolkit's meaning:
``tls_server_config`` (``cert_file``/``key_file`` or inline ``cert``/``key``,
``client_ca_file``/``client_ca``, ``client_auth_type``, ``client_allowed_sans``,
``min_version``, ``max_version``, ``cipher_suites``,
``prefer_server_cipher_suites``, ``curve_preferences``), ``http_server_config``
(``headers``; ``http2`` is accepted, HTTP/1.1 is served), ``basic_auth_users``
(bcrypt hashes) and ``rate_limit``. Unknown keys are errors, as in the toolkit.

Two things Python's ``ssl`` cannot do are refused with a clear message rather
than silently weakened: ``RequestClientCert`` and ``RequireAnyClientCert`` (a
client certificate taken without verifying it).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bnexporter.daemon.config import ConfigError, read_yaml

TLS_KEYS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type",
            "client_ca_file", "client_allowed_sans", "min_version", "max_version",
            "cipher_suites", "prefer_server_cipher_suites", "curve_preferences")
HTTP_KEYS = ("http2", "headers")
HEADER_KEYS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options",
               "X-XSS-Protection", "Strict-Transport-Security")
TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
            "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# client_auth_type -> verify mode; None: not expressible with Python's ssl
CLIENT_AUTH: dict[str, ssl.VerifyMode | None] = {
    "NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    "RequestClientCert": None, "RequireAnyClientCert": None,
}
# Go (IANA) names of the TLS <= 1.2 suites Go offers -> OpenSSL names
CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
}
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                "TLS_CHACHA20_POLY1305_SHA256")  # fixed in TLS 1.3, as in Go
CURVES = ("CurveP256", "CurveP384", "CurveP521", "X25519", "X25519MLKEM768")
_BCRYPT = re.compile(r"^\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}$")
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")


@dataclass(frozen=True)
class TLSSettings:
    cert_file: str | None = None
    key_file: str | None = None
    cert: str | None = None
    key: str | None = None
    client_ca_file: str | None = None
    client_ca: str | None = None
    client_auth_type: str = "NoClientCert"
    client_allowed_sans: tuple[str, ...] = ()
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()

    def files(self) -> tuple[str, ...]:
        """Files whose change means the context must be rebuilt."""
        return tuple(f for f in (self.cert_file, self.key_file, self.client_ca_file) if f)


@dataclass(frozen=True)
class WebConfig:
    source: str
    tls: TLSSettings | None = None
    users: Mapping[str, str] = field(default_factory=dict)   # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    rate_limit: tuple[float, int] | None = None               # (interval s, burst)
    notes: tuple[str, ...] = ()                               # warnings to log once


def _fail(source: str, loc: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {loc}: {problem}" if loc else f"{source}: {problem}")


def _map(source: str, value: Any, loc: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, loc, "expected a mapping")
    for key in value:
        if key not in allowed:
            raise _fail(source, f"{loc}.{key}" if loc else str(key),
                        f"unknown key (allowed: {', '.join(allowed)})")
    return dict(value)


def _str(source: str, value: Any, loc: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(source, loc, "expected a non-empty string")
    return value


def _strs(source: str, value: Any, loc: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(source, loc, "expected a list of strings")
    return tuple(_str(source, v, f"{loc}[{i}]") for i, v in enumerate(value))


def _path(source: str, value: Any, loc: str, base: str) -> str:
    path = os.path.join(base, os.path.expanduser(_str(source, value, loc)))
    if not os.path.isfile(path):
        raise _fail(source, loc, f"{path}: not a readable file")
    return path


def _tls(source: str, raw: Any, base: str) -> tuple[TLSSettings, list[str]]:
    v = _map(source, raw, "tls_server_config", TLS_KEYS)
    loc = "tls_server_config"
    notes: list[str] = []
    out: dict[str, Any] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        if v.get(key) not in (None, ""):
            out[key] = _path(source, v[key], f"{loc}.{key}", base)
    for key in ("cert", "key", "client_ca"):
        if v.get(key) not in (None, ""):
            out[key] = _str(source, v[key], f"{loc}.{key}")
    for inline, file in (("cert", "cert_file"), ("key", "key_file"), ("client_ca",
                                                                       "client_ca_file")):
        if inline in out and file in out:
            raise _fail(source, f"{loc}.{inline}", f"give either {inline} or {file}, not both")
    if "cert" not in out and "cert_file" not in out:
        raise _fail(source, loc, "missing cert_file (or cert)")
    if "key" not in out and "key_file" not in out:
        raise _fail(source, loc, "missing key_file (or key)")
    auth = v.get("client_auth_type") or "NoClientCert"
    if auth not in CLIENT_AUTH:
        raise _fail(source, f"{loc}.client_auth_type", f"must be one of {', '.join(CLIENT_AUTH)}")
    if CLIENT_AUTH[auth] is None:
        raise _fail(source, f"{loc}.client_auth_type", f"{auth} (a client certificate accepted "
                    "without verification) is not supported; use RequireAndVerifyClientCert "
                    "with client_ca_file")
    has_ca = "client_ca_file" in out or "client_ca" in out
    if has_ca and auth == "NoClientCert":
        raise _fail(source, f"{loc}.client_ca_file", "client CAs are configured without a "
                    "client_auth_type that uses them")
    if auth != "NoClientCert" and not has_ca:
        raise _fail(source, f"{loc}.client_auth_type", f"{auth} needs client_ca_file")
    out["client_auth_type"] = auth
    out["client_allowed_sans"] = _strs(source, v.get("client_allowed_sans"),
                                       f"{loc}.client_allowed_sans")
    if out["client_allowed_sans"] and auth != "RequireAndVerifyClientCert":
        raise _fail(source, f"{loc}.client_allowed_sans",
                    "needs client_auth_type: RequireAndVerifyClientCert")
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = v.get(key) or default
        if value not in VERSIONS:
            raise _fail(source, f"{loc}.{key}", f"must be one of {', '.join(VERSIONS)}")
        out[key] = value
    if VERSIONS[out["min_version"]] > VERSIONS[out["max_version"]]:
        raise _fail(source, f"{loc}.min_version", "is above max_version")
    suites = _strs(source, v.get("cipher_suites"), f"{loc}.cipher_suites")
    for i, name in enumerate(suites):
        if name not in CIPHERS and name not in TLS13_SUITES:
            raise _fail(source, f"{loc}.cipher_suites[{i}]", f"unknown cipher suite {name!r}")
    out["cipher_suites"] = suites
    prefer = v.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise _fail(source, f"{loc}.prefer_server_cipher_suites", "expected true or false")
    out["prefer_server_cipher_suites"] = prefer
    curves = _strs(source, v.get("curve_preferences"), f"{loc}.curve_preferences")
    for i, name in enumerate(curves):
        if name not in CURVES:
            raise _fail(source, f"{loc}.curve_preferences[{i}]", f"unknown curve {name!r}")
    if curves:
        notes.append("tls_server_config.curve_preferences is not applied: OpenSSL's default "
                     "key exchange groups are used")
    out["curve_preferences"] = curves
    return TLSSettings(**out), notes


def _duration(source: str, value: Any, loc: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _DURATION.match(str(value)) if isinstance(value, str) and value else None
    if m is None:
        raise _fail(source, loc, f"expected a duration like 1s or 500ms, got {value!r}")
    h, mi, s, ms = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def load_web_config(path: str) -> WebConfig:
    """Parse and validate; every problem is one ``ConfigError`` line."""
    raw = read_yaml(path)
    if raw is None or raw == {}:  # fail closed: never read as "no TLS, no auth"
        raise _fail(path, "", "is empty (no tls_server_config, no basic_auth_users; a file "
                    "being rewritten?); to serve without TLS and authentication, do not "
                    "give a web config file")
    base = os.path.dirname(os.path.abspath(path))
    values = _map(path, raw, "", TOP_KEYS)
    notes: list[str] = []
    tls = None
    if values.get("tls_server_config") is not None:
        tls, more = _tls(path, values["tls_server_config"], base)
        notes += more
    http = _map(path, values.get("http_server_config"), "http_server_config", HTTP_KEYS)
    if not isinstance(http.get("http2", True), bool):
        raise _fail(path, "http_server_config.http2", "expected true or false")
    headers = _map(path, http.get("headers"), "http_server_config.headers", HEADER_KEYS)
    header_items = tuple((k, _str(path, v, f"http_server_config.headers.{k}"))
                         for k, v in headers.items() if v not in (None, ""))
    users_raw = values.get("basic_auth_users") or {}
    if not isinstance(users_raw, Mapping):
        raise _fail(path, "basic_auth_users", "expected a mapping user: bcrypt-hash")
    users: dict[str, str] = {}
    for user, hashed in users_raw.items():
        loc = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            raise _fail(path, loc, "user names must be non-empty strings without ':'")
        if not isinstance(hashed, str) or not _BCRYPT.match(hashed):
            raise _fail(path, loc, "expected a bcrypt hash ($2y$10$...; see "
                        "`htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
        users[user] = hashed
    if users:
        try:
            import bcrypt  # noqa: F401  (optional dependency, extra [auth])
        except ImportError:
            raise _fail(path, "basic_auth_users", "needs the bcrypt package, which is not "
                        "installed: pip install 'bnexporter[auth]'") from None
        if tls is None:
            notes.append("basic_auth_users without tls_server_config: passwords cross the "
                         "network in clear text")
    rate = None
    if values.get("rate_limit") is not None:
        r = _map(path, values["rate_limit"], "rate_limit", ("interval", "burst"))
        interval = _duration(path, r.get("interval", 0), "rate_limit.interval")
        burst = r.get("burst", 0)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            raise _fail(path, "rate_limit.burst", "expected a non-negative integer")
        if interval > 0:
            rate = (interval, max(1, burst))
    web = WebConfig(source=path, tls=tls, users=users, headers=header_items,
                    rate_limit=rate, notes=tuple(notes))
    if tls is not None:
        ssl_context(web)  # load the certificates now: a bad key fails at start-up
    return web


def _memfd(text: str, name: str) -> int:
    """Inline PEM as an anonymous in-memory file (never written to disk)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, text.encode("utf-8"))
    return fd


def ssl_context(web: WebConfig) -> ssl.SSLContext:
    """A server context for ``web.tls``; ``ConfigError`` when files do not load."""
    t = web.tls
    assert t is not None
    loc = f"{web.source}: tls_server_config"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[t.min_version]
    ctx.maximum_version = VERSIONS[t.max_version]
    fds: list[int] = []
    try:
        cert = t.cert_file
        key = t.key_file
        if t.cert is not None:
            fds.append(_memfd(t.cert, "cert"))
            cert = f"/proc/self/fd/{fds[-1]}"
        if t.key is not None:
            fds.append(_memfd(t.key, "key"))
            key = f"/proc/self/fd/{fds[-1]}"
        assert cert is not None and key is not None
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{loc}: cannot load the certificate and key: "
                          f"{getattr(exc, 'reason', None) or exc}") from None
    finally:
        for fd in fds:
            os.close(fd)
    mode = CLIENT_AUTH[t.client_auth_type]
    assert mode is not None
    if mode != ssl.CERT_NONE:
        try:
            if t.client_ca_file:
                ctx.load_verify_locations(cafile=t.client_ca_file)
            else:
                ctx.load_verify_locations(cadata=t.client_ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"{loc}: cannot load the client CA: {exc}") from None
        ctx.verify_mode = mode
    if t.cipher_suites:
        names = [CIPHERS[n] for n in t.cipher_suites if n in CIPHERS]
        if names:
            try:
                ctx.set_ciphers(":".join(names))
            except ssl.SSLError as exc:
                raise ConfigError(f"{loc}.cipher_suites: {exc}") from None
    if t.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def allowed_san(cert: dict[str, Any] | None, allowed: tuple[str, ...]) -> bool:
    """Whether a verified peer certificate names one of ``allowed`` exactly
    (DNS, IP, e-mail or URI SAN, as the toolkit matches)."""
    if not allowed:
        return True
    if not cert:
        return False
    names = {value for kind, value in cert.get("subjectAltName", ())
             if kind in ("DNS", "IP Address", "email", "URI")}
    return any(a in names for a in allowed)
