"""Analyse checkpoint paths sent on stdin, one JSON request per line, under a memory cap.

Run by :mod:`tests.hostile.sandbox`, never by pytest directly. The address-space
limit is set before bnexporter is imported, so a reader that allocates what a
file declares instead of what it holds fails here instead of swapping the
machine; an audit hook records any process, shell or network call made while a
file is analysed (a pickle that executes code would show up here even if its
payload did nothing visible).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback


def _own_child(pid: object) -> bool:
    """True when ``pid`` is a child of this worker (read from /proc)."""
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:  # type: ignore[call-overload]
            return int(fh.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


# events that mean "the file made us run something or reach out"; a bare os.fork is
# not among them: the HDF5 reader forks a metadata probe on purpose (B20), and a fork
# alone runs nothing new (the marker files catch any payload that does)
AUDITED = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.forkpty",
           "subprocess.Popen", "socket.connect", "socket.bind", "socket.getaddrinfo",
           "webbrowser.open", "ctypes.dlopen", "ctypes.call_function",
           "os.remove", "os.unlink", "os.rmdir", "shutil.rmtree", "os.kill", "pty.spawn")


def main() -> None:
    limit, root = int(sys.argv[1]), sys.argv[2]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.path.insert(0, root)
    # replies go to a private copy of stdout; stray C-level prints land on stderr
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    # import every reader, and h5py (imported on first use by the reader; its import runs
    # `uname -p`), before the hook is armed
    import h5py  # noqa: F401

    from bnexporter.formats import (  # noqa: F401
        hdf5_keras,
        keras_zip,
        npz,
        safetensors,
        tf_bundle,
        torch_legacy,
        torch_zip,
    )
    from bnexporter.scan import analyse_path

    events: list[str] = []
    armed = [False]

    def hook(event: str, args: tuple) -> None:
        if armed[0] and event.startswith(AUDITED):
            if event == "os.kill" and _own_child(args[0]):
                return  # the HDF5 probe's deadline stopping the probe it forked
            events.append(f"{event} {str(args)[:200]}")

    sys.addaudithook(hook)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        path, marker = req["path"], req.get("marker")
        out: dict = {}
        events.clear()
        started = time.perf_counter()
        armed[0] = True
        try:
            rep = analyse_path(path)
            out.update(status="error" if rep.error else "ok", error=rep.error,
                       reason=rep.error_reason, nonfinite=rep.summary.nonfinite,
                       tensors=len(rep.tensors), layers=len(rep.bn_layers), format=rep.format)
        except BaseException:  # a traceback escaping analyse_path is the bug we look for
            out.update(status="exception", traceback=traceback.format_exc()[-3000:])
        armed[0] = False
        out["seconds"] = round(time.perf_counter() - started, 3)
        out["audit"] = list(events)
        out["marker"] = bool(marker) and os.path.exists(marker)
        out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["pid"] = os.getpid()
        out["rlimit_as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
        reply.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
