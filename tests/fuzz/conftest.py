"""Fuzz tests run in-process; cap the address space while they do, so a parser that
allocates what its input declares fails with MemoryError (a bug) instead of
swapping a shared machine."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

HEADROOM = 3 << 30


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(autouse=True)
def address_space_cap() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
