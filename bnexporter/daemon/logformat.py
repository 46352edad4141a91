"""Log lines as node_exporter writes them: ``--log.format=logfmt`` (default) or ``json``.

    time=2025-05-01T12:00:00.123Z level=info source=bnexporter.planner msg="model a: ..."
    {"time": "2025-05-01T12:00:00.123Z", "level": "info", "source": "...", "msg": "..."}

Timestamps are RFC 3339 in UTC with milliseconds. Every record is one line: control
characters in messages (names come from folders anyone can create) are escaped as in
``logsafe``, and a traceback goes into one ``err`` field with its line breaks escaped.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from bnexporter.daemon.logsafe import escape_controls

FORMATS = ("logfmt", "json")


def rfc3339(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, str]:
    out = {"time": rfc3339(record.created), "level": record.levelname.lower(),
           "source": record.name, "msg": record.getMessage()}
    if record.exc_info:
        out["err"] = formatter.formatException(record.exc_info)
    elif record.exc_text:
        out["err"] = record.exc_text
    return out


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' ="\\') and escape_controls(value) == value:
        return value
    return '"' + escape_controls(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record, self).items())


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # ensure_ascii: every control and non-ASCII character is a \\u escape
        return json.dumps(_fields(record, self), ensure_ascii=True)


def setup(level: str, fmt: str = "logfmt") -> None:
    """One record per line on stderr, at ``level`` for the bnexporter loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger("bnexporter").setLevel(level.upper())
