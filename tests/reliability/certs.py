"""A throw-away PKI made with the ``openssl`` CLI at test time: a CA, a server
certificate for localhost / 127.0.0.1 and client certificates with chosen SANs."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")

_CA_EXT = """basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
_LEAF_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
"""


@dataclass
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path

    def leaf(self, name: str, san: str, usage: str = "clientAuth") -> tuple[Path, Path]:
        """A certificate + key signed by the CA (e.g. ``san="DNS:scraper.example"``)."""
        return _leaf(self.dir, name, san, usage, self.ca, self.dir / "ca.key")


def _run(*args: str) -> None:
    assert OPENSSL, "the openssl command-line tool is needed for the TLS tests"
    res = subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def _key(path: Path) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def _leaf(d: Path, name: str, san: str, usage: str, ca: Path, ca_key: Path
          ) -> tuple[Path, Path]:
    key, csr, crt, ext = (d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt",
                          d / f"{name}.ext")
    _key(key)
    _run("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    ext.write_text(_LEAF_EXT.format(usage=usage, san=san))
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(crt))
    return crt, key


def make_pki(d: Path) -> PKI:
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca = d / "ca.key", d / "ca.crt"
    _key(ca_key)
    (d / "ca.ext").write_text(_CA_EXT)
    _run("req", "-new", "-x509", "-key", str(ca_key), "-subj", "/CN=bnexporter test CA",
         "-days", "2", "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(ca))
    cert, key = _leaf(d, "server", "DNS:localhost,IP:127.0.0.1", "serverAuth", ca, ca_key)
    return PKI(d, ca, cert, key)
