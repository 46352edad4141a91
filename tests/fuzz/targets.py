"""Fuzz entry points shared by the hypothesis tests and the atheris harness.

Each ``target_*`` takes bytes, feeds them to one parser, and returns normally
when the parser either accepted them or refused them with the project's own
error (``CheckpointError``; ``Refused`` inside the unpickler). Anything else
escapes as an exception, and that is the bug: an unexpected exception type, an
error message that is not one line, a refusal that only happened because a
MemoryError was caught, or (for pickles) a process/network call made while
unpickling.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bnexporter.errors import CheckpointError  # noqa: E402
from bnexporter.formats import (  # noqa: E402
    sstable,
    tf_bundle,
    torch_layout,
    torch_pickle,
    zipmember,
)
from bnexporter.formats.base import RangeFile, Reader  # noqa: E402
from bnexporter.formats.npz import NpzReader  # noqa: E402
from bnexporter.formats.safetensors import SafetensorsReader  # noqa: E402
from bnexporter.formats.torch_export import TorchExportReader  # noqa: E402
from bnexporter.formats.torch_legacy import TorchLegacyReader  # noqa: E402
from bnexporter.formats.torch_zip import TorchZipReader  # noqa: E402
from bnexporter.formats.torchscript import TorchScriptReader  # noqa: E402
from bnexporter.scan import analyse_path  # noqa: E402

# elements read per fuzz input at most (declared sizes are the fuzzer's to choose)
READ_BUDGET = 1 << 20

_SCRATCH = tempfile.mkdtemp(prefix="bnx-fuzz-")


class FuzzBug(AssertionError):
    """A parser broke a rule other than by raising an unexpected exception."""


AUDITED = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "subprocess.Popen",
           "socket.connect", "socket.getaddrinfo", "webbrowser.open", "ctypes.dlopen",
           "os.remove", "os.unlink", "shutil.rmtree", "pty.spawn")
_armed: list[bool] = [False]
_events: list[str] = []


def _hook(event: str, args: tuple) -> None:
    if _armed[0] and event.startswith(AUDITED):
        _events.append(f"{event} {str(args)[:120]}")


sys.addaudithook(_hook)


def no_side_effects(fn: Callable[[], object]) -> object:
    """Run ``fn``; fail if it made any audited call (process, shell, network, unlink)."""
    _events.clear()
    _armed[0] = True
    try:
        return fn()
    finally:
        _armed[0] = False
        if _events:
            raise FuzzBug(f"side effects while parsing: {_events}")


def check_message(msg: str) -> None:
    """An error the project reports must be one line and a deliberate refusal."""
    if "\n" in msg:
        raise FuzzBug(f"error is not one line: {msg!r}")
    if " reader failed: " in msg:
        raise FuzzBug(f"unexpected exception inside a reader: {msg!r}")
    if "MemoryError" in msg:
        raise FuzzBug(f"refusal relied on a MemoryError: {msg!r}")


def check_error(exc: CheckpointError) -> None:
    check_message(str(exc))


def scratch(name: str, data: bytes) -> str:
    path = os.path.join(_SCRATCH, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def read_all(reader: Reader) -> None:
    """Read (a bounded prefix of) every tensor, as the analysis would."""
    budget = READ_BUDGET
    for info in reader.tensors():
        n = min(info.size, budget)
        budget -= n
        out = reader.read(info.name, 0, n)
        if out.size != n:
            raise FuzzBug(f"read of {n} elements of {info.name!r} returned {out.size}")
        if budget <= 0:
            break


def _open_and_read(cls: type[Reader], path: str) -> None:
    try:
        with cls(path) as reader:  # type: ignore[call-arg]
            read_all(reader)
    except CheckpointError as exc:
        check_error(exc)


def analyse(path: str) -> None:
    """The whole pipeline (detect, open, discover, analyse): no traceback may escape."""
    report = analyse_path(path)
    if report.error is not None:
        check_message(report.error)


# -- known bugs ----------------------------------------------------------------------------

# Signatures of the bugs listed in docs/reliability.md. Long exploring runs set
# BNEXPORTER_FUZZ_IGNORE_KNOWN=1 so one known bug does not hide the next; CI never
# does, so these tests stay red until the bugs are fixed.
KNOWN = {
    "B3": r"unhashable type.*formats/safetensors\.py",
    "B4": r"Exceeds the limit \(\d+ digits\) for integer string conversion",
    "B5": r"MemoryError while analysing|array is too big.*analysis\.py",
    "B6": r"formats/npz\.py|npz reader failed|negative dimensions are not allowed",
    "B7": r"object has no attribute 'get'.*keras_graph\.py",
    "B9": r"keras reader failed: BadZipFile",
    "B19": r"keras(-h5)? reader failed: (RuntimeError|KeyError|ValueError|TypeError|OSError)"
           r"|^(RuntimeError|KeyError|ValueError|TypeError|OSError): .*hdf5_keras\.py",
}
IGNORE_KNOWN = os.environ.get("BNEXPORTER_FUZZ_IGNORE_KNOWN") == "1"


def known_bug(exc: BaseException) -> str | None:
    """Which known bug ``exc`` is, judged by its message and the files it passed through."""
    import re
    import traceback

    files = " ".join(f.filename for f in traceback.extract_tb(exc.__traceback__))
    text = f"{exc.__class__.__name__}: {exc} @ {files}"
    return next((bug for bug, pattern in KNOWN.items() if re.search(pattern, text, re.S)),
                None)


# seconds one input may take: every input here is small, so more means a hang or a
# loop over what the input merely declares
TIME_LIMIT = float(os.environ.get("BNEXPORTER_FUZZ_TIMEOUT", "10"))


class FuzzTimeout(FuzzBug):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise FuzzTimeout(f"one input took more than {TIME_LIMIT} s")


def known_message(msg: str) -> str | None:
    """Which known bug an error line (from a sandboxed analysis) shows, if any."""
    import re

    return next((bug for bug, pattern in KNOWN.items() if re.search(pattern, msg)), None)


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Time-limit one input; with BNEXPORTER_FUZZ_IGNORE_KNOWN=1 swallow known bugs."""
    def run(*args: object, **kwargs: object) -> None:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            bug = known_bug(exc)
            if bug and IGNORE_KNOWN:
                return
            exc.add_note(f"[known bug {bug}, docs/reliability.md]" if bug else "[NEW]")
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# -- targets --------------------------------------------------------------------------


@guarded
def target_safetensors(data: bytes) -> None:
    path = scratch("f.safetensors", data)
    _open_and_read(SafetensorsReader, path)
    analyse(path)


@guarded
def target_npz(data: bytes) -> None:
    path = scratch("f.npz", data)
    _open_and_read(NpzReader, path)
    analyse(path)


@guarded
def target_zipmember(data: bytes) -> None:
    path = scratch("f.zip", data)
    try:
        f = RangeFile(path)
    except CheckpointError as exc:
        check_error(exc)
        return
    try:
        for entry in zipmember.read_directory(f).values():
            try:
                start = zipmember.data_offset(f, entry)
                if start < 0 or start + entry.size > f.size:
                    raise FuzzBug(f"member {entry.name!r} located outside the file: "
                                  f"{start}+{entry.size} > {f.size}")
                zipmember.read_member(f, entry, 1 << 20)
            except CheckpointError as exc:
                check_error(exc)
    except CheckpointError as exc:
        check_error(exc)
    finally:
        f.close()


@guarded
def target_pickle(data: bytes, legacy: bool = False) -> None:
    """The restricted unpickler and the interpretation of what it built."""
    def run() -> None:
        try:
            root = torch_pickle.load(data, legacy=legacy)
            torch_layout.interpret(root)
        except torch_pickle.Refused as exc:
            if "\n" in exc.cause:
                raise FuzzBug(f"refusal is not one line: {exc.cause!r}") from None
    no_side_effects(run)


@guarded
def target_torch_zip(data: bytes) -> None:
    path = scratch("f.pt", data)
    no_side_effects(lambda: _open_and_read(TorchZipReader, path))
    analyse(path)


@guarded
def target_torch_legacy(data: bytes) -> None:
    path = scratch("legacy.pt", data)
    no_side_effects(lambda: _open_and_read(TorchLegacyReader, path))
    analyse(path)


@guarded
def target_torchscript(data: bytes) -> None:
    """A TorchScript archive: data.pkl in TorchScript mode, code/ declarations, storages;
    then the whole analysis (which also reads the archive's own graph)."""
    path = scratch("ts.pt", data)
    no_side_effects(lambda: _open_and_read(TorchScriptReader, path))
    analyse(path)


@guarded
def target_torch_export(data: bytes) -> None:
    """A torch.export .pt2: weights config, raw records, the program's BN epsilons."""
    path = scratch("f.pt2", data)
    no_side_effects(lambda: _open_and_read(TorchExportReader, path))
    analyse(path)


@guarded
def target_sstable(data: bytes) -> None:
    try:
        for _key, value in sstable.read_table(data, "f.index"):
            try:
                tf_bundle.parse_entry(value, "k", "f.index")
            except CheckpointError as exc:
                check_error(exc)
    except CheckpointError as exc:
        check_error(exc)


@guarded
def target_tf_bundle(index: bytes, shard: bytes) -> None:
    prefix = os.path.join(_SCRATCH, "ckpt")
    scratch("ckpt.index", index)
    scratch("ckpt.data-00000-of-00001", shard)
    _open_and_read(tf_bundle.TFBundleReader, prefix)
    analyse(prefix + ".index")


@guarded
def target_tf_graph(graph: bytes) -> None:
    try:
        nodes = tf_bundle.parse_object_graph(graph, "g")
        tf_bundle.name_from_graph(nodes, ["a", "b/.ATTRIBUTES/VARIABLE_VALUE"])
    except CheckpointError as exc:
        check_error(exc)


@guarded
def target_saved_model(raw: bytes) -> None:
    """saved_model.pb: the function library, object graph and inlining of every candidate."""
    from bnexporter.topology import tf_functions, tf_graph

    try:
        sm = tf_functions.parse_saved_model(raw, "saved_model.pb")
        if sm is None:
            return
        names = tf_functions.checkpoint_keys(sm)
        for name in tf_functions.candidates(sm)[:3]:
            tf_graph.graph_from_graph_def(tf_functions.flatten(sm, name, names, "f"))
    except CheckpointError as exc:
        check_error(exc)


@guarded
def target_h5(data: bytes) -> None:
    """In-process: only for atheris (a libhdf5 crash is what it is looking for)."""
    from bnexporter.formats.hdf5_keras import KerasH5Reader

    path = scratch("f.weights.h5", data)
    _open_and_read(KerasH5Reader, path)
    analyse(path)


@guarded
def target_keras_zip(data: bytes) -> None:
    from bnexporter.formats.keras_zip import KerasZipReader

    path = scratch("f.keras", data)
    _open_and_read(KerasZipReader, path)
    analyse(path)
