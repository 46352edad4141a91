"""TF bundle index: mutated real ``.index`` files, then the same mutations past the CRCs
(entries re-encoded into a valid table), and mutated object graphs."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from bnexporter.formats import sstable
from bnexporter.formats.tf_bundle import OBJECT_GRAPH_KEY
from tests.fuzz import fuzz_support as fs
from tests.fuzz.targets import (
    target_saved_model,
    target_sstable,
    target_tf_bundle,
    target_tf_graph,
)
from tests.hostile import builders as b

BUNDLES = fs.tf_bundles()


@fs.fuzz_settings(300)
@given(fs.mutants([index for index, _ in BUNDLES]))
def test_mutated_index_bytes(mutant):
    target_sstable(mutant.data)


edits = st.lists(fs._edit, min_size=1, max_size=4)


@fs.fuzz_settings(300)
@given(st.sampled_from(range(len(BUNDLES))), st.integers(0, 1 << 20), edits,
       st.sampled_from(["value", "key", "drop", "dup"]), st.integers(1, 64))
def test_mutated_entries_behind_valid_crcs(which, pick, changes, what, per_block):
    index, shard = BUNDLES[which]
    items = sstable.read_table(index)
    i = pick % len(items)
    key, value = items[i]
    if what == "value":
        items[i] = (key, fs.apply_edits(value, changes))
    elif what == "key":
        items[i] = (fs.apply_edits(key or b"\0", changes), value)
    elif what == "drop":
        del items[i]
    else:
        items.insert(i, (key, fs.apply_edits(value, changes)))
    target_tf_bundle(b.sstable(items, per_block=per_block), shard)


def _with_graph(index: bytes, shard: bytes, graph: bytes) -> tuple[bytes, bytes]:
    """Put ``graph`` at the end of the shard, with valid CRCs, and point the index at it."""
    n = len(graph)
    length = struct.pack("<I", n)
    body = struct.pack("<I", sstable.mask_crc(sstable.crc32c(length))) + graph
    raw = b.varint(n) + body
    crc = sstable.mask_crc(sstable.crc32c(body, sstable.crc32c(length)))
    items = [(k, v) for k, v in sstable.read_table(index) if k != OBJECT_GRAPH_KEY.encode()]
    items.append((OBJECT_GRAPH_KEY.encode(), b.tf_entry(7, (), len(shard), len(raw), crc=crc)))
    items.sort()
    return b.sstable(items), shard + raw


GRAPHS = fs.tf_graphs()


@fs.fuzz_settings(300)
@given(fs.mutants(GRAPHS))
def test_mutated_object_graphs(mutant):
    target_tf_graph(mutant.data)


@fs.fuzz_settings(150)
@given(st.sampled_from(range(len(BUNDLES))), fs.mutants(GRAPHS, max_edits=3))
def test_mutated_object_graphs_in_bundles(which, mutant):
    index, shard = BUNDLES[which]
    target_tf_bundle(*_with_graph(index, shard, mutant.data))


@fs.fuzz_settings(100)
@given(st.sampled_from(range(len(BUNDLES))), edits)
def test_mutated_shard_bytes(which, changes):
    index, shard = BUNDLES[which]
    target_tf_bundle(index, fs.apply_edits(shard, changes))


SAVED_MODELS = [p.read_bytes() for p in sorted(fs.FIXTURES.glob("**/saved_model.pb"))]


@fs.fuzz_settings(200)
@given(fs.mutants(SAVED_MODELS, max_edits=3))
def test_mutated_saved_model_functions(mutant):
    """Mutated real saved_model.pb files through the function decoding and inlining."""
    target_saved_model(mutant.data)
