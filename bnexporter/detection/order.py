"""The model's own layer order, for every output (JSON, metrics, the page).

Discovery walks tensor names, and some containers list those alphabetically
(h5py iterates groups by name; Keras 3 names its variables ``layers/<class>_N``),
so ``block_10`` would come before ``block_2``. The order that means something to
a person is the model's: the config's layer order when the file has a config,
else the order the file stores the tensors in (a PyTorch state_dict's is the
module registration order). HDF5 without a config has no stored order (h5py lists
names alphabetically), so there numbers inside names count as numbers
(``batch_normalization_2`` before ``batch_normalization_10``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, TypeVar

from bnexporter.formats.base import Reader
from bnexporter.topology.keras_graph import KerasGraph


class _Layer(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def mean(self) -> str: ...


L = TypeVar("L", bound=_Layer)
_ALPHABETICAL = ("keras2-h5", "keras3-weights-h5", "keras")  # HDF5 inside: names sorted
_DIGITS = re.compile(r"(\d+)")


def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in _DIGITS.split(name) if p)


def model_order(layers: Sequence[L], reader: Reader) -> list[L]:
    """``layers`` sorted by the model config's order, else by the file's tensor order.

    Stable: layers the config does not name keep their relative order, after the
    named ones; a failure to read the config leaves the order as it is."""
    config = reader.meta.model_config
    tensor_pos = {name: i for i, name in enumerate(reader.names())}
    config_pos: dict[str, int] = {}
    if config:
        try:
            config_pos = {name: spec.order for name, spec in KerasGraph(config).layers.items()}
        except (KeyError, ValueError, TypeError, AttributeError):
            config_pos = {}
    if reader.format in _ALPHABETICAL:
        natural = sorted(tensor_pos, key=_natural)
        tensor_pos = {name: i for i, name in enumerate(natural)}
    far = len(config_pos) + len(tensor_pos) + 1

    def key(item: tuple[int, L]) -> tuple[int, int, int]:
        i, layer = item
        if layer.name in config_pos:
            return (0, config_pos[layer.name], i)
        return (1, tensor_pos.get(layer.mean, far), i)

    return [layer for _, layer in sorted(enumerate(layers), key=key)]
