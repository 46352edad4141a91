"""The hooks the daemon's own end-to-end tests use, read from the environment once.

Everything here is off unless ``BNEXPORTER_TEST_HOOKS=1`` is set when the daemon
starts; production code asks this module, never the environment:

- ``ENABLED``: serve ``POST /-/test/crash-watcher`` (``daemon.py``, ``web/app.py``),
  which makes each watcher's dispatcher thread die on its next event (``watch.py``);
- ``ANALYSIS_DELAY``: seconds to sleep between an analysis's completeness check and
  its read (``BNEXPORTER_TEST_ANALYSIS_DELAY``), widening the window in which a file
  can change after it was judged complete (``worker.py``).

Analysis children started by the forkserver import this module afresh, but the
delay is passed to them as an argument, so they never read the environment either.
"""

from __future__ import annotations

import os


def _analysis_delay(enabled: bool) -> float:
    if not enabled:
        return 0.0
    try:
        return float(os.environ.get("BNEXPORTER_TEST_ANALYSIS_DELAY", "0"))
    except ValueError:
        return 0.0


ENABLED = os.environ.get("BNEXPORTER_TEST_HOOKS") == "1"
ANALYSIS_DELAY = _analysis_delay(ENABLED)
