"""YAML file + command-line flags -> ``Config``, or one precise error line.

Every problem is reported as ``<file>: <location>: <problem>`` (for example
``config.yaml: models[2].path: not a directory``) so an operator can fix it
without reading a traceback. Relative paths are relative to the config file.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from bnexporter.daemon.config import (
    ISOLATIONS,
    LAYER_DETAILS,
    LOG_FORMATS,
    LOG_LEVELS,
    PLACEHOLDER,
    WATCH_MODES,
    Analysis,
    CensusOptions,
    Config,
    ConfigError,
    MetricOptions,
    ModelSpec,
    Retry,
    read_yaml,
)
from bnexporter.detection.analysis import Thresholds
from bnexporter.topology.consumers import PRESETS
from bnexporter.topology.keras_graph import CONSUMERS

THRESHOLD_KEYS = tuple(f.name for f in fields(Thresholds))
METRIC_KEYS = tuple(f.name for f in fields(MetricOptions))
CENSUS_KEYS = tuple(f.name for f in fields(CensusOptions))
RETRY_KEYS = tuple(f.name for f in fields(Retry))
ANALYSIS_KEYS = ("patterns", "bn_only", "step_regex", "eps", "thresholds", "consumers",
                 "metrics", "backfill", "follow_symlinks", "census")
TOP_KEYS = ("listen", "telemetry_path", "log_level", "log_format", "watch", "poll_interval",
            "rescan_interval", "settle_seconds", "workers", "analysis_timeout", "stall_timeout",
            "isolation", "web_config_file", "retry", "shard", *ANALYSIS_KEYS, "models")
MODEL_KEYS = ("name", "path", "watch", *ANALYSIS_KEYS)


# the node_exporter-style name of each flag that sets a top-level key (messages name it)
FLAG_NAMES = {"listen": "--web.listen-address", "telemetry_path": "--web.telemetry-path",
              "web_config_file": "--web.config.file", "log_level": "--log.level",
              "log_format": "--log.format"}


@dataclass
class Overrides:
    """Values given as flags; ``None`` means "not given"."""

    watch: list[str] = field(default_factory=list)  # [NAME=]DIR, repeatable
    listen: str | None = None
    poll_interval: float | None = None
    log_level: str | None = None
    log_format: str | None = None
    telemetry_path: str | None = None
    shard: str | None = None
    bn_only: bool | None = None
    watch_mode: str | None = None
    workers: int | None = None
    web_config_file: str | None = None


class _Ctx:
    def __init__(self, source: str, base_dir: str, check_paths: bool):
        self.source = source
        self.base_dir = base_dir
        self.check_paths = check_paths

    def fail(self, loc: str, problem: str) -> ConfigError:
        prefix = f"{self.source}: {loc}" if loc else self.source
        return ConfigError(f"{prefix}: {problem}")


def _join(loc: str, key: str) -> str:
    return f"{loc}.{key}" if loc else key


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(ctx: _Ctx, value: Any, loc: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.fail(loc, f"expected a mapping, got {_short(value)}")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            more = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ctx.fail(_join(loc, str(key)), f"unknown key{more}")
    return dict(value)


def _number(ctx: _Ctx, value: Any, loc: str, *, positive: bool = True,
            below_one: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.fail(loc, f"expected a number, got {_short(value)}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0) or v < 0:
        raise ctx.fail(loc, f"must be a {'positive' if positive else 'non-negative'} "
                            f"finite number, got {_short(value)}")
    if below_one and v >= 1:
        raise ctx.fail(loc, f"must be below 1, got {_short(value)}")
    return v


def _integer(ctx: _Ctx, value: Any, loc: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.fail(loc, f"expected an integer, got {_short(value)}")
    if value < minimum:
        raise ctx.fail(loc, f"must be >= {minimum}, got {value}")
    return value


def _boolean(ctx: _Ctx, value: Any, loc: str) -> bool:
    if not isinstance(value, bool):
        raise ctx.fail(loc, f"expected true or false, got {_short(value)}")
    return value


def _choice(ctx: _Ctx, value: Any, loc: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ctx.fail(loc, f"must be one of {', '.join(choices)}, got {_short(value)}")
    return str(value)


def _regex(ctx: _Ctx, value: Any, loc: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ctx.fail(loc, f"expected a regular expression, got {_short(value)}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ctx.fail(loc, f"not a valid regular expression ({exc})") from None
    return value


def _strings(ctx: _Ctx, value: Any, loc: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ctx.fail(loc, f"expected a non-empty list of strings, got {_short(value)}")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ctx.fail(f"{loc}[{i}]", f"expected a non-empty string, got {_short(item)}")
    return tuple(items)


# -- analysis settings (global, then merged per model) --------------------------

def _thresholds(ctx: _Ctx, raw: Any, loc: str, base: Thresholds) -> Thresholds:
    values = _mapping(ctx, raw, loc, THRESHOLD_KEYS)
    parsed: dict[str, Any] = {}
    for key, value in values.items():  # each field is parsed by its default's type
        default, where = getattr(Thresholds(), key), _join(loc, key)
        if isinstance(default, bool):
            parsed[key] = _boolean(ctx, value, where)
        elif isinstance(default, int):
            parsed[key] = _integer(ctx, value, where, 1)
        else:
            parsed[key] = _number(ctx, value, where, below_one=key.endswith("_p"))
    th = replace(base, **parsed)
    if th.dead_p > th.near_dead_p:
        raise ctx.fail(_join(loc, "dead_p"), f"must not exceed near_dead_p ({th.near_dead_p})")
    return th


def _consumers(ctx: _Ctx, raw: Any, loc: str, base: Analysis
               ) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    values = _mapping(ctx, raw, loc, ("rules", "presets"))
    rules: list[tuple[str, str]] = []
    raw_rules = values.get("rules")
    if isinstance(raw_rules, Mapping):
        items = list(raw_rules.items())
    elif isinstance(raw_rules, list):
        items = []
        for i, entry in enumerate(raw_rules):
            e = _mapping(ctx, entry, f"{loc}.rules[{i}]", ("pattern", "consumer"))
            items.append((e.get("pattern"), e.get("consumer")))
    elif raw_rules is None:
        items = []
    else:
        raise ctx.fail(_join(loc, "rules"), "expected a mapping PATTERN: CONSUMER")
    for pattern, consumer in items:
        where = f"{loc}.rules[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern:
            raise ctx.fail(where, "pattern must be a non-empty string")
        if consumer not in CONSUMERS:
            raise ctx.fail(where, f"consumer must be one of {', '.join(CONSUMERS)}, "
                                  f"got {_short(consumer)}")
        rules.append((pattern, str(consumer)))
    presets = base.presets
    if "presets" in values:
        known = ("auto", "none", *sorted(PRESETS))
        names = _strings(ctx, values["presets"], _join(loc, "presets"))
        for i, name in enumerate(names):
            _choice(ctx, name, f"{loc}.presets[{i}]", known)
        presets = tuple(n for n in names if n != "none")
    # a model's own rules are checked before the global ones
    return tuple(rules) + base.consumer_rules, presets


def _metrics(ctx: _Ctx, raw: Any, loc: str, base: MetricOptions) -> MetricOptions:
    values = _mapping(ctx, raw, loc, METRIC_KEYS)
    out: dict[str, Any] = {}
    for key, value in values.items():
        where = _join(loc, key)
        if key in ("per_layer", "per_tensor"):
            out[key] = _boolean(ctx, value, where)
        elif key == "layers":
            out[key] = _choice(ctx, value, where, LAYER_DETAILS)
        elif key == "max_layers":
            out[key] = _integer(ctx, value, where, 0)
        else:
            out[key] = _regex(ctx, value, where)
    return replace(base, **out)


def _census(ctx: _Ctx, raw: Any, loc: str, base: CensusOptions) -> CensusOptions:
    values = _mapping(ctx, raw, loc, CENSUS_KEYS)
    out = base
    for key, value in values.items():
        where = _join(loc, key)
        if key == "sample":
            out = replace(out, sample=None if value is None else _file(ctx, value, where))
        elif key == "every":
            out = replace(out, every=_integer(ctx, value, where, 1))
        elif key == "seconds":
            out = replace(out, seconds=_number(ctx, value, where))
        elif key == "cache":
            out = replace(out, cache=None if value is None else _folder_path(ctx, value, where))
        else:
            out = replace(out, distill=_boolean(ctx, value, where))
    return out


def _analysis(ctx: _Ctx, values: dict[str, Any], loc: str, base: Analysis) -> Analysis:
    a = base
    for key in ANALYSIS_KEYS:
        if key not in values:
            continue
        value, where = values[key], _join(loc, key)
        if key == "patterns":
            a = replace(a, patterns=_strings(ctx, value, where))
        elif key == "bn_only":
            a = replace(a, bn_only=_boolean(ctx, value, where))
        elif key == "backfill":
            a = replace(a, backfill=_boolean(ctx, value, where))
        elif key == "follow_symlinks":
            a = replace(a, follow_symlinks=_boolean(ctx, value, where))
        elif key == "step_regex":
            a = replace(a, step_regex=_regex(ctx, value, where))
        elif key == "eps":
            a = replace(a, eps=None if value is None else _number(ctx, value, where))
        elif key == "thresholds":
            a = replace(a, thresholds=_thresholds(ctx, value, where, a.thresholds))
        elif key == "consumers":
            rules, presets = _consumers(ctx, value, where, a)
            a = replace(a, consumer_rules=rules, presets=presets)
        elif key == "metrics":
            a = replace(a, metrics=_metrics(ctx, value, where, a.metrics))
        elif key == "census":
            a = replace(a, census=_census(ctx, value, where, a.census))
    return a


# -- models ---------------------------------------------------------------------

def _model_path(ctx: _Ctx, value: Any, loc: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.fail(loc, f"expected a folder path, got {_short(value)}")
    path = os.path.expanduser(value.strip())
    path = os.path.abspath(os.path.join(ctx.base_dir, path))
    count = path.count(PLACEHOLDER)
    if count > 1:
        raise ctx.fail(loc, f"{PLACEHOLDER} may appear only once")
    if count == 1:
        if PLACEHOLDER not in path.split(os.sep):
            raise ctx.fail(loc, f"{PLACEHOLDER} must be a whole folder name, e.g. "
                                f"/jobs/{PLACEHOLDER}/checkpoints")
        base = path.partition(PLACEHOLDER)[0].rstrip(os.sep) or os.sep
        if ctx.check_paths and not os.path.isdir(base):
            raise ctx.fail(loc, f"{base}: not a directory")
        return path
    if ctx.check_paths and not os.path.isdir(path):
        missing = "" if os.path.exists(path) else " (does not exist)"
        raise ctx.fail(loc, f"not a directory{missing}")
    return path


def _model(ctx: _Ctx, raw: Any, loc: str, index: int, base: Analysis, origin: str
           ) -> ModelSpec:
    values = _mapping(ctx, raw, loc, MODEL_KEYS)
    if "path" not in values:
        raise ctx.fail(loc, "missing key 'path'")
    path = _model_path(ctx, values["path"], _join(loc, "path"))
    name = values.get("name")
    if PLACEHOLDER in path:
        if name is not None:
            raise ctx.fail(_join(loc, "name"), f"not allowed with {PLACEHOLDER}: each "
                                               "subfolder's name is its model name")
    elif name is None:
        name = os.path.basename(os.path.normpath(path)) or path
    elif not isinstance(name, str) or not name.strip():
        raise ctx.fail(_join(loc, "name"), f"expected a non-empty string, got {_short(name)}")
    watch = values.get("watch")
    if watch is not None:
        watch = _choice(ctx, watch, _join(loc, "watch"), WATCH_MODES)
    analysis = _analysis(ctx, values, loc, base)
    if analysis.metrics.layers == "auto":  # a {model} root is a central deployment
        detail = "findings" if PLACEHOLDER in path else "all"
        analysis = replace(analysis, metrics=replace(analysis.metrics, layers=detail))
    return ModelSpec(index=index, path=path, name=name, analysis=analysis, watch=watch,
                     origin=origin)


def _shard(ctx: _Ctx, value: Any, loc: str) -> tuple[int, int]:
    if isinstance(value, Mapping):
        v = _mapping(ctx, value, loc, ("index", "count"))
        index = _integer(ctx, v.get("index", 0), _join(loc, "index"), 0)
        count = _integer(ctx, v.get("count", 1), _join(loc, "count"), 1)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
        if not m or isinstance(value, bool):
            raise ctx.fail(loc, f"expected I/N (e.g. 0/3), got {_short(value)}")
        index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise ctx.fail(loc, f"need 0 <= I < N, got {index}/{count}")
    return index, count


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[v6]:PORT`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


_SCALARS: dict[str, Callable[[_Ctx, Any, str], Any]] = {
    "listen": lambda c, v, w: _listen(c, v, w),
    "telemetry_path": lambda c, v, w: _telemetry_path(c, v, w),
    "log_level": lambda c, v, w: _choice(c, v, w, LOG_LEVELS),
    "log_format": lambda c, v, w: _choice(c, v, w, LOG_FORMATS),
    "watch": lambda c, v, w: _choice(c, v, w, WATCH_MODES),
    "isolation": lambda c, v, w: _choice(c, v, w, ISOLATIONS),
    "poll_interval": _number, "rescan_interval": _number, "settle_seconds":
    lambda c, v, w: _number(c, v, w, positive=False),
    "analysis_timeout": _number,
    "stall_timeout": lambda c, v, w: _number(c, v, w, positive=False),
    "workers": lambda c, v, w: _integer(c, v, w, 1),
    "shard": _shard,
    "web_config_file": lambda c, v, w: _file(c, v, w),
}


def _folder_path(ctx: _Ctx, value: Any, loc: str) -> str:
    """A directory path relative to the config file; it need not exist yet (the user of
    it creates it, private, and refuses one that others can write)."""
    if not isinstance(value, str) or not value.strip():
        raise ctx.fail(loc, f"expected a directory path, got {_short(value)}")
    path = os.path.abspath(os.path.join(ctx.base_dir, os.path.expanduser(value.strip())))
    if ctx.check_paths and os.path.exists(path) and not os.path.isdir(path):
        raise ctx.fail(loc, f"{path}: not a directory")
    return path


def _file(ctx: _Ctx, value: Any, loc: str) -> str | None:
    """A readable file, relative to the config file (``null``: none)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ctx.fail(loc, f"expected a file path, got {_short(value)}")
    path = os.path.abspath(os.path.join(ctx.base_dir, os.path.expanduser(value.strip())))
    if ctx.check_paths and not os.path.isfile(path):
        missing = "" if os.path.exists(path) else " (does not exist)"
        raise ctx.fail(loc, f"{path}: not a file{missing}")
    return path


def _telemetry_path(ctx: _Ctx, value: Any, loc: str) -> str:
    reserved = ("/", "/healthz", "/-/healthy", "/-/ready", "/-/reload")
    if not isinstance(value, str) or not re.fullmatch(r"/[A-Za-z0-9._~/-]*", value):
        raise ctx.fail(loc, f"expected a URL path such as /metrics, got {_short(value)}")
    if value in reserved or value.startswith("/api/"):
        raise ctx.fail(loc, f"{value} is taken by another endpoint")
    return value


def _listen(ctx: _Ctx, value: Any, loc: str) -> str:
    if not isinstance(value, str):
        raise ctx.fail(loc, f"expected HOST:PORT, got {_short(value)}")
    try:
        parse_listen(value)
    except ValueError as exc:
        raise ctx.fail(loc, str(exc)) from None
    return value


def _retry(ctx: _Ctx, raw: Any, loc: str) -> Retry:
    values = _mapping(ctx, raw, loc, RETRY_KEYS)
    out: dict[str, Any] = {}
    for key, value in values.items():
        where = _join(loc, key)
        out[key] = (_integer(ctx, value, where, 1) if key == "max_attempts"
                    else _number(ctx, value, where))
    return replace(Retry(), **out)


def build_config(raw: Any, source: str, base_dir: str, overrides: Overrides | None = None,
                 check_paths: bool = True) -> Config:
    """Validate a parsed YAML document (plus flags) into a ``Config``."""
    ctx = _Ctx(source, base_dir, check_paths)
    values = _mapping(ctx, raw, "", TOP_KEYS)
    flags = _Ctx("command line", os.getcwd(), check_paths)
    ov = overrides or Overrides()
    flag_values = {"listen": ov.listen, "poll_interval": ov.poll_interval,
                   "log_level": ov.log_level, "log_format": ov.log_format,
                   "telemetry_path": ov.telemetry_path, "shard": ov.shard,
                   "watch": ov.watch_mode, "workers": ov.workers,
                   "web_config_file": ov.web_config_file}
    cfg = Config(source=source)
    changes: dict[str, Any] = {}
    for key, parse in _SCALARS.items():
        if flag_values.get(key) is not None:
            changes[key] = parse(flags, flag_values[key], FLAG_NAMES.get(
                key, f"--{key.replace('_', '-')}"))
        elif key in values:
            changes[key] = parse(ctx, values[key], key)
    if "retry" in values:
        changes["retry"] = _retry(ctx, values["retry"], "retry")
    if ov.bn_only is not None:
        values = {**values, "bn_only": ov.bn_only}
    analysis = _analysis(ctx, values, "", Analysis())
    models: list[ModelSpec] = []
    raw_models = values.get("models") or []
    if not isinstance(raw_models, list):
        raise ctx.fail("models", f"expected a list, got {_short(raw_models)}")
    for i, entry in enumerate(raw_models):
        models.append(_model(ctx, entry, f"models[{i}]", i, analysis, "models"))
    for j, item in enumerate(ov.watch):
        name, sep, path = item.partition("=")
        if not sep or os.sep in name or not name:
            name, path = "", item
        entry = {"path": path, **({"name": name} if name else {})}
        models.append(_model(flags, entry, f"--watch {item}", len(models), analysis,
                             f"--watch[{j}]"))
    _check_unique(ctx, models)
    return replace(cfg, analysis=analysis, models=tuple(models), **changes)


def _check_unique(ctx: _Ctx, models: list[ModelSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in models:
        where = f"models[{spec.index}]" if spec.origin == "models" else spec.origin
        key = spec.name if spec.name is not None else "\0" + spec.path
        if key in seen:
            what = f"model name {spec.name!r}" if spec.name is not None else "template"
            raise ctx.fail(f"{where}.{'name' if spec.name else 'path'}",
                           f"duplicate {what} (also {seen[key]})")
        seen[key] = where


def load_config(path: str | None, overrides: Overrides | None = None,
                check_paths: bool = True) -> Config:
    """The effective configuration from an optional file and flags."""
    if path is None:
        cfg = build_config({}, "command line", os.getcwd(), overrides, check_paths)
    else:
        raw = read_yaml(path)
        base = os.path.dirname(os.path.abspath(path))
        cfg = build_config(raw if raw is not None else {}, path, base, overrides, check_paths)
    if not cfg.models:
        where = path or "command line"
        raise ConfigError(f"{where}: no models to watch (give --watch DIR or a models: list)")
    return cfg


class _FlagCtx(_Ctx):
    """A context whose errors name the command-line flag a location came from."""

    def __init__(self, flags: Mapping[str, str]):
        super().__init__("command line", os.getcwd(), check_paths=False)
        self.flags = flags

    def fail(self, loc: str, problem: str) -> ConfigError:
        for key, flag in self.flags.items():
            if loc == key or loc.startswith((key + ".", key + "[")):
                return ConfigError(f"{flag}: {problem}")
        return ConfigError(f"{loc}: {problem}" if loc else problem)


def analysis_from_flags(values: Mapping[str, Any], flags: Mapping[str, str]) -> Analysis:
    """Analysis settings given as flags (``bnexporter scan``), checked by exactly the
    rules of the configuration file; ``flags`` maps a config location (``eps``,
    ``thresholds.dead_p``) to the flag that gave it, which the error names."""
    ctx = _FlagCtx(flags)
    return _analysis(ctx, _mapping(ctx, dict(values), "", ANALYSIS_KEYS), "", Analysis())
