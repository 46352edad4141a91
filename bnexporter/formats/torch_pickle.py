"""Read torch's pickles without importing or running anything they name.

A torch checkpoint's object graph is a pickle, and unpickling can call any
importable function. Here every global resolves to an inert stand-in:

* the handful a tensor checkpoint needs (tensor rebuild functions, storage
  classes, dtypes, ``torch.Size``, ``OrderedDict``, ``_codecs.encode``, a few
  data builtins, numpy scalars) become small pure functions or tags;
* every other global becomes an :class:`Opaque` class, whose instances only
  record what REDUCE / NEWOBJ / BUILD / APPEND / SETITEM hand them, so Lightning
  ``hyper_parameters`` or whole pickled ``nn.Module`` objects load as data;
* modules that only ever appear in a pickle to execute code (``os``,
  ``subprocess``, ``builtins.eval`` ...) are refused by name.

TorchScript's ``data.pkl`` (``torchscript=True``) also names the identity
helpers of ``torch.jit._pickle`` (``build_intlist`` ...); only those are let
through the ``torch.jit`` ban, and only in that mode. Its ``__torch__.*`` module
classes are unknown globals like any other, so they load as :class:`Opaque`.

Nothing real is ever imported and no stand-in calls anything the pickle
supplies, so REDUCE on a dangerous callable cannot happen: the callable never
exists. Before the C unpickler runs, :func:`prescan` walks the opcodes with
:mod:`pickletools` to refuse forbidden globals early, bound memo indices (the C
unpickler sizes its memo table from them) and bound tuple nesting (hashing a
deeply nested tuple overflows the C stack and kills the process).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any, Literal, cast

import numpy as np

MAX_PICKLE_BYTES = 256 << 20
# the prescan costs ~1-2 us per opcode in pure Python: 2 M bounds it to a few seconds;
# a tensor costs ~40 opcodes, so this admits state dicts of ~50k tensors (typical ones
# need well under 100k opcodes)
MAX_OPCODES = 2_000_000
MAX_NAME = 4096
MAX_TUPLE_DEPTH = 256
MAX_NESTING = 1000
MAX_MEMO_INDEX = 1 << 26

# dotted prefixes (modules, or module.attribute) with no business in a checkpoint
DENIED_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess", "_posixsubprocess",
    "importlib", "imp", "pkgutil", "zipimport", "runpy", "code", "codeop", "pty", "shutil",
    "socket", "_socket", "ssl", "pickle", "_pickle", "pickletools", "copy", "marshal",
    "types", "ctypes", "_ctypes", "cffi", "webbrowser", "commands", "popen2", "platform",
    "multiprocessing", "concurrent", "threading", "_thread", "signal", "asyncio", "select",
    "selectors", "operator", "_operator", "timeit", "pdb", "bdb", "trace", "profile",
    "cProfile", "doctest", "idlelib", "distutils", "setuptools", "ensurepip", "fcntl",
    "mmap", "urllib.request", "http.client", "ftplib", "smtplib", "telnetlib", "xmlrpc",
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.load", "torch.hub", "torch.jit",
    "torch.serialization", "torch.load", "torch.package", "torch.utils.cpp_extension",
    "torch.ops", "torch._ops", "torch._dynamo", "torch._inductor",
})
# name segments that mean "run code" whatever module they are looked up in
DENIED_NAMES = frozenset({
    "eval", "exec", "execfile", "compile", "__import__", "import_module", "getattr",
    "setattr", "delattr", "globals", "locals", "vars", "open", "system", "popen", "spawn",
    "__builtins__", "__globals__", "__subclasses__", "__code__", "__reduce__",
    "__reduce_ex__", "__getattribute__", "__setstate__", "breakpoint",
    # modules reached as attributes of another module (protocol 4 dotted names)
    "os", "posix", "nt", "sys", "subprocess", "builtins", "importlib", "shutil", "pickle",
    "marshal", "ctypes", "runpy", "socket", "pty",
})
# Python 2 module names the unpickler may hand us (protocol < 3 with fix_imports)
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "exceptions": "builtins"}

_TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int64": "int64", "long": "int64", "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
    "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "complex64": "complex64", "cfloat": "complex64", "complex128": "complex128",
    "cdouble": "complex128", "complex32": "complex32", "chalf": "complex32",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz", "float8_e5m2fnuz": "float8_e5m2fnuz",
    "float8_e8m0fnu": "float8_e8m0fnu", "float4_e2m1fn_x2": "float4_e2m1fn_x2",
    "qint8": "qint8", "quint8": "quint8", "qint32": "qint32", "quint4x2": "quint4x2",
    "quint2x4": "quint2x4", "bits8": "bits8", "bits16": "bits16",
}
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8", "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    # TorchScript names a storage by its scalar type, whatever the dtype
    "UInt16Storage": "uint16", "UInt32Storage": "uint32", "UInt64Storage": "uint64",
    "ComplexHalfStorage": "complex32", "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2", "Float8_e4m3fnuzStorage": "float8_e4m3fnuz",
    "Float8_e5m2fnuzStorage": "float8_e5m2fnuz", "Float8_e8m0fnuStorage": "float8_e8m0fnu",
    "Float4_e2m1fn_x2Storage": "float4_e2m1fn_x2",
}
# element sizes torch uses for dtypes outside bnexporter's decodable set
EXTRA_ITEMSIZE = {"complex32": 4, "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1,
                  "quint2x4": 1, "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2}

_ATOMS = (str, bytes, int, float, complex, bool, type(None))


class Refused(Exception):
    """Raised inside the unpickler; the reader turns it into a CheckpointError."""

    def __init__(self, cause: str, reason: str = "corrupt"):
        super().__init__(cause)
        self.cause = cause
        self.reason = reason


class _Inert:
    """Base of every stand-in: BUILD (``__setstate__``) on it is refused."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise Refused(f"pickle tried to BUILD a {type(self).__name__} stand-in", "forbidden")


class StandIn(_Inert):
    """A resolved global that may be called: wraps one of our pure functions.

    A wrapper rather than the function itself, because BUILD on a plain function
    would write into its ``__dict__``/``__defaults__`` and leak into later files.
    """

    __slots__ = ("fn", "name")

    def __init__(self, name: str, fn: Callable[..., object]):
        self.name = name
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> object:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<stand-in for {self.name}>"


class DType(_Inert):
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class StorageType(_Inert):
    """``torch.FloatStorage`` & co; ``dtype`` None for ``UntypedStorage`` (bytes)."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: str | None):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class StorageRef(_Inert):
    """One stored storage: its record key, element dtype (None: bytes) and length.

    ``view`` is the legacy format's ``(offset, numel)`` window onto the storage.
    """

    __slots__ = ("dtype", "key", "location", "numel", "view")

    def __init__(self, key: str, dtype: str | None, numel: int, location: str,
                 view: tuple[int, int] | None = None):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.location = location
        self.view = view

    @property
    def itemsize(self) -> int | None:
        return 1 if self.dtype is None else _itemsize(self.dtype)

    @property
    def nbytes(self) -> int | None:
        size = self.itemsize
        return None if size is None else self.numel * size


class TensorRef(_Inert):
    """A tensor as the pickle describes it: a strided view of a storage."""

    __slots__ = ("dtype", "offset", "size", "storage", "stride")

    def __init__(self, storage: StorageRef, offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...], dtype: str):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride
        self.dtype = dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.size:
            n *= d
        return n

    @property
    def contiguous(self) -> bool:
        expected = 1
        for d, s in zip(reversed(self.size), reversed(self.stride)):
            if d != 1 and s != expected:
                return False
            expected *= d
        return True

    def __repr__(self) -> str:
        return f"TensorRef({self.dtype}{list(self.size)} @ storage {self.storage.key})"


class _OpaqueMeta(type):
    """Stand-in classes are immutable: BUILD on a class cannot patch it."""

    def __setattr__(cls, name: str, value: object) -> None:
        raise Refused("pickle tried to set an attribute on a global", "forbidden")

    def __repr__(cls) -> str:
        return f"<opaque class {cls.global_module}.{cls.global_name}>"  # type: ignore[attr-defined]


class Opaque(metaclass=_OpaqueMeta):
    """An instance of a global we do not know: records what the pickle gave it.

    Nothing here calls anything: ``__new__``/``__init__`` keep the arguments,
    ``__setstate__`` keeps the state, ``append``/``extend``/``add`` and item
    assignment keep the items. ``global_module``/``global_name`` say what the
    pickle asked for.
    """

    __slots__ = ("args", "items", "kwargs", "listitems", "state")
    global_module = ""
    global_name = ""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: object
    items: list[tuple[object, object]]
    listitems: list[object]

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = []
        self.listitems = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        self.state = state

    def append(self, item: object) -> None:
        self.listitems.append(item)

    def extend(self, items: object) -> None:
        if not isinstance(items, (list, tuple)):
            raise Refused("APPENDS with a non-list")
        self.listitems.extend(items)

    def add(self, item: object) -> None:
        self.listitems.append(item)

    def __setitem__(self, key: object, value: object) -> None:
        self.items.append((key, value))

    @property
    def qualname(self) -> str:
        return f"{self.global_module}.{self.global_name}"

    def state_dict(self) -> dict | None:
        """The ``__dict__`` part of the recorded state, if it is one."""
        st = self.state
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[0], dict):
            st = st[0]
        return st if isinstance(st, dict) else None

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


def _itemsize(dtype: str) -> int | None:
    from bnexporter.formats import dtypes

    if dtypes.is_supported(dtype):
        return dtypes.itemsize(dtype)
    return EXTRA_ITEMSIZE.get(dtype)


# -- stand-ins ---------------------------------------------------------------

def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise Refused(f"tensor {what} is not a short tuple of ints")
    if not all(type(v) is int and v >= 0 for v in value):
        raise Refused(f"tensor {what} {value!r} has a non-integer or negative entry")
    return tuple(value)


def _tensor(storage: object, offset: object, size: object, stride: object,
            dtype: str | None = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise Refused("tensor rebuilt from something that is not a stored storage")
    if type(offset) is not int or offset < 0:
        raise Refused(f"tensor storage offset {offset!r} is invalid")
    size_t = _int_tuple(size, "size")
    stride_t = _int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise Refused(f"tensor size {size_t} and stride {stride_t} differ in length")
    dt = dtype or storage.dtype
    if dt is None:
        raise Refused("tensor over an untyped storage without a dtype")
    return TensorRef(storage, offset, size_t, stride_t, dt)


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object,
                    *_rest: object) -> TensorRef:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: object, offset: object, size: object, stride: object,
                       _requires_grad: object = None, _hooks: object = None,
                       dtype: object = None, *_rest: object) -> TensorRef:
    if not isinstance(dtype, DType):
        raise Refused("_rebuild_tensor_v3 without a torch dtype")
    return _tensor(storage, offset, size, stride, dtype.name)


def _rebuild_parameter(data: object, *_rest: object) -> object:
    return data


def _rebuild_from_cpu(data: object, *_rest: object) -> object:
    return data


def _rebuild_from_type(func: object, new_type: object, args: object, *_state: object
                       ) -> object:
    """Tensor subclasses: rebuild the plain tensor only if ``func`` is one of ours."""
    if isinstance(func, StandIn) and func.fn in _REBUILDERS and isinstance(args, tuple):
        return func.fn(*args)
    return _FROM_TYPE(func, new_type, args)


_REBUILDERS: frozenset[Callable[..., object]] = frozenset(
    {_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter, _rebuild_from_cpu})


def _size(*args: object) -> tuple[int, ...]:
    return _int_tuple(args[0] if args else (), "torch.Size")


def _device(*args: object) -> str:
    return ":".join(str(a) for a in args if isinstance(a, (str, int)))


def _ordered_dict(*args: object) -> OrderedDict:
    out: OrderedDict = OrderedDict()
    if args:
        pairs = args[0]
        if not isinstance(pairs, (list, tuple)):
            raise Refused("OrderedDict built from a non-list")
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise Refused("OrderedDict built from a list that is not of pairs")
            out[pair[0]] = pair[1]
    return out


_CODECS = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "ascii", "utf-8", "utf8"}


def _encode(obj: object, encoding: object = "utf-8", *_rest: object) -> bytes:
    """``_codecs.encode(s, 'latin1')``: how protocol-2 pickles spell bytes."""
    if not isinstance(obj, str) or not isinstance(encoding, str) \
            or encoding.lower() not in _CODECS:
        raise Refused(f"_codecs.encode with encoding {encoding!r}", "forbidden")
    return obj.encode(encoding)


def _atoms(value: object, what: str) -> list:
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise Refused(f"{what} built from a {type(value).__name__}")
    items = list(value)
    if not all(isinstance(v, _ATOMS) for v in items):
        raise Refused(f"{what} holds non-scalar items")
    return items


def _set(*args: object) -> set:
    return set(_atoms(args[0], "set")) if args else set()


def _frozenset(*args: object) -> frozenset:
    return frozenset(_atoms(args[0], "frozenset")) if args else frozenset()


def _bytearray(*args: object) -> bytearray:
    if not args:
        return bytearray()
    data = args[0]
    if isinstance(data, (bytes, bytearray)):
        return bytearray(data)
    if isinstance(data, str) and len(args) > 1:
        return bytearray(_encode(data, args[1]))
    if isinstance(data, list) and all(type(v) is int and 0 <= v < 256 for v in data):
        return bytearray(data)
    raise Refused("bytearray built from something other than bytes", "forbidden")


def _complex(*args: object) -> complex:
    if len(args) > 2 or not all(isinstance(a, (int, float, str)) for a in args):
        raise Refused("complex built from non-numbers")
    numbers: tuple[Any, ...] = args  # checked just above: ints, floats or strings
    return complex(*numbers)


def _slice(*args: object) -> slice:
    if len(args) > 3 or not all(a is None or type(a) is int for a in args):
        raise Refused("slice built from non-integers")
    return slice(*args)


class _TypeName(_Inert):
    """``builtins.object``/``dict``/...: only ever a tag (e.g. a _reconstructor base)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"builtins.{self.name}"


def _reconstructor(cls: object, base: object = None, state: object = None) -> Opaque:
    """``copyreg._reconstructor`` (protocols 0/1): an Opaque instance, never ``base``."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls.__new__(cls, base, state)
    raise Refused("copyreg._reconstructor on a class that is not a recorded global")


class NumpyDType(_Inert):
    """``numpy.dtype(code, align, copy)`` plus its BUILD state, as plain data."""

    __slots__ = ("byteorder", "code")

    def __init__(self, code: object = None, *_rest: object):
        self.code = code if isinstance(code, str) else None
        self.byteorder = "<"

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def numpy(self) -> np.dtype | None:
        if self.code is None or not re.fullmatch(r"[biufc?][0-9]{0,2}", self.code):
            return None
        bo: Literal["<", ">"] = ">" if self.byteorder == ">" else "<"  # "|" and "=" read as "<"
        return np.dtype(self.code).newbyteorder(bo)


def _numpy_scalar(dtype: object, data: object = None, *_rest: object) -> object:
    """``numpy.core.multiarray.scalar``: decoded to a Python number when it is one."""
    if isinstance(dtype, NumpyDType) and isinstance(data, bytes):
        dt = dtype.numpy()
        if dt is not None and dt.itemsize == len(data):
            return np.frombuffer(data, dt)[0].item()
    return _NP_SCALAR(dtype, data)


def _numpy_dtype(*args: object) -> NumpyDType:
    return NumpyDType(*args)


def _fixed_globals() -> dict[tuple[str, str], object]:
    table: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _rebuild_from_cpu,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
        ("torch", "Size"): _size,
        ("torch", "device"): _device,
        ("_codecs", "encode"): _encode,
        ("codecs", "encode"): _encode,
        ("builtins", "set"): _set,
        ("builtins", "frozenset"): _frozenset,
        ("builtins", "bytearray"): _bytearray,
        ("builtins", "complex"): _complex,
        ("builtins", "slice"): _slice,
        ("copyreg", "_reconstructor"): _reconstructor,
    }
    for name in ("object", "dict", "list", "tuple", "int", "float", "str", "bytes", "bool"):
        table[("builtins", name)] = _TypeName(name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "scalar")] = _numpy_scalar
    table[("numpy", "dtype")] = _numpy_dtype
    for (mod, name), value in list(table.items()):
        if callable(value) and not isinstance(value, type):
            table[(mod, name)] = StandIn(f"{mod}.{name}", value)
    for alias, canonical in _TORCH_DTYPES.items():
        table[("torch", alias)] = DType(canonical)
    for mod in ("torch", "torch.cuda"):
        for name, dt in _STORAGE_DTYPES.items():
            table[(mod, name)] = StorageType(name, dt)
    for mod in ("torch", "torch.storage"):
        table[(mod, "UntypedStorage")] = StorageType("UntypedStorage", None)
        table[(mod, "_UntypedStorage")] = StorageType("UntypedStorage", None)
    return table


_FIXED = _fixed_globals()


def _typed_list(data: object, *_rest: object) -> list:
    """``torch.jit._pickle.build_intlist`` & co: the identity on a list."""
    if not isinstance(data, list):
        raise Refused("torch.jit._pickle list builder on a non-list")
    return data


def _restore_type_tag(value: object, *_rest: object) -> object:
    return value


# TorchScript's data.pkl only: typed-container helpers that return their argument
_TORCHSCRIPT_FIXED: dict[tuple[str, str], object] = {
    ("torch.jit._pickle", name): StandIn(f"torch.jit._pickle.{name}", fn)
    for name, fn in (("build_intlist", _typed_list), ("build_doublelist", _typed_list),
                     ("build_boollist", _typed_list), ("build_tensorlist", _typed_list),
                     ("restore_type_tag", _restore_type_tag))}


def _opaque_class(module: str, name: str) -> type[Opaque]:
    cls = _OpaqueMeta("Opaque", (Opaque,), {"__slots__": (), "global_module": module,
                                           "global_name": name})
    return cast("type[Opaque]", cls)


# shared (immutable) classes for results we record instead of computing
_FROM_TYPE = _opaque_class("torch._tensor", "_rebuild_from_type_v2")
_NP_SCALAR = _opaque_class("numpy.core.multiarray", "scalar")


def check_global(module: str, name: str, torchscript: bool = False) -> str | None:
    """Why ``module.name`` is refused, or None when it may be resolved to a stand-in."""
    module = _PY2_MODULES.get(module, module)
    if torchscript and (module, name) in _TORCHSCRIPT_FIXED:
        return None
    full = f"{module}.{name}"
    parts = full.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in DENIED_MODULES:
            return f"forbidden global {full} ({'.'.join(parts[:i])} is never needed by a "\
                   "checkpoint)"
    if any(seg in DENIED_NAMES for seg in name.split(".")):
        return f"forbidden global {full}"
    if module == "builtins" and (module, name) not in _FIXED:
        return f"forbidden global {full} (only data builtins are allowed)"
    if module == "copyreg" and (module, name) not in _FIXED:
        return f"forbidden global {full}"
    return None


# -- prescan -----------------------------------------------------------------

_ATOM_OPS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "NONE", "NEWTRUE", "NEWFALSE", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "BYTEARRAY8", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "PERSID",
})
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                         "SHORT_BINUNICODE", "BINUNICODE8"})


def prescan(stream: io.BufferedIOBase | io.RawIOBase, limit: int = MAX_PICKLE_BYTES,
            torchscript: bool = False) -> int:
    """Check one pickle's opcodes without building anything; return its length.

    Simulates the stack only as far as safety needs: which strings STACK_GLOBAL
    consumes, how deeply tuples nest, and that memo indices stay small.
    """
    start = stream.tell()
    stack: list[int | str] = []
    marks: list[int] = []
    memo: dict[int, int | str] = {}

    def pop(k: int) -> list[int | str]:
        if len(stack) - (marks[-1] if marks else 0) < k:
            raise Refused("pickle stack underflow")
        items = stack[len(stack) - k:]
        del stack[len(stack) - k:]
        return items

    def pop_mark() -> list[int | str]:
        if not marks:
            raise Refused("pickle uses a MARK that was never set")
        m = marks.pop()
        items = stack[m:]
        del stack[m:]
        return items

    def tuple_depth(items: list[int | str]) -> int:
        depth = 1 + max((d for d in items if isinstance(d, int)), default=0)
        if depth > MAX_TUPLE_DEPTH:
            raise Refused(f"pickle nests tuples more than {MAX_TUPLE_DEPTH} deep", "too_large")
        return depth

    def check(module: object, name: object) -> None:
        if not isinstance(module, str) or not isinstance(name, str):
            raise Refused("STACK_GLOBAL with non-string operands")
        why = check_global(module, name, torchscript)
        if why:
            raise Refused(why, "forbidden")

    n_ops = 0
    try:
        for op, arg, pos in pickletools.genops(cast("IO[bytes]", stream)):  # genops only reads
            n_ops += 1
            if n_ops > MAX_OPCODES or (pos is not None and pos - start > limit):
                raise Refused(f"pickle is larger than {limit} bytes or "
                              f"{MAX_OPCODES} opcodes", "too_large")
            name = op.name
            if name in _ATOM_OPS:
                stack.append(0)
            elif name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else 0)
            elif name == "EMPTY_TUPLE":
                stack.append(1)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                stack.append(tuple_depth(pop(int(name[-1]))))
            elif name in ("TUPLE", "FROZENSET"):
                stack.append(tuple_depth(pop_mark()))
            elif name in ("LIST", "DICT"):
                pop_mark()
                stack.append(0)
            elif name == "MARK":
                marks.append(len(stack))
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS", "POP_MARK"):
                pop_mark()
            elif name == "APPEND":
                pop(1)
            elif name == "SETITEM":
                pop(2)
            elif name == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop(1)
            elif name == "DUP":
                stack.append(pop(1)[0])
                stack.append(stack[-1])
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise Refused(f"pickle reads memo slot {arg} before setting it")
                stack.append(memo[arg])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                idx = len(memo) if name == "MEMOIZE" else arg
                if not isinstance(idx, int) or idx < 0 or idx > min(MAX_MEMO_INDEX,
                                                                    n_ops + 1024):
                    raise Refused(f"pickle memo index {idx!r} is out of range")
                if not stack or (marks and marks[-1] == len(stack)):
                    raise Refused("pickle memoizes an empty stack")
                memo[idx] = stack[-1]
            elif name in ("GLOBAL", "INST"):
                module, _, gname = str(arg).partition(" ")
                check(module, gname)
                if name == "INST":
                    pop_mark()
                stack.append(0)
            elif name == "STACK_GLOBAL":
                smodule, sname = pop(2)
                check(smodule, sname)
                stack.append(0)
            elif name == "OBJ":
                pop_mark()
                stack.append(0)
            elif name in ("REDUCE", "NEWOBJ"):
                pop(2)
                stack.append(0)
            elif name == "NEWOBJ_EX":
                pop(3)
                stack.append(0)
            elif name == "BUILD":
                pop(1)
            elif name == "BINPERSID":
                pop(1)
                stack.append(0)
            elif name in ("PROTO", "FRAME"):
                pass
            elif name == "STOP":
                break
            elif name.startswith("EXT"):
                raise Refused(f"pickle uses the extension registry ({name})", "forbidden")
            else:
                raise Refused(f"pickle uses unsupported opcode {name}", "forbidden")
    except Refused:
        raise
    except ValueError as exc:
        msg = str(exc)
        short = ("remain", "exhausted", "truncat", "EOF", "at end")
        reason = "truncated" if any(word in msg for word in short) else "corrupt"
        raise Refused(f"malformed pickle ({msg[:200]})", reason) from None
    else:
        if n_ops == 0:
            raise Refused("empty pickle", "truncated")
    return stream.tell() - start


# -- the unpickler -------------------------------------------------------------

class TorchUnpickler(pickle.Unpickler):
    """Resolves globals to stand-ins and storages to :class:`StorageRef`.

    ``legacy`` accepts the pre-1.6 persistent ids (six-field storages with a
    view window, and ``('module', cls, file, source)``); ``torchscript`` the
    ``torch.jit._pickle`` helpers of a TorchScript data.pkl.
    """

    def __init__(self, data: bytes, legacy: bool = False,
                 storages: dict[str, StorageRef] | None = None, torchscript: bool = False):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.legacy = legacy
        self.torchscript = torchscript
        self.storages: dict[str, StorageRef] = {} if storages is None else storages
        self._classes: dict[tuple[str, str], type[Opaque]] = {}
        self._views: dict[tuple[str, int, int], StorageRef] = {}

    def find_class(self, module: str, name: str) -> object:
        why = check_global(module, name, self.torchscript)
        if why:
            raise Refused(why, "forbidden")
        module = _PY2_MODULES.get(module, module)
        fixed = _FIXED.get((module, name))
        if fixed is None and self.torchscript:
            fixed = _TORCHSCRIPT_FIXED.get((module, name))
        if fixed is not None:
            return fixed
        cls = self._classes.get((module, name))
        if cls is None:
            cls = self._classes[(module, name)] = _opaque_class(module, name)
        return cls

    def persistent_load(self, pid: object) -> object:
        if not isinstance(pid, tuple) or not pid:
            raise Refused("persistent id is not a tuple", "forbidden")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and self.legacy and len(pid) == 4:
            if isinstance(pid[1], type) and issubclass(pid[1], Opaque):
                return pid[1]
            raise Refused("legacy module persistent id without a class")
        if kind != "storage" or len(pid) not in ((5, 6) if self.legacy else (5,)):
            raise Refused(f"unsupported persistent id {str(kind)[:40]!r} with {len(pid)} "
                          "fields", "forbidden")
        stype, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if isinstance(location, bytes):
            location = location.decode("ascii", "replace")
        if not isinstance(stype, StorageType):
            raise Refused("storage persistent id without a storage class")
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", key):
            raise Refused(f"storage key {str(key)[:40]!r} is not a plain name")
        if type(numel) is not int or numel < 0:
            raise Refused(f"storage {key} has an invalid length {numel!r}")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(key, stype.dtype, numel, str(location))
        elif ref.dtype != stype.dtype or ref.numel != numel:
            raise Refused(f"storage {key} is described twice with different types/lengths")
        if view is None:
            return ref
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int
                and type(view[2]) is int and view[1] >= 0 and view[2] >= 0
                and view[1] + view[2] <= numel):
            raise Refused(f"storage {key} has an invalid view {view!r}")
        vkey = (key, view[1], view[2])
        if vkey not in self._views:
            self._views[vkey] = StorageRef(key, ref.dtype, view[2], ref.location,
                                           (view[1], view[2]))
        return self._views[vkey]


def load(data: bytes, legacy: bool = False,
         storages: dict[str, StorageRef] | None = None, torchscript: bool = False) -> object:
    """Prescan, then unpickle ``data`` with stand-ins; any failure is :class:`Refused`."""
    if len(data) > MAX_PICKLE_BYTES:
        raise Refused(f"pickle of {len(data)} bytes exceeds the {MAX_PICKLE_BYTES} byte "
                      "limit", "too_large")
    prescan(io.BytesIO(data), torchscript=torchscript)
    try:
        return TorchUnpickler(data, legacy, storages, torchscript).load()
    except Refused:
        raise
    except (MemoryError, RecursionError) as exc:
        raise Refused(f"pickle exhausted {exc.__class__.__name__}", "too_large") from None
    except Exception as exc:
        raise Refused(f"unpickling failed: {exc.__class__.__name__}: {str(exc)[:200]}"
                      ) from None
