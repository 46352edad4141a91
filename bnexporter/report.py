"""One immutable result per checkpoint: what ``scan --json`` prints and what the
daemon serves. The JSON field names here are the documented, stable schema."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerReport:
    name: str
    channels: int
    eps: float
    eps_source: str
    consumer: str
    consumer_source: str
    dead: list[int]
    near_dead: list[int]
    collapsed_gamma: list[int]
    dead_input: list[int]
    constant: list[int]
    saturated: list[int]
    min_p_active: float | None = None

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
    dead: int = 0
    near_dead: int = 0
    collapsed_gamma: int = 0
    dead_input: int = 0
    constant: int = 0
    saturated: int = 0
    dead_ratio: float = 0.0
    near_dead_ratio: float = 0.0
    nonfinite: int = 0
    extreme_tensors: int = 0
    dead_filters: int = 0
    tensors: int = 0
    unknown_consumers: int = 0

    @classmethod
    def build(cls, layers: list[LayerReport], tensors: list[TensorReport],
              nonfinite: int) -> Summary:
        channels = sum(layer.channels for layer in layers)
        count = lambda attr: sum(len(getattr(layer, attr)) for layer in layers)  # noqa: E731
        dead, near = count("dead"), count("near_dead")
        return cls(
            bn_layers=len(layers), channels=channels, dead=dead, near_dead=near,
            collapsed_gamma=count("collapsed_gamma"), dead_input=count("dead_input"),
            constant=count("constant"), saturated=count("saturated"),
            dead_ratio=dead / channels if channels else 0.0,
            near_dead_ratio=near / channels if channels else 0.0,
            nonfinite=nonfinite,
            extreme_tensors=sum(1 for t in tensors if t.nonfinite or t.huge or t.tiny),
            dead_filters=sum(len(t.dead_filters or ()) for t in tensors),
            tensors=len(tensors),
            unknown_consumers=sum(1 for layer in layers if layer.consumer == "unknown"),
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
        doc = asdict(self)
        doc["error_reason"] = self.error_reason
        for layer, out in zip(self.bn_layers, doc["bn_layers"], strict=False):
            out["dead_ratio"] = layer.dead_ratio
        return doc

    def worst_layers(self, n: int = 10) -> list[LayerReport]:
        ranked = sorted(self.bn_layers, key=lambda r: (-len(r.dead), -len(r.near_dead), r.name))
        return [layer for layer in ranked[:n] if layer.dead or layer.near_dead]


def failed(path: str, message: str, reason: str, fmt: str | None = None,
           step: int | None = None) -> CheckpointReport:
    return CheckpointReport(path=path, format=fmt, step=step, error=message, summary=Summary(),
                            error_reason=reason)
