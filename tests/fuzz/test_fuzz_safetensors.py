"""safetensors: structured headers that lie, and mutated real files."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import fuzz_support as fs
from tests.fuzz.targets import target_safetensors
from tests.hostile import builders as b

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "F4",
          "F128", "", "f32"]
numbers = st.one_of(st.integers(-2, 64), st.sampled_from(fs.INTERESTING),
                    st.floats(allow_nan=False), st.none(), st.text(max_size=3))
json_junk = st.recursive(st.one_of(numbers, st.booleans()),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(
                             st.text(max_size=4), c, max_size=3), max_leaves=8)
entry = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(DTYPES), json_junk),
    "shape": st.one_of(st.lists(st.one_of(st.integers(0, 9), numbers), max_size=5), json_junk),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(0, 300), numbers), min_size=0,
                                       max_size=3), json_junk)})
names = st.sampled_from(["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                         "conv.weight", "conv/kernel", "__metadata__", "x", ""])
headers = st.dictionaries(names, st.one_of(entry, json_junk), max_size=6)


@fs.fuzz_settings(400)
@given(headers, st.integers(0, 400), st.one_of(st.none(), st.sampled_from(fs.INTERESTING)))
def test_structured_headers(header, payload, header_len):
    raw = json.dumps(header).encode()
    target_safetensors(b.safetensors_raw(raw, bytes(payload), header_len))


@fs.fuzz_settings(300)
@given(fs.mutants(fs.safetensors_seeds()))
def test_mutated_files(mutant):
    target_safetensors(mutant.data)


@fs.fuzz_settings(100)
@given(st.binary(max_size=64), st.binary(max_size=200))
def test_header_bytes(prefix, body):
    target_safetensors(fs.u64(len(body)) + b"{" + prefix + body)
