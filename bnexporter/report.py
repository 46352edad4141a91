"""One immutable result per checkpoint: what ``scan --json`` prints and what the
daemon serves. The JSON field names here are the documented, stable schema."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 2

# The one list of channel classes. It drives the report fields (each a list of
# channel indices per layer and a count in the summary), the metrics, the text
# output and the docs: adding a class is one row here and one rule in detection.
CHANNEL_CLASSES: tuple[tuple[str, str], ...] = (
    ("dead", "channels (almost) never positive after BN, for BNs that feed a ReLU / ReLU6"),
    ("near_dead", "channels positive only rarely after BN, for BNs that feed a ReLU / ReLU6"),
    ("would_be_dead", "channels that would be dead if a ReLU followed; the BN's consumer is "
     "not known to be one, so they are not counted as dead"),
    ("collapsed_gamma", "channels whose |gamma| collapsed to ~0"),
    ("dead_input", "channels whose input never varies (running var ~0)"),
    ("constant", "channels whose output does not depend on the input"),
    ("saturated", "ReLU6 channels always at the upper limit"),
)
CLASS_NAMES = tuple(name for name, _ in CHANNEL_CLASSES)
# what may consume a BN's output (topology decides which); only the ReLU-like ones
# make a channel that is never positive a dead one
CONSUMER_KINDS = ("relu", "relu6", "add", "linear", "silu", "hardswish", "other", "unknown")
RELU_LIKE = ("relu", "relu6")


@dataclass(frozen=True)
class LayerReport:
    name: str
    channels: int
    eps: float
    eps_source: str
    consumer: str
    consumer_source: str
    classes: dict[str, list[int]] = field(default_factory=dict)
    min_p_active: float | None = None
    producer: str | None = None
    producer_source: str = "none"
    never_updated: bool = False
    # what decided dead / near-dead: "estimate", "census:sample" or "census:distilled"
    evidence: str = "estimate"
    census_positions: int | None = None   # positions per channel the census saw
    estimate_disagreement: int = 0        # channels where the estimate and the census differ
    mean_tensor: str | None = None        # the running-mean tensor: ties the layer to graphs

    def __getattr__(self, name: str) -> list[int]:
        # ``layer.dead`` etc.: the channel classes read as attributes
        if name in CLASS_NAMES:
            return self.__dict__.get("classes", {}).get(name, [])
        raise AttributeError(name)

    @property
    def relu_fed(self) -> bool:
        return self.consumer in RELU_LIKE

    @property
    def dead_ratio(self) -> float:
        return len(self.dead) / self.channels if self.channels else 0.0

    @property
    def near_dead_ratio(self) -> float:
        return len(self.near_dead) / self.channels if self.channels else 0.0


@dataclass(frozen=True)
class TensorReport:
    name: str
    shape: list[int]
    dtype: str
    nonfinite: int
    huge: int
    tiny: int
    zero: int
    max_abs: float
    dead_filters: list[int] | None = None
    role: str = "other"            # kernel, bias, gamma, beta, running_mean, running_var, ...
    anomaly: str | None = None     # what is wrong with it, by the role-aware rule (extremes)
    anomaly_detail: str | None = None

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Summary:
    bn_layers: int = 0
    channels: int = 0
    # channels of BNs whose consumer is ReLU-like (known or inferred): the denominator
    # of dead_ratio / near_dead_ratio
    relu_channels: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # per channel class
    dead_ratio: float = 0.0
    near_dead_ratio: float = 0.0
    nonfinite: int = 0
    anomalous_tensors: int = 0  # the role-aware rule: what alerts use
    extreme_tensors: int = 0    # the seed's raw rule (any |w| > T or 0 < |w| < 1/T)
    dead_filters: int = 0
    tensors: int = 0
    unknown_consumers: int = 0
    consumer_coverage: float = 0.0  # share of BN layers whose consumer is known or inferred
    never_updated_layers: int = 0
    census_layers: int = 0          # layers whose verdict a census decided
    estimate_disagreement: int = 0  # over those layers

    def __getattr__(self, name: str) -> int:
        if name in CLASS_NAMES:
            return self.__dict__.get("counts", {}).get(name, 0)
        raise AttributeError(name)

    @classmethod
    def build(cls, layers: list[LayerReport], tensors: list[TensorReport],
              nonfinite: int) -> Summary:
        channels = sum(layer.channels for layer in layers)
        relu = sum(layer.channels for layer in layers if layer.relu_fed)
        counts = {c: sum(len(layer.classes.get(c, ())) for layer in layers)
                  for c in CLASS_NAMES}
        unknown = sum(1 for layer in layers if layer.consumer == "unknown")
        return cls(
            bn_layers=len(layers), channels=channels, relu_channels=relu, counts=counts,
            dead_ratio=counts["dead"] / relu if relu else 0.0,
            near_dead_ratio=counts["near_dead"] / relu if relu else 0.0,
            nonfinite=nonfinite,
            anomalous_tensors=sum(1 for t in tensors if t.anomaly is not None),
            extreme_tensors=sum(1 for t in tensors if t.nonfinite or t.huge or t.tiny),
            dead_filters=sum(len(t.dead_filters or ()) for t in tensors),
            tensors=len(tensors),
            unknown_consumers=unknown,
            consumer_coverage=(len(layers) - unknown) / len(layers) if layers else 0.0,
            never_updated_layers=sum(1 for layer in layers if layer.never_updated),
            census_layers=sum(1 for layer in layers if layer.evidence != "estimate"),
            estimate_disagreement=sum(layer.estimate_disagreement for layer in layers),
        )


@dataclass(frozen=True)
class CheckpointReport:
    path: str
    format: str | None
    step: int | None
    error: str | None
    summary: Summary
    bn_layers: list[LayerReport] = field(default_factory=list)
    tensors: list[TensorReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bn_only: bool = False
    size_bytes: int | None = None
    mtime: float | None = None
    duration_seconds: float = 0.0
    error_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """The documented schema: channel classes flattened into each layer and the summary."""
        doc = asdict(self)
        doc["schema_version"] = SCHEMA_VERSION
        counts = doc["summary"].pop("counts")
        doc["summary"].update({c: counts.get(c, 0) for c in CLASS_NAMES})
        if self.error is not None:
            doc["summary"] = None  # a file that could not be read has no numbers
        for layer, out in zip(self.bn_layers, doc["bn_layers"], strict=False):
            classes = out.pop("classes")
            out.update({c: classes.get(c, []) for c in CLASS_NAMES})
            out["dead_ratio"] = layer.dead_ratio
        return doc

    def worst_layers(self, n: int = 10) -> list[LayerReport]:
        ranked = sorted(self.bn_layers, key=lambda r: (-len(r.dead), -len(r.near_dead), r.name))
        return [layer for layer in ranked[:n] if layer.dead or layer.near_dead]


def failed(path: str, message: str, reason: str, fmt: str | None = None,
           step: int | None = None) -> CheckpointReport:
    return CheckpointReport(path=path, format=fmt, step=step, error=message, summary=Summary(),
                            error_reason=reason)
