"""The daemon's effective configuration as immutable values.

Parsing and validation live in ``validate.py``; this module only says what a
valid configuration *is*, so the rest of the daemon never sees raw YAML.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from bnexporter.detection.analysis import Thresholds
from bnexporter.formats.sniff import default_patterns
from bnexporter.scan import ScanOptions
from bnexporter.topology.consumers import ConsumerRules

# 9100-9999 is fully allocated on the Prometheus wiki's port list; see docs/daemon.md.
DEFAULT_PORT = 10842
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
DEMO_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"  # the demo is for this machine's browser only
DEFAULT_TELEMETRY_PATH = "/metrics"
WATCH_MODES = ("auto", "inotify", "poll")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
# per-layer detail: every BN layer, only layers with a finding, none (model totals only);
# auto = all for a named model folder, findings for models found under a {model} root
LAYER_DETAILS = ("auto", "all", "findings", "none")
ISOLATIONS = ("process", "thread")
PLACEHOLDER = "{model}"
# every format the readers understand; TF bundles are found through their .index
DEFAULT_PATTERNS = default_patterns()


@dataclass(frozen=True)
class MetricOptions:
    """Cardinality controls for one model's series (budget: docs/metrics-contract.md)."""

    layers: str = "auto"              # LAYER_DETAILS; resolved per model by validate.py
    per_layer: bool = True            # false: same as layers: none (kept for old files)
    layer_include: str | None = None  # regex (search) on the layer name
    layer_exclude: str | None = None
    max_layers: int = 0               # 0: no cap; else keep the K worst layers
    per_tensor: bool = False

    @property
    def detail(self) -> str:
        """all | findings | none: which BN layers get bnexporter_layer_* series."""
        if not self.per_layer:
            return "none"
        return "all" if self.layers == "auto" else self.layers


@dataclass(frozen=True)
class CensusOptions:
    """The activity census (docs/census in README): off unless a sample is given or
    dropped beside the checkpoints (bnexporter-census.npy), or distill is on."""

    sample: str | None = None   # a .npy / .npz of model inputs; None: look beside
    every: int = 1              # run it on every N-th analysed checkpoint of the model
    seconds: float = 60.0       # time budget of one census, inside the analysis timeout
    distill: bool = False       # no sample: census over inputs distilled from BN statistics
    cache: str | None = None    # distilled inputs kept per model (warm start); None: default


@dataclass(frozen=True)
class Analysis:
    """Settings that can be set globally and overridden per model."""

    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    bn_only: bool = False
    step_regex: str | None = None
    eps: float | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    consumer_rules: tuple[tuple[str, str], ...] = ()
    presets: tuple[str, ...] = ("auto",)
    metrics: MetricOptions = field(default_factory=MetricOptions)
    backfill: bool = False
    follow_symlinks: bool = False  # False: only links to files inside the model folder
    census: CensusOptions = field(default_factory=CensusOptions)

    def scan_options(self) -> ScanOptions:
        rules = ConsumerRules(rules=list(self.consumer_rules), presets=list(self.presets))
        return ScanOptions(thresholds=self.thresholds, consumers=rules, bn_only=self.bn_only,
                           step_regex=self.step_regex, eps=self.eps,
                           census=self.census.sample, census_seconds=self.census.seconds,
                           distill=self.census.distill)


@dataclass(frozen=True)
class ModelSpec:
    """One ``models:`` entry: a named folder, or a ``{model}`` template."""

    index: int
    path: str                  # absolute; contains {model} for a template
    name: str | None           # None for a template (names are discovered)
    analysis: Analysis
    watch: str | None = None   # per-model override of the watch mode
    origin: str = "models"     # "models" or "--watch" (for messages)

    @property
    def template(self) -> bool:
        return PLACEHOLDER in self.path

    def template_parts(self) -> tuple[str, str]:
        """(base folder, suffix inside each model folder) of a template."""
        base, _, rest = self.path.partition(PLACEHOLDER)
        return base.rstrip(os.sep) or os.sep, rest.strip(os.sep)


@dataclass(frozen=True)
class Retry:
    initial_delay: float = 2.0
    max_delay: float = 60.0
    max_attempts: int = 10
    give_up_after: float = 600.0


@dataclass(frozen=True)
class Config:
    source: str | None = None
    listen: str = DEFAULT_LISTEN
    telemetry_path: str = DEFAULT_TELEMETRY_PATH
    log_level: str = "info"
    log_format: str = "logfmt"
    watch: str = "auto"
    poll_interval: float = 10.0
    rescan_interval: float = 300.0
    settle_seconds: float = 2.0
    workers: int = 1
    analysis_timeout: float = 900.0
    stall_timeout: float = 120.0   # no CPU time and no bytes read this long: stuck, stop it
    isolation: str = "process"
    web_config_file: str | None = None  # exporter-toolkit web config (TLS, basic auth)
    retry: Retry = field(default_factory=Retry)
    shard: tuple[int, int] = (0, 1)
    analysis: Analysis = field(default_factory=Analysis)
    models: tuple[ModelSpec, ...] = ()

    def watch_mode(self, spec: ModelSpec) -> str:
        return spec.watch or self.watch

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration, in the YAML file's own shape."""
        out: dict[str, Any] = {
            "listen": self.listen, "telemetry_path": self.telemetry_path,
            "log_level": self.log_level, "log_format": self.log_format, "watch": self.watch,
            "poll_interval": self.poll_interval, "rescan_interval": self.rescan_interval,
            "settle_seconds": self.settle_seconds, "workers": self.workers,
            "analysis_timeout": self.analysis_timeout, "stall_timeout": self.stall_timeout,
            "isolation": self.isolation, "web_config_file": self.web_config_file,
            "retry": asdict(self.retry), "shard": f"{self.shard[0]}/{self.shard[1]}",
        }
        out.update(analysis_dict(self.analysis))
        models = []
        for spec in self.models:
            entry: dict[str, Any] = {}
            if spec.name is not None:
                entry["name"] = spec.name
            entry["path"] = spec.path
            entry["watch"] = self.watch_mode(spec)
            entry.update(analysis_dict(spec.analysis))
            models.append(entry)
        out["models"] = models
        return out


def analysis_dict(a: Analysis) -> dict[str, Any]:
    return {
        "backfill": a.backfill, "follow_symlinks": a.follow_symlinks,
        "patterns": list(a.patterns), "bn_only": a.bn_only,
        "step_regex": a.step_regex, "eps": a.eps, "thresholds": asdict(a.thresholds),
        "consumers": {"rules": {p: c for p, c in a.consumer_rules},
                      "presets": list(a.presets)},
        "metrics": asdict(a.metrics),
    }


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the one line to show the user."""


def read_yaml(path: str) -> Any:
    """Parse a config file; syntax errors become ``file:line:col: ...`` one-liners."""
    import yaml  # here: ``scan`` imports this module and needs no YAML (~13 ms)

    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
