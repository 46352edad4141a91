"""Hostile TorchScript archives and torch.export ``.pt2`` files: each one must end in a
one-line CheckpointError or a normal read, in bounded time and memory, whatever the
archive declares. Files are built at test time from the real fixtures (stdlib only).

Time limits are generous multiples of what the readers need (tens of ms); the inputs
are sized so that the quadratic or unbounded behaviour they guard against would take
far longer, and an alarm stops the test instead of letting it run on.
"""

from __future__ import annotations

import json
import os
import signal
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from bnexporter.errors import CheckpointError
from bnexporter.formats import open_reader
from tests.formats.test_torchscript_pt2 import ts_pickle, write_ts

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")
SEQNET_PT2 = os.path.join(FIX, "graph_sources", "seqnet.pt2")
CONFIG = "seqnet/data/weights/model_weights_config.json"
PROGRAM = "seqnet/models/model.json"


class TooSlow(AssertionError):
    pass


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the body takes longer than ``seconds``. The alarm
    may land anywhere (a reader may even wrap it in a CheckpointError): whatever comes
    out once it fired is replaced by one plain TooSlow."""
    fired: list[bool] = []

    def alarm(_signum: int, _frame: object) -> None:
        fired.append(True)
        raise TooSlow(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except BaseException:
        if fired:
            raise TooSlow(f"took more than {seconds} s") from None
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:
        raise TooSlow(f"took more than {seconds} s")


def peak_mib(fn: Callable[[], Any]) -> float:
    """Peak of Python allocations made while ``fn`` runs, in MiB."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()


def one_line(exc: CheckpointError) -> None:
    assert "\n" not in str(exc) and " reader failed: " not in str(exc), str(exc)


def open_all(path: str) -> None:
    with open_reader(path) as r:
        for name in r.names():
            r.read(name, 0, min(r.info(name).size, 64))


# -- torch.export ------------------------------------------------------------------------

def pt2(tmp_path, edit: Callable[[dict[str, bytes]], None], deflate: tuple[str, ...] = ()
        ) -> str:
    """seqnet.pt2 with its members edited; members named in ``deflate`` compressed."""
    with zipfile.ZipFile(SEQNET_PT2) as src:
        members = {i.filename: src.read(i.filename) for i in src.infolist()}
    edit(members)
    path = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
    return str(path)


def _add_weights(members: dict[str, bytes], names: list[str]) -> None:
    cfg = json.loads(members[CONFIG])
    template = next(iter(cfg["config"].values()))
    empty = dict(template["tensor_meta"], sizes=[{"as_int": 0}], strides=[{"as_int": 1}])
    for name in names:
        cfg["config"][name] = dict(template, tensor_meta=empty)
    members[CONFIG] = json.dumps(cfg).encode()


def test_pt2_deeply_dotted_names_cost_linear_time(tmp_path):
    """400 names of 2,000 parts each (a 70 KB file): ranking modules by their whole
    dotted prefixes was quadratic in the parts (~10 s); numbered parts are linear."""
    names = [f"m{i}." + "a." * 2000 + "w" for i in range(400)]
    path = pt2(tmp_path, lambda m: _add_weights(m, names), deflate=(CONFIG,))
    with within(5), open_reader(path) as r:
        assert set(names) <= set(r.names())
        assert r.names()[-len(names):] == names  # deeper modules after the real ones


def _json_bomb(raw: bytes, megabytes: int) -> bytes:
    """The same JSON object with a key holding ``megabytes`` of ``[],`` (~20x that once
    parsed into Python lists); compressed, a few KB."""
    doc = raw.rstrip()
    assert doc.endswith(b"}")
    pad = b'"pad": [' + b"[]," * ((megabytes << 20) // 3) + b"[]]"
    return doc[:-1] + b", " + pad + b"}"


def test_pt2_weights_config_json_bomb_is_refused_unparsed(tmp_path):
    def edit(m: dict[str, bytes]) -> None:
        m[CONFIG] = _json_bomb(m[CONFIG], 17)
    path = pt2(tmp_path, edit, deflate=(CONFIG,))
    assert os.path.getsize(path) < 200_000
    with pytest.raises(CheckpointError) as exc:
        open_reader(path)
    assert exc.value.reason == "too_large"
    one_line(exc.value)


def test_pt2_program_json_bomb_is_not_parsed(tmp_path):
    """The program is read for BN epsilons only: past MAX_PROGRAM it is skipped (the
    epsilons are lost), not parsed into ~20x its size."""
    def edit(m: dict[str, bytes]) -> None:
        m[PROGRAM] = _json_bomb(m[PROGRAM], 17)
    path = pt2(tmp_path, edit, deflate=(PROGRAM,))

    def run() -> None:
        with open_reader(path) as r:
            assert len(r.names()) == 36
    assert peak_mib(run) < 32



def test_pt2_program_json_bomb_is_not_parsed_as_a_graph(tmp_path):
    """The graph source reads the same program: past MAX_PROGRAM it is refused as too
    large before json.loads (64 MB of it took 1.7 GB and 14 s)."""
    from bnexporter.errors import CheckpointError
    from bnexporter.topology.torch_graph import graph_from_export

    def edit(m: dict[str, bytes]) -> None:
        m[PROGRAM] = _json_bomb(m[PROGRAM], 17)
    path = pt2(tmp_path, edit, deflate=(PROGRAM,))

    def run() -> None:
        with pytest.raises(CheckpointError) as err:
            graph_from_export(path)
        assert err.value.reason == "too_large"
    assert peak_mib(run) < 32


# -- TorchScript ---------------------------------------------------------------------------

def ts_with_code(tmp_path, files: dict[str, str]) -> str:
    """A valid synthetic TorchScript archive plus extra ``code/`` files."""
    storages: dict[str, bytes] = {}
    path = write_ts(tmp_path / "net.pt", ts_pickle(storages), storages)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(f"net/code/__torch__/{name}", text)
    return path


def test_torchscript_declaration_lists_are_matched_not_evaluated(tmp_path):
    """200 declarations of 13,000 names each (a 20 KB file): ast.literal_eval took ~0.17 s
    per list, so a code/ of 64 MB held a worker for minutes."""
    lit = "[" + ", ".join(['"w"'] * 13000) + ", ]"
    path = ts_with_code(tmp_path, {"junk.py": "class A(Module):\n"
                                   + f"  __parameters__ = {lit}\n" * 200})
    assert os.path.getsize(path) < 100_000
    with within(3), open_reader(path) as r:
        assert r.names() == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]


@pytest.mark.parametrize("literal,names", [
    ('["weight", "bias", ]', ("weight", "bias")), ("[]", ()), ('["0", "1"]', ("0", "1")),
    ("['weight']", None), ('[__import__("os").system("x")]', None), ('["a" "b"]', None),
    ('["a", , ]', None), ('["' + "a" * 70000 + '"]', None)])
def test_torchscript_declaration_literals(literal, names):
    from bnexporter.formats.torchscript_layout import _names

    assert _names(literal) == names


def test_torchscript_class_flood_is_refused(tmp_path):
    """70,000 empty classes (~200 B each as a declaration record; 64 MB of code/ would
    be ~1.5 GB): refused past MAX_CLASSES."""
    path = ts_with_code(tmp_path, {"junk.py": "".join(f"class c{i}:\n" for i in range(70_000))})
    with pytest.raises(CheckpointError) as exc:
        open_reader(path)
    assert exc.value.reason == "too_large" and "classes" in str(exc.value)
    one_line(exc.value)


def test_torchscript_code_of_short_lines_is_read_line_by_line(tmp_path):
    """A 2 MB code file of 700 k short lines: text.splitlines() held ~20x the file."""
    path = ts_with_code(tmp_path, {"junk.py": "ab\n" * 700_000})
    assert peak_mib(lambda: open_all(path)) < 24


def test_torchscript_crlf_code_keeps_its_declarations(tmp_path):
    code = ('class BatchNorm2d(Module):\r\n  __parameters__ = ["weight", "bias", ]\r\n'
            '  __buffers__ = ["running_mean", "running_var", ]\r\n'
            "  eps : Final[float] = 0.001\r\n")
    storages: dict[str, bytes] = {}
    path = write_ts(tmp_path / "net.pt", ts_pickle(storages), storages, bn_code=code)
    with open_reader(path) as r:
        assert r.names() == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
        assert r.meta.bn_eps == {"bn": pytest.approx(1e-3)}
