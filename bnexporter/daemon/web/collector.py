"""Prometheus collector over the latest snapshot; names per docs/metrics-contract.md.

Families are built fresh from immutable data (no shared ``Gauge`` objects), so a
model that goes away simply stops being yielded. The per-model part, by far the
largest, is rebuilt only when the models change and reused by every scrape in
between; families are never mutated once built.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bnexporter import __version__
from bnexporter.buildinfo import python_version, revision
from bnexporter.daemon.config import MetricOptions
from bnexporter.daemon.state import ModelView, Snapshot, Store
from bnexporter.report import CHANNEL_CLASSES, CheckpointReport, LayerReport

P = "bnexporter_"
# (metric suffix, channel class, what it counts): one family per class of report.py
_LAYER_COUNTS = tuple((f"{name}_channels", name, help_) for name, help_ in CHANNEL_CLASSES)
_MODEL_SUMS = tuple((suffix, name) for suffix, name, _ in _LAYER_COUNTS)


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


# Per-model cap on exported BN layers when metrics.max_layers is 0: ~11 series a layer,
# so a 20,000-layer model stays at ~22,000 series (and a few MB of exposition), not 220,000
BUILTIN_MAX_LAYERS = 2000


def select_layers(report: CheckpointReport, opts: MetricOptions) -> list[LayerReport]:
    return select_layers_capped(report, opts)[0]


def select_layers_capped(report: CheckpointReport, opts: MetricOptions
                         ) -> tuple[list[LayerReport], int]:
    """Layers to export per ``metrics:`` options (filter, then keep the K worst), and how
    many the cap left out."""
    detail = opts.detail
    if detail == "none":
        return [], 0
    layers = list(report.bn_layers)
    if detail == "findings":
        layers = [x for x in layers if has_finding(x)]
    if opts.layer_include:
        inc = _regex(opts.layer_include)
        layers = [x for x in layers if inc.search(x.name)]
    if opts.layer_exclude:
        exc = _regex(opts.layer_exclude)
        layers = [x for x in layers if not exc.search(x.name)]
    cap = opts.max_layers or BUILTIN_MAX_LAYERS
    if len(layers) > cap:
        ranked = sorted(range(len(layers)), key=lambda i: (
            -len(layers[i].dead), -len(layers[i].near_dead), -len(layers[i].collapsed_gamma),
            layers[i].name))
        keep = sorted(ranked[:cap])
        return [layers[i] for i in keep], len(layers) - cap
    return layers, 0


def has_finding(layer: LayerReport) -> bool:
    """Any channel in any class (dead ... saturated, would-be-dead), or never updated."""
    return layer.never_updated or any(getattr(layer, name) for name, _ in CHANNEL_CLASSES)


def collapsed_layers(report: CheckpointReport) -> int:
    return sum(1 for x in report.bn_layers
               if x.channels and len(set(x.collapsed_gamma) | set(x.dead)) == x.channels)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, labels=labels)


def model_families(models: list[ModelView]) -> list[Metric]:
    """Per-layer, per-model and per-tensor families for every model."""
    ml, m, t = ["model", "layer"], ["model"], ["model", "tensor"]
    lf = {"channels": _gauge("layer_channels", "Channels of the BatchNorm layer.", ml)}
    for suffix, _, what in _LAYER_COUNTS:
        lf[suffix] = _gauge("layer_" + suffix, f"Number of {what}.", ml)
    lf["dead_ratio"] = _gauge("layer_dead_ratio", "Dead channels / channels (0..1).", ml)
    lf["near_dead_ratio"] = _gauge("layer_near_dead_ratio",
                                   "Near-dead channels / channels (0..1).", ml)
    info = _gauge("layer_info", "What consumes the BN layer's output (relu, relu6, add, linear,"
                  " other, unknown) and how that was learnt.",
                  ["model", "layer", "consumer", "consumer_source"])
    mf = {
        "bn_layers": _gauge("model_bn_layers", "BatchNorm layers found in the checkpoint.", m),
        "channels": _gauge("model_channels", "BatchNorm channels over all layers.", m),
    }
    for suffix, attr in _MODEL_SUMS:
        mf[attr] = _gauge("model_" + suffix, f"Sum over layers of layer_{suffix}.", m)
    mf["relu_channels"] = _gauge("model_relu_channels", "Channels of BNs whose consumer is "
                                 "a ReLU / ReLU6 (known or inferred): the ratios' denominator.", m)
    mf["dead_ratio"] = _gauge("model_dead_ratio", "Dead channels / channels of ReLU-fed BNs "
                              "(0..1).", m)
    mf["near_dead_ratio"] = _gauge("model_near_dead_ratio",
                                   "Near-dead channels / channels of ReLU-fed BNs (0..1).", m)
    mf["consumer_coverage"] = _gauge("model_consumer_coverage_ratio", "Share of BN layers "
                                     "whose consumer is known or inferred (0..1).", m)
    mf["layers_capped"] = _gauge("model_layers_capped", "BN layers whose per-layer series "
                                 "the per-model cap left out (metrics.max_layers, else "
                                 f"{BUILTIN_MAX_LAYERS}); 0: all selected layers exported.", m)
    mf["census_layers"] = _gauge("model_census_layers", "BN layers whose dead / near-dead "
                                 "verdict a census (sample or distilled inputs) decided.", m)
    mf["estimate_disagreement"] = _gauge(
        "model_estimate_disagreement_channels", "Channels where the weights-only estimate and "
        "the census disagree about dead (a running check of the estimate).", m)
    collapsed = _gauge("model_collapsed_layers", "BN layers whose every channel has a "
                       "collapsed gamma or is dead.", m)
    nonfinite = _gauge("model_nonfinite_values", "NaN/Inf values over all scanned tensors.", m)
    extreme = _gauge("model_extreme_tensors", "Tensors with any huge, tiny or non-finite "
                     "value by the seed's raw rule (|w| > T or 0 < |w| < 1/T); informational, "
                     "fires on healthy models: alert on model_anomalous_tensors.", m)
    anomalous = _gauge("model_anomalous_tensors", "Tensors with an anomaly by the role-aware "
                       "rule (non-finite, huge, deep-tiny, tiny excess, zeroed, constant, zero "
                       "filter, seed dead-input statistics); 0 on healthy models.", m)
    never_updated = _gauge("model_never_updated_layers", "BN layers still exactly at their "
                           "initial values (gamma 1, beta 0, mean 0, var 1) past step 0.", m)
    dead_filters = _gauge("model_dead_filters", "Conv/dense output filters with ~zero norm.", m)
    newly_dead = _gauge("model_newly_dead_channels", "Channels dead now that were not dead at "
                        "the previous analysed checkpoint (0 at the first).", m)
    step = _gauge("model_checkpoint_step", "Training step of the analysed checkpoint.", m)
    mtime = _gauge("model_checkpoint_timestamp_seconds", "Modification time of the analysed "
                   "checkpoint (Unix seconds).", m)
    analysed = _gauge("model_last_analysis_timestamp_seconds", "When the exported analysis "
                      "finished (Unix seconds).", m)
    duration = _gauge("model_analysis_duration_seconds", "How long the exported analysis "
                      "took.", m)
    ck_info = _gauge("model_checkpoint_info", "The analysed checkpoint's format (its path is "
                     "on the page and in /api/v1/models: a label would be a new series per "
                     "checkpoint).", ["model", "format"])
    up = _gauge("model_up", "1: the newest checkpoint was analysed; 0: it could not be read "
                "(the previous good results stay exported); absent: no checkpoint yet.", m)
    series = _gauge("model_exported_series", "Series this exporter exports for the model, "
                    "this one included (budget: docs/metrics-contract.md).", m)
    errs = CounterMetricFamily(P + "model_checkpoint_errors", "Checkpoints that never became "
                               "readable, by reason (each file counts once).",
                               labels=["model", "reason"])
    t_nonfinite = _gauge("tensor_nonfinite_ratio", "NaN/Inf values / values (opt-in).", t)
    t_extreme = _gauge("tensor_extreme_ratio", "Huge or tiny values / values, seed rule "
                       "(opt-in).", t)
    t_anomaly = _gauge("tensor_anomalous", "1 when the tensor is anomalous by the role-aware "
                       "rule, else 0; kind = the anomaly or none (opt-in).",
                       ["model", "tensor", "role", "kind"])

    for view in models:
        name = view.name
        if view.report is not None or not view.up:  # no checkpoint yet: no model_up
            up.add_metric([name], 1.0 if view.up else 0.0)
        for reason, n in sorted(view.errors.items()):
            errs.add_metric([name, reason], float(n))
        r = view.report
        if r is None:
            continue
        s = r.summary
        selected, capped = select_layers_capped(r, view.metrics)
        mf["layers_capped"].add_metric([name], float(capped))
        for layer in selected:
            key = [name, layer.name]
            lf["channels"].add_metric(key, float(layer.channels))
            for suffix, attr, _ in _LAYER_COUNTS:
                lf[suffix].add_metric(key, float(len(getattr(layer, attr))))
            lf["dead_ratio"].add_metric(key, layer.dead_ratio)
            lf["near_dead_ratio"].add_metric(key, layer.near_dead_ratio)
            info.add_metric([name, layer.name, layer.consumer, layer.consumer_source], 1.0)
        mf["bn_layers"].add_metric([name], float(s.bn_layers))
        mf["channels"].add_metric([name], float(s.channels))
        for _, attr in _MODEL_SUMS:
            mf[attr].add_metric([name], float(getattr(s, attr)))
        mf["relu_channels"].add_metric([name], float(s.relu_channels))
        mf["dead_ratio"].add_metric([name], s.dead_ratio)
        mf["near_dead_ratio"].add_metric([name], s.near_dead_ratio)
        mf["consumer_coverage"].add_metric([name], s.consumer_coverage)
        mf["census_layers"].add_metric([name], float(s.census_layers))
        mf["estimate_disagreement"].add_metric([name], float(s.estimate_disagreement))
        collapsed.add_metric([name], float(collapsed_layers(r)))
        nonfinite.add_metric([name], float(s.nonfinite))
        extreme.add_metric([name], float(s.extreme_tensors))
        anomalous.add_metric([name], float(s.anomalous_tensors))
        never_updated.add_metric([name], float(s.never_updated_layers))
        dead_filters.add_metric([name], float(s.dead_filters))
        newly_dead.add_metric([name], float(view.history.newly_dead))
        if r.step is not None:
            step.add_metric([name], float(r.step))
        if r.mtime is not None:
            mtime.add_metric([name], r.mtime)
        if view.analysed_at is not None:
            analysed.add_metric([name], view.analysed_at)
        duration.add_metric([name], r.duration_seconds)
        ck_info.add_metric([name, r.format or "unknown"], 1.0)
        if view.metrics.per_tensor:
            _tensor_samples(name, r, t_nonfinite, t_extreme, t_anomaly)
    out = [*lf.values(), info, *mf.values(), collapsed, nonfinite, extreme, anomalous,
           never_updated, dead_filters, newly_dead, step, mtime, analysed, duration, ck_info,
           up, errs, t_nonfinite, t_extreme, t_anomaly]
    _count_series(out, models, series)
    out.insert(out.index(errs) + 1, series)
    return out


def _tensor_samples(name: str, r: CheckpointReport, t_nonfinite: GaugeMetricFamily,
                    t_extreme: GaugeMetricFamily, t_anomaly: GaugeMetricFamily) -> None:
    for tensor in r.tensors:
        size = tensor.size
        if size:
            t_nonfinite.add_metric([name, tensor.name], tensor.nonfinite / size)
            t_extreme.add_metric([name, tensor.name], (tensor.huge + tensor.tiny) / size)
        t_anomaly.add_metric([name, tensor.name, tensor.role, tensor.anomaly or "none"],
                             1.0 if tensor.anomaly else 0.0)


def _count_series(families: list[Metric], models: list[ModelView],
                  series: GaugeMetricFamily) -> None:
    counts = dict.fromkeys((v.name for v in models), 1)  # 1: model_exported_series itself
    for family in families:
        for sample in family.samples:
            counts[sample.labels["model"]] += 1
    for name, n in counts.items():
        series.add_metric([name], float(n))


def exporter_families(s: Snapshot) -> list[Metric]:
    build = _gauge("build_info", "bnexporter version, source revision and Python version.",
                   ["version", "revision", "python_version"])
    build.add_metric([__version__, revision(), python_version()], 1.0)
    analyses = CounterMetricFamily(P + "analyses", "Analysis attempts by outcome (retry: "
                                   "not readable yet, will be tried again).", labels=["outcome"])
    for outcome, n in s.analyses.items():
        analyses.add_metric([outcome], float(n))
    errors = CounterMetricFamily(P + "errors", "Checkpoints given up on, by reason.",
                                 labels=["reason"])
    for reason, n in s.errors.items():
        errors.add_metric([reason], float(n))
    watched = _gauge("models_watched", "Models currently watched by this replica.", [])
    watched.add_metric([], float(len(s.models)))
    pending = _gauge("queue_pending", "Models with a checkpoint waiting for a worker.", [])
    pending.add_metric([], float(s.queue_pending))
    up = _gauge("watcher_up", "1 when the folder watcher thread is alive.", ["root"])
    polling = _gauge("watcher_polling", "1 when the folder is polled instead of inotify.",
                     ["root"])
    for root, w in sorted(s.watchers.items()):
        up.add_metric([root], 1.0 if w.up else 0.0)
        polling.add_metric([root], 1.0 if w.polling else 0.0)
    restarts = CounterMetricFamily(P + "watcher_restarts", "Dead watcher threads restarted.")
    restarts.add_metric([], float(s.watcher_restarts))
    return [build, analyses, errors, watched, pending, up, restarts, polling]


# process_* (CPU, memory, fds, start time) and python_* (python_info, gc), as every
# prometheus_client program exports them; never registered in the global REGISTRY
_UNUSED = CollectorRegistry(auto_describe=False)  # the collectors insist on registering
RUNTIME: tuple[Collector, ...] = (ProcessCollector(registry=_UNUSED),
                                  PlatformCollector(registry=_UNUSED),
                                  GCCollector(registry=_UNUSED))


def runtime_families() -> Iterator[Metric]:
    for collector in RUNTIME:
        yield from collector.collect()


class SnapshotCollector(Collector):
    def __init__(self, store: Store):
        self._store = store
        self._lock = threading.Lock()
        self._cached: tuple[int, list[Metric]] = (-1, [])

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration; the names are dynamic anyway

    def collect(self) -> Iterator[Metric]:
        snap = self._store.snapshot
        yield from runtime_families()
        yield from exporter_families(snap)
        yield from self._models(snap)

    def _models(self, snap: Snapshot) -> list[Metric]:
        version, families = self._cached
        if version == snap.models_version:
            return families
        with self._lock:  # one scrape builds, concurrent ones wait and reuse
            if self._cached[0] != snap.models_version:
                views = [snap.models[k] for k in sorted(snap.models)]
                self._cached = (snap.models_version, model_families(views))
            return self._cached[1]
