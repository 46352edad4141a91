"""User rules and shipped presets saying what consumes a BN layer's output.

A PyTorch state_dict has no graph, so without these every BN is "unknown" and a
zero-initialised residual BN (``bn2`` of a ResNet basic block) would look like a
dead ReLU. Rules are ``fnmatch`` patterns on the layer name; the first match wins.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from importlib import resources

from bnexporter.topology.keras_graph import CONSUMERS

# presets/torchvision.yaml is the file to edit (it has the comments); the scan reads its
# JSON copy, so that no command but ``run`` imports a YAML parser (~15 ms of a start).
# tests/topology/test_presets_json.py checks the two agree and rewrites the copy.
PRESETS_YAML, PRESETS_JSON = "torchvision.yaml", "torchvision.json"


def load_presets() -> dict[str, list[tuple[str, str]]]:
    text = resources.files("bnexporter.topology.presets").joinpath(PRESETS_JSON).read_text()
    data = json.loads(text)
    return {name: [(str(p), str(c)) for p, c in spec["rules"].items()]
            for name, spec in data.items()}


PRESETS = load_presets()


@dataclass
class ConsumerRules:
    """``rules`` are user patterns (checked first); ``presets`` names shipped rule
    sets, or ``auto`` to pick one from the layer names of each checkpoint."""

    rules: list[tuple[str, str]] = field(default_factory=list)
    presets: list[str] = field(default_factory=lambda: ["auto"])

    def __post_init__(self) -> None:
        for pattern, consumer in self.rules:
            if consumer not in CONSUMERS:
                raise ValueError(f"consumer for {pattern!r} must be one of {CONSUMERS}, "
                                 f"not {consumer!r}")
        for name in self.presets:
            if name != "auto" and name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; known: auto, "
                                 f"{', '.join(sorted(PRESETS))}")

    def resolve_preset(self, layer_names: list[str]) -> tuple[str | None, str]:
        """The preset for a checkpoint with these BN layer names, and the name prefix
        (e.g. Lightning's ``model.``) to strip before matching its patterns."""
        shared = _shared_prefix(layer_names)
        for name in self.presets:
            for prefix in ("", shared):
                short = [n[len(prefix):] for n in layer_names]
                if name == "auto":
                    guess = guess_family(short)
                    if guess:
                        return guess, prefix
                elif any(fnmatch.fnmatchcase(n, p) for n in short for p, _ in PRESETS[name]):
                    return name, prefix
        return None, ""

    def lookup(self, layer: str, preset: str | None, prefix: str = ""
               ) -> tuple[str | None, str]:
        for pattern, consumer in self.rules:
            if fnmatch.fnmatchcase(layer, pattern):
                return consumer, f"rule:{pattern}"
        if preset is not None:
            short = layer[len(prefix):] if prefix and layer.startswith(prefix) else layer
            for pattern, consumer in PRESETS[preset]:
                if fnmatch.fnmatchcase(short, pattern):
                    return consumer, f"preset:{preset}"
        return None, "none"


def _shared_prefix(names: list[str]) -> str:
    """A leading ``attr.`` that every name shares (Lightning's ``model.``), else ''."""
    heads = {n.split(".", 1)[0] for n in names if "." in n}
    if len(heads) == 1 and all("." in n for n in names) and len(names) > 1:
        return heads.pop() + "."
    return ""


def guess_family(layer_names: list[str]) -> str | None:
    """Recognise torchvision naming; ``None`` when not confident."""
    names = set(layer_names)
    if "bn1" in names and any(n.startswith("layer1.0.bn") for n in names):
        return "resnet_bottleneck" if any(n.endswith(".bn3") for n in names) \
            else "resnet_basic"
    if any(n.startswith("features.") and ".conv." in n for n in names) and \
            "features.0.1" in names:
        return "mobilenet_v2"
    if any(".denselayer" in n for n in names):
        return "densenet"
    return None
