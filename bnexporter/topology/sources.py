"""Where a checkpoint's graph can be found: in the file, or beside it.

Weights-only files say nothing about the operations between tensors, but their
folder often does: a Keras ``config.json`` / ``model.json`` written next to
``*.weights.h5``, a full ``.keras`` / ``.h5`` of the same model, a SavedModel's
``saved_model.pb`` above its ``variables/``, a TF1 ``.meta`` beside the bundle, a
TorchScript or ``torch.export`` archive of the model, or the graph description
``bnexporter describe`` writes. Every one of them is parsed as data; nothing is
imported or executed.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

from bnexporter.errors import CheckpointError
from bnexporter.topology.graph import Graph

GRAPH_FILE = "bnexporter-graph.json"  # written by ``bnexporter describe``
_KERAS_CONFIGS = ("config.json", "model.json", "model_config.json")
_MAX_JSON = 64 << 20
_SIDECARS = frozenset({GRAPH_FILE, *_KERAS_CONFIGS, "saved_model.pb", "keras_metadata.pb"})


@dataclass(frozen=True)
class Found:
    source: str                      # "file:config.json", "graph:torchscript:model.pt" ...
    keras_config: dict[str, Any] | None = None
    graph: Graph | None = None


def _read_json(path: str) -> Any:
    if os.path.getsize(path) > _MAX_JSON:
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _keras_config(doc: Any) -> dict[str, Any] | None:
    if isinstance(doc, dict) and isinstance(doc.get("config"), dict | list) and \
            isinstance(doc.get("class_name"), str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("model_config"), dict):
        return _keras_config(doc["model_config"])
    return None


def _folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def find(path: str, framework: str, notes: list[str]) -> Found | None:
    """The first graph source for the checkpoint at ``path``; problems become notes.

    Cached on the folder's listing and modification times, so discovery and the
    link finder of one analysis (and the next checkpoint's) parse a sidecar once.
    """
    folder = _folder(path)
    try:
        names = tuple(sorted(os.listdir(folder)))
        stamp = [os.stat(folder).st_mtime_ns]
        for name in names:  # a sidecar rewritten in place leaves the folder's mtime alone
            if name in _SIDECARS or name.endswith((".pt2", ".meta")):
                st = os.stat(os.path.join(folder, name))
                stamp += [st.st_mtime_ns, st.st_size]
    except OSError:
        return None
    found, problems = _find_cached(path, framework, folder, names, tuple(stamp))
    notes.extend(problems)
    return found


@functools.lru_cache(maxsize=16)
def _find_cached(path: str, framework: str, folder: str, names: tuple[str, ...],
                 stamp: tuple[int, ...]) -> tuple[Found | None, tuple[str, ...]]:
    notes: list[str] = []
    return _find(path, framework, folder, list(names), notes), tuple(notes)


def _find(path: str, framework: str, folder: str, names: list[str],
          notes: list[str]) -> Found | None:
    for finder in (_describe, _keras_sidecar, _tf_sources, _torch_sidecar):
        try:
            found = finder(path, folder, names, framework)
        except (CheckpointError, OSError, ValueError, KeyError, TypeError, IndexError,
                RecursionError, UnicodeDecodeError) as exc:
            notes.append(f"graph source beside the checkpoint ignored: {exc}")
            continue
        if found is not None:
            return found
    return None


def _describe(path: str, folder: str, names: list[str], framework: str) -> Found | None:
    if GRAPH_FILE not in names:
        return None
    from bnexporter.topology.torch_graph import graph_from_json

    return Found(f"graph:describe:{GRAPH_FILE}", graph=graph_from_json(
        os.path.join(folder, GRAPH_FILE)))


def _keras_sidecar(path: str, folder: str, names: list[str], framework: str) -> Found | None:
    if framework not in ("keras", "tf", "generic"):
        return None
    for name in _KERAS_CONFIGS:
        if name in names:
            cfg = _keras_config(_read_json(os.path.join(folder, name)))
            if cfg is not None:
                return Found(f"file:{name}", keras_config=cfg)
    if framework != "keras":
        return None
    me = os.path.basename(path)
    for name in names:
        if name == me or not name.endswith((".keras", ".h5")):
            continue
        from bnexporter.formats import open_reader

        with open_reader(os.path.join(folder, name)) as other:
            if other.meta.model_config:
                return Found(f"file:{name}", keras_config=other.meta.model_config)
    return None


def _tf_sources(path: str, folder: str, names: list[str], framework: str) -> Found | None:
    if framework != "tf":
        return None
    from bnexporter.topology import tf_graph

    parent = os.path.dirname(folder)
    if os.path.basename(folder) == "variables" and \
            os.path.isfile(os.path.join(parent, "saved_model.pb")):
        got = tf_graph.graph_from_saved_model(parent)
        if isinstance(got, dict):
            return Found("file:saved_model", keras_config=got)
        if got is not None:
            return Found("graph:savedmodel", graph=got)
    prefix = path[: -len(".index")] if path.endswith(".index") else path
    for meta in (prefix + ".meta", *[os.path.join(folder, n) for n in names
                                     if n.endswith(".meta")]):
        if os.path.isfile(meta):
            graph = tf_graph.graph_from_meta(meta)
            if graph is not None:
                return Found(f"graph:meta:{os.path.basename(meta)}", graph=graph)
    return None


def _torch_sidecar(path: str, folder: str, names: list[str], framework: str) -> Found | None:
    if framework != "torch":
        return None
    from bnexporter.topology import torch_graph

    if os.path.isfile(path):  # a whole pickled module (torch.save(model), {"model": m})
        graph = torch_graph.graph_from_module_tree(path)
        if graph is not None and any(n.op != "bn" for n in graph.nodes):
            return Found("graph:module-tree", graph=graph)
    me = os.path.basename(path)
    for name in names:
        full = os.path.join(folder, name)
        if name == me or not os.path.isfile(full):
            continue
        if name.endswith(".pt2"):
            graph = torch_graph.graph_from_export(full)
            if graph is not None:
                return Found(f"graph:export:{name}", graph=graph)
    for name in names:
        full = os.path.join(folder, name)
        if name == me or not name.endswith((".pt", ".pth", ".jit", ".ts")) \
                or not os.path.isfile(full):
            continue
        graph = torch_graph.graph_from_torchscript(full)
        if graph is not None:
            return Found(f"graph:torchscript:{name}", graph=graph)
    return None
