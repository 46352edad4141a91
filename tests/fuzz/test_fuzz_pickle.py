"""The restricted unpickler: mutated real ``data.pkl``, random opcode streams, and the
promise that no global a pickle names is ever called."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnexporter.formats import torch_pickle
from tests.fuzz import fuzz_support as fs
from tests.fuzz.targets import (
    target_pickle,
    target_torch_legacy,
    target_torch_zip,
)
from tests.hostile import builders as b

GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"),
    ("torch", "HalfStorage"), ("torch", "UntypedStorage"), ("torch", "float32"),
    ("torch", "Size"), ("collections", "OrderedDict"), ("_codecs", "encode"),
    ("builtins", "set"), ("builtins", "slice"), ("builtins", "complex"),
    ("copyreg", "_reconstructor"), ("builtins", "object"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.modules.batchnorm", "BatchNorm2d"), ("argparse", "Namespace"),
    ("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("posix", "system"),
]


def _op(kind: str, arg: int, text: str) -> bytes:
    """One opcode (with operands) of a small pickle grammar."""
    table = {
        "mark": b"(", "none": b"N", "true": b"\x88", "list": b"]", "dict": b"}",
        "tuple0": b")", "tuple1": b"\x85", "tuple2": b"\x86", "tuple3": b"\x87", "tuple": b"t",
        "append": b"a", "appends": b"e", "setitem": b"s", "setitems": b"u", "reduce": b"R",
        "build": b"b", "newobj": b"\x81", "pop": b"0", "dup": b"2", "persid": b"Q",
        "list_mark": b"l", "dict_mark": b"d", "memoize": b"\x94", "stack_global": b"\x93",
        "obj": b"o", "empty_set": b"\x8f", "additems": b"\x90", "frozenset": b"\x91",
        "newobj_ex": b"\x92",
    }
    if kind in table:
        return table[kind]
    if kind == "int":
        return b"J" + struct.pack("<i", arg)
    if kind == "long":
        return b"\x8a\x08" + struct.pack("<q", arg)
    if kind == "float":
        return b"G" + struct.pack(">d", float(arg))
    if kind == "str":
        raw = text.encode("utf-8", "surrogatepass")
        return b"X" + struct.pack("<I", len(raw)) + raw
    if kind == "bytes":
        return b"C" + bytes([len(text) % 256]) + text.encode("latin1", "replace")[:len(text) % 256]
    if kind == "put":
        return b"q" + bytes([arg % 256])
    if kind == "get":
        return b"h" + bytes([arg % 256])
    if kind == "global":
        module, name = GLOBALS[arg % len(GLOBALS)]
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    if kind == "inst":
        module, name = GLOBALS[arg % len(GLOBALS)]
        return b"i" + module.encode() + b"\n" + name.encode() + b"\n"
    if kind == "sglobal":
        module, name = GLOBALS[arg % len(GLOBALS)]
        return _op("str", 0, module) + _op("str", 0, name) + b"\x93"
    raise AssertionError(kind)


KINDS = ["mark", "none", "true", "list", "dict", "tuple0", "tuple1", "tuple2", "tuple3",
         "tuple", "append", "appends", "setitem", "setitems", "reduce", "build", "newobj",
         "pop", "dup", "persid", "list_mark", "dict_mark", "memoize", "obj", "empty_set",
         "additems", "frozenset", "newobj_ex", "int", "long", "float", "str", "bytes", "put",
         "get", "global", "inst", "sglobal", "stack_global"]
ops = st.tuples(st.sampled_from(KINDS), st.integers(-(1 << 31), (1 << 31) - 1),
                st.text(alphabet=st.sampled_from("storagecpu0FloatSize.weightbn"), max_size=8))
streams = st.lists(ops, max_size=60).map(
    lambda seq: b"\x80\x02" + b"".join(_op(*o) for o in seq) + b".")


@fs.fuzz_settings(1000)
@given(streams)
def test_random_opcode_streams(data):
    target_pickle(data)
    target_pickle(data, legacy=True)


@fs.fuzz_settings(500)
@given(fs.mutants(fs.pickle_seeds()))
def test_mutated_real_pickles(mutant):
    target_pickle(mutant.data)


DANGEROUS = [("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"),
             ("builtins", "exec"), ("__builtin__", "eval"), ("builtins", "__import__"),
             ("builtins", "getattr"), ("builtins", "open"), ("subprocess", "Popen"),
             ("subprocess", "check_output"), ("importlib", "import_module"),
             ("runpy", "_run_code"), ("pickle", "loads"), ("torch", "load"),
             ("torch.jit", "load"), ("shutil", "rmtree"), ("socket", "socket"),
             ("ctypes", "CDLL"), ("code", "InteractiveInterpreter"), ("pty", "spawn"),
             ("os.path", "join"), ("operator", "methodcaller"), ("timeit", "timeit")]


@fs.fuzz_settings(300)
@given(st.sampled_from(DANGEROUS), st.sampled_from(["global", "stack_global", "inst", "obj"]),
       st.sampled_from(["reduce", "newobj", "build", "none"]), st.integers(2, 4))
def test_dangerous_globals_are_refused(target, how, call, proto):
    module, name = target
    p = b.Pickle(proto)
    if how == "global":
        p.glob(module, name)
    elif how == "stack_global":
        p.stack_global(module, name)
    elif how == "inst":
        p.mark().str("x").op(b"i" + module.encode() + b"\n" + name.encode() + b"\n")
    else:
        p.mark().glob(module, name).str("x").op(b"o")
    if how in ("global", "stack_global"):
        if call == "reduce":
            p.str("x").tuple(1).reduce()
        elif call == "newobj":
            p.str("x").tuple(1).newobj()
        elif call == "build":
            p.tuple(0).reduce().empty_dict().build()
    data = p.stop()
    with pytest.raises(torch_pickle.Refused) as exc:
        torch_pickle.load(data)
    assert exc.value.reason == "forbidden", exc.value.cause


@fs.fuzz_settings(150)
@given(fs.mutants(fs.torch_zip_seeds(), max_edits=4))
def test_mutated_torch_zip_files(mutant):
    target_torch_zip(mutant.data)


@fs.fuzz_settings(150)
@given(fs.mutants(fs.torch_legacy_seeds(), max_edits=4))
def test_mutated_torch_legacy_files(mutant):
    target_torch_legacy(mutant.data)


layout = st.builds(
    b.TorchTensor, storage=st.sampled_from(["0", "1", "x"]),
    storage_type=st.sampled_from(["FloatStorage", "HalfStorage", "BFloat16Storage",
                                  "LongStorage", "QInt8Storage", "UntypedStorage"]),
    numel=st.one_of(st.integers(0, 40), st.sampled_from(fs.INTERESTING)),
    offset=st.one_of(st.integers(0, 40), st.sampled_from(fs.INTERESTING)),
    size=st.lists(st.one_of(st.integers(0, 6), st.sampled_from(fs.INTERESTING)),
                  max_size=4).map(tuple),
    stride=st.lists(st.one_of(st.integers(0, 6), st.sampled_from(fs.INTERESTING)),
                    max_size=4).map(tuple))
bn_names = st.sampled_from(["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                            "conv.weight", "fc.weight"])


@fs.fuzz_settings(300)
@given(st.dictionaries(bn_names, layout, min_size=1, max_size=5), st.booleans(),
       st.integers(0, 160))
def test_lying_tensor_layouts(tensors, legacy, nbytes):
    storages = {"0": bytes(nbytes), "1": bytes(nbytes // 2)}
    if legacy:
        target_torch_legacy(b.torch_legacy_bytes(b.state_dict_pickle(tensors, legacy=True),
                                                 storages))
    else:
        target_torch_zip(b.torch_zip_bytes(b.state_dict_pickle(tensors), storages))
