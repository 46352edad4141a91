"""Helpers for the reliability tests: configs and shared folders for the daemon
(which ``tests.support.daemon.DaemonProcess`` runs), its process tree and resource
use read from /proc, small checkpoint writers and TLS clients."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

NOBODY = 54321  # a uid/gid with no other processes, for tests that need a non-root daemon


def base_config(**extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0", "log_level": "debug", "poll_interval": 0.3,
        "rescan_interval": 5, "settle_seconds": 0.3, "analysis_timeout": 60,
        "retry": {"initial_delay": 0.2, "max_delay": 0.5, "give_up_after": 3,
                  "max_attempts": 20},
    }
    cfg.update(extra)
    return cfg


def shared_dir(prefix: str = "bnexporter-rel-", owner: int | None = None) -> Path:
    """A folder outside pytest's 0700 basetemp, so another uid can reach it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


# -- /proc ------------------------------------------------------------------------

def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    tree = children_map()
    out, stack = [], list(tree.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(tree.get(p, []))
    return out


def exists(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:data.rfind(b")") + 3] != b"Z"


def usage(pid: int) -> dict[str, int]:
    """RSS (kB), open fds, threads of ``pid``; processes below it."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads,
            "children": len(descendants(pid))}


# -- checkpoints -------------------------------------------------------------------

def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file (float32/int64 only), written by hand."""
    header: dict[str, Any] = {}
    offset = 0
    blobs = []
    for name, arr in tensors.items():
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[arr.dtype]
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


# the synthetic BNs of bn_tensors() have no graph: a test that counts their dead channels
# says they feed ReLUs (an unknown consumer is never counted dead)
RELU_RULE = {"consumers": {"rules": {"*": "relu"}}}


def bn_tensors(layers: list[str], channels: int = 8, dead: int = 2, seed: int = 0,
               pad_elements: int = 0) -> dict[str, np.ndarray]:
    """Torch-named BN layers with ``dead`` dead channels each, plus optional padding."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in layers:
        beta = rng.uniform(0.0, 0.2, channels).astype(np.float32)
        beta[:dead] = -5.0
        out[f"{name}.weight"] = rng.uniform(0.8, 1.2, channels).astype(np.float32)
        out[f"{name}.bias"] = beta
        out[f"{name}.running_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
        out[f"{name}.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    if pad_elements:
        out["head.weight"] = rng.normal(0, 0.02, pad_elements).astype(np.float32)
    return out


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tls_client(ca: Path, cert: Path | None = None, key: Path | None = None,
               max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def raw_connect(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)
