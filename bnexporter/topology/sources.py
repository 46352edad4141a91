"""Where a checkpoint's graph can be found: in the file, or beside it.

Weights-only files say nothing about the operations between tensors, but their
folder often does: a Keras ``config.json`` / ``model.json`` written next to
``*.weights.h5``, a full ``.keras`` / ``.h5`` of the same model, a SavedModel's
``saved_model.pb`` above its ``variables/``, a TF1 ``.meta`` beside the bundle, a
TorchScript or ``torch.export`` archive of the model, or the graph description
``bnexporter describe`` writes. A TorchScript or ``.pt2`` archive scanned on its
own is its own graph. Every one of them is parsed as data; nothing is imported
or executed.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
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


def find(path: str, framework: str, notes: list[str],
         tensors: frozenset[str] = frozenset()) -> Found | None:
    """The first graph source that describes the checkpoint at ``path``.

    A candidate counts only when it describes *this* model: a graph's BN tensors,
    or a config's BN layer names, must be among the checkpoint's own ``tensors``
    (a folder may hold graphs of other models). Problems become notes. Cached on
    the folder's listing and modification times, so discovery and the link
    finder of one analysis (and the next checkpoint's) parse a sidecar once.
    """
    folder = _folder(path)
    try:
        names = tuple(sorted(os.listdir(folder)))
        stamp = [os.stat(folder).st_mtime_ns]
        if os.path.isfile(path):  # the checkpoint's own graph (TorchScript, .pt2)
            st = os.stat(path)
            stamp += [st.st_mtime_ns, st.st_size]
        for name in names:  # a sidecar rewritten in place leaves the folder's mtime alone
            if name in _SIDECARS or name.endswith((".pt2", ".meta")):
                st = os.stat(os.path.join(folder, name))
                stamp += [st.st_mtime_ns, st.st_size]
    except OSError:
        return None
    found, problems = _find_cached(path, framework, folder, names, tuple(stamp), tensors)
    notes.extend(problems)
    return found


@functools.lru_cache(maxsize=16)
def _find_cached(path: str, framework: str, folder: str, names: tuple[str, ...],
                 stamp: tuple[int, ...], tensors: frozenset[str]
                 ) -> tuple[Found | None, tuple[str, ...]]:
    notes: list[str] = []
    return _find(path, framework, folder, list(names), notes, tensors), tuple(notes)


def _matches(found: Found, tensors: frozenset[str]) -> bool:
    if not tensors:
        return True
    if found.graph is not None:
        means = [n.params["mean"] for n in found.graph.nodes
                 if n.op == "bn" and "mean" in n.params]
        hits = sum(1 for m in means if m in tensors)
        return bool(means) and hits >= max(1, len(means) // 2)
    if found.keras_config is not None:
        bns = _keras_bn_names(found.keras_config)
        parts = {part for t in tensors for part in t.replace(":", "/").split("/")}
        return not bns or any(b in parts for b in bns) or any(
            t.startswith("layers/") for t in tensors)  # Keras 3 paths: matched by config
    return False


def _keras_bn_names(config: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(config, dict):
        if "BatchNormalization" in str(config.get("class_name", "")):
            cfg = config.get("config")
            if isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
                out.add(cfg["name"])
        for value in config.values():
            out |= _keras_bn_names(value)
    elif isinstance(config, list):
        for value in config:
            out |= _keras_bn_names(value)
    return out


def _find(path: str, framework: str, folder: str, names: list[str],
          notes: list[str], tensors: frozenset[str]) -> Found | None:
    for finder in (_describe, _keras_sidecar, _tf_sources, _torch_sidecar):
        candidates = finder(path, folder, names, framework)
        while True:
            try:
                found = next(candidates, None)
            except (CheckpointError, OSError, ValueError, KeyError, TypeError, IndexError,
                    RecursionError, UnicodeDecodeError) as exc:
                notes.append(f"graph source beside the checkpoint ignored: {exc}")
                continue
            if found is None:
                break
            if _matches(found, tensors):
                return found
    return None


Candidates = Iterator[Found]


def _describe(path: str, folder: str, names: list[str], framework: str) -> Candidates:
    if GRAPH_FILE in names:
        from bnexporter.topology.torch_graph import graph_from_json

        yield Found(f"graph:describe:{GRAPH_FILE}", graph=graph_from_json(
            os.path.join(folder, GRAPH_FILE)))


def _keras_sidecar(path: str, folder: str, names: list[str], framework: str) -> Candidates:
    if framework not in ("keras", "tf", "generic"):
        return
    for name in _KERAS_CONFIGS:
        if name in names:
            cfg = _keras_config(_read_json(os.path.join(folder, name)))
            if cfg is not None:
                yield Found(f"file:{name}", keras_config=cfg)
    if framework != "keras":
        return
    me = os.path.basename(path)
    for name in _same_stem_first(me, names):
        if name == me or not name.endswith((".keras", ".h5")):
            continue
        from bnexporter.formats import open_reader

        with open_reader(os.path.join(folder, name)) as other:
            if other.meta.model_config:
                yield Found(f"file:{name}", keras_config=other.meta.model_config)


def _tf_sources(path: str, folder: str, names: list[str], framework: str) -> Candidates:
    if framework != "tf":
        return
    from bnexporter.topology import tf_graph

    parent = os.path.dirname(folder)
    if os.path.basename(folder) == "variables" and \
            os.path.isfile(os.path.join(parent, "saved_model.pb")):
        got = tf_graph.graph_from_saved_model(parent)
        if isinstance(got, dict):
            yield Found("file:saved_model", keras_config=got)
        elif got is not None:
            yield Found("graph:savedmodel", graph=got)
    prefix = path[: -len(".index")] if path.endswith(".index") else path
    seen = set()
    for meta in (prefix + ".meta", *[os.path.join(folder, n) for n in names
                                     if n.endswith(".meta")]):
        if meta not in seen and os.path.isfile(meta):
            seen.add(meta)
            graph = tf_graph.graph_from_meta(meta)
            if graph is not None:
                yield Found(f"graph:meta:{os.path.basename(meta)}", graph=graph)


def _same_stem_first(me: str, names: list[str]) -> list[str]:
    stem = me.split(".", 1)[0]
    return sorted(names, key=lambda n: (not n.startswith(stem), n))


_MAX_TRIES = 16  # sibling archives opened per analysis at most


def _torch_sidecar(path: str, folder: str, names: list[str], framework: str) -> Candidates:
    if framework != "torch":
        return
    from bnexporter.topology import torch_graph

    if os.path.isfile(path):  # the archive's own graph: a .pt2 program, TorchScript code
        graph = torch_graph.graph_from_export(path)
        if graph is not None:
            yield Found("graph:torch.export", graph=graph)
        else:
            graph = torch_graph.graph_from_torchscript(path)
            if graph is not None:
                yield Found("graph:torchscript", graph=graph)
    if os.path.isfile(path):  # a whole pickled module (torch.save(model), {"model": m})
        graph = torch_graph.graph_from_module_tree(path)
        if graph is not None and any(n.op != "bn" for n in graph.nodes):
            yield Found("graph:module-tree", graph=graph)
    me = os.path.basename(path)
    ordered = [n for n in _same_stem_first(me, names)
               if n != me and os.path.isfile(os.path.join(folder, n))]
    for name in [n for n in ordered if n.endswith(".pt2")][:_MAX_TRIES]:
        graph = torch_graph.graph_from_export(os.path.join(folder, name))
        if graph is not None:
            yield Found(f"graph:export:{name}", graph=graph)
    for name in [n for n in ordered if n.endswith((".pt", ".pth", ".jit", ".ts"))][:_MAX_TRIES]:
        graph = torch_graph.graph_from_torchscript(os.path.join(folder, name))
        if graph is not None:
            yield Found(f"graph:torchscript:{name}", graph=graph)
