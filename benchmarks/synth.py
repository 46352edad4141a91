"""Synthetic ResNet-152-like checkpoints of a chosen size, written by streaming.

Why synthetic: the benchmark needs 1-4 GB files with a realistic BatchNorm
layout (155 BN layers, real channel counts, conv kernels) on any machine,
without TensorFlow or PyTorch. Big "embedding" and "dense head" tensors pad the
file to the requested size. Every writer streams from one 32 MB pool of random
numbers, so writing 4 GB never holds more than a few tens of MB.

Planted on purpose, so the benchmark can check the analysis found them:
two dead channels in every 10th ReLU-fed BN layer, and 3 NaN + 2 Inf values in
the first padding tensor.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

POOL_ELEMENTS = 1 << 23          # 32 MB of float32 random numbers, reused everywhere
STAGES = ((64, 3), (128, 8), (256, 36), (512, 3))   # ResNet-152 (width, blocks)
PAD_TEMPLATES = (("embed", (131072, 1024)),          # 512 MiB embedding-like
                 ("dense", (4096, 4096)),             # 64 MiB dense head
                 ("dense", (8192, 4096)))             # 128 MiB dense head
NAN_PLANTS, INF_PLANTS = 3, 2
DEAD_PER_LAYER, DEAD_EVERY = 2, 10


@dataclass
class Tensor:
    """One stored tensor: Keras and torch names, shapes in each layout, content kind."""

    keras_layer: str
    keras_var: str
    torch_name: str
    keras_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    kind: str            # weight, bias, gamma, beta, mean, var, count
    seed: int = 0
    plant_dead: bool = False
    plant_nonfinite: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.keras_shape)


@dataclass
class KerasLayer:
    name: str
    class_name: str
    inputs: list[str]
    config: dict = field(default_factory=dict)


@dataclass
class Model:
    tensors: list[Tensor]
    keras_layers: list[KerasLayer]
    planted_dead: int
    relu_bn_layers: int

    def bn_layers(self) -> int:
        return sum(1 for t in self.tensors if t.kind == "var")

    def planted_nonfinite(self) -> int:
        """NaN + Inf values planted (none when the file is too small for padding)."""
        return (NAN_PLANTS + INF_PLANTS) * sum(t.plant_nonfinite for t in self.tensors)


def _conv(tensors: list[Tensor], layers: list[KerasLayer], kname: str, tname: str,
          src: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
    seed = len(tensors)
    tensors.append(Tensor(kname, "kernel", f"{tname}.weight", (k, k, cin, cout),
                          (cout, cin, k, k), "weight", seed))
    # Keras application convs have a bias (zero-initialised); torchvision's do not
    tensors.append(Tensor(kname, "bias", "", (cout,), (), "bias", seed + 1))
    layers.append(KerasLayer(kname, "Conv2D", [src], {
        "filters": cout, "kernel_size": [k, k], "strides": [stride, stride],
        "padding": "same", "use_bias": True, "activation": "linear"}))
    return kname


def _bn(tensors: list[Tensor], layers: list[KerasLayer], kname: str, tname: str, src: str,
        c: int, relu_index: int | None) -> str:
    """``relu_index`` counts ReLU-fed BN layers; every DEAD_EVERY-th gets dead channels."""
    plant = relu_index is not None and relu_index % DEAD_EVERY == 0
    seed = len(tensors)
    for var, tvar, kind in (("gamma", "weight", "gamma"), ("beta", "bias", "beta"),
                            ("moving_mean", "running_mean", "mean"),
                            ("moving_variance", "running_var", "var")):
        tensors.append(Tensor(kname, var, f"{tname}.{tvar}", (c,), (c,), kind, seed,
                              plant_dead=plant))
    tensors.append(Tensor("", "", f"{tname}.num_batches_tracked", (), (), "count"))
    layers.append(KerasLayer(kname, "BatchNormalization", [src], {
        "axis": [3], "momentum": 0.99, "epsilon": 1.001e-05, "center": True, "scale": True}))
    return kname


def _act(layers: list[KerasLayer], name: str, src: str) -> str:
    layers.append(KerasLayer(name, "Activation", [src], {"activation": "relu"}))
    return name


def resnet152() -> tuple[list[Tensor], list[KerasLayer], int, int]:
    """The ResNet-152 v1 layer list, Keras-applications names and torchvision names."""
    t: list[Tensor] = []
    lay: list[KerasLayer] = [KerasLayer("input_1", "InputLayer", [], {
        "batch_input_shape": [None, 224, 224, 3], "dtype": "float32"})]
    relu_bn = 0
    x = _conv(t, lay, "conv1_conv", "conv1", "input_1", 3, 64, 7, 2)
    x = _bn(t, lay, "conv1_bn", "bn1", x, 64, relu_bn)
    relu_bn += 1
    x = _act(lay, "conv1_relu", x)
    lay.append(KerasLayer("pool1_pool", "MaxPooling2D", [x], {"pool_size": [3, 3]}))
    x, cin = "pool1_pool", 64
    for s, (width, blocks) in enumerate(STAGES):
        for b in range(blocks):
            kp, tp = f"conv{s + 2}_block{b + 1}", f"layer{s + 1}.{b}"
            stride = 2 if b == 0 and s > 0 else 1
            if b == 0:
                sc = _conv(t, lay, f"{kp}_0_conv", f"{tp}.downsample.0", x, cin, 4 * width, 1,
                           stride)
                sc = _bn(t, lay, f"{kp}_0_bn", f"{tp}.downsample.1", sc, 4 * width, None)
            else:
                sc = x
            y = _conv(t, lay, f"{kp}_1_conv", f"{tp}.conv1", x, cin, width, 1, stride)
            y = _bn(t, lay, f"{kp}_1_bn", f"{tp}.bn1", y, width, relu_bn)
            relu_bn += 1
            y = _act(lay, f"{kp}_1_relu", y)
            y = _conv(t, lay, f"{kp}_2_conv", f"{tp}.conv2", y, width, width, 3)
            y = _bn(t, lay, f"{kp}_2_bn", f"{tp}.bn2", y, width, relu_bn)
            relu_bn += 1
            y = _act(lay, f"{kp}_2_relu", y)
            y = _conv(t, lay, f"{kp}_3_conv", f"{tp}.conv3", y, width, 4 * width, 1)
            y = _bn(t, lay, f"{kp}_3_bn", f"{tp}.bn3", y, 4 * width, None)
            lay.append(KerasLayer(f"{kp}_add", "Add", [sc, y]))
            x = _act(lay, f"{kp}_out", f"{kp}_add")
            cin = 4 * width
    lay.append(KerasLayer("avg_pool", "GlobalAveragePooling2D", [x]))
    seed = len(t)
    t.append(Tensor("predictions", "kernel", "fc.weight", (2048, 1000), (1000, 2048), "weight",
                    seed))
    t.append(Tensor("predictions", "bias", "fc.bias", (1000,), (1000,), "bias", seed + 1))
    lay.append(KerasLayer("predictions", "Dense", ["avg_pool"],
                          {"units": 1000, "activation": "softmax", "use_bias": True}))
    planted = sum(DEAD_PER_LAYER for i in range(relu_bn) if i % DEAD_EVERY == 0)
    return t, lay, planted, relu_bn


def bn_chain(n_bn: int = 150, channels: int = 16) -> Model:
    """A small plain chain ``conv -> BN -> ReLU`` x n_bn and a 10-way head.

    Why: the daemon benchmarks need many models with many BN layers (metric volume)
    whose analysis is cheap, so the kernels are 1x1 and narrow. Every DEAD_EVERY-th
    BN layer gets DEAD_PER_LAYER dead channels as in ResNet-152.
    """
    t: list[Tensor] = []
    lay: list[KerasLayer] = [KerasLayer("input_1", "InputLayer", [], {
        "batch_input_shape": [None, 32, 32, 3], "dtype": "float32"})]
    x, cin = "input_1", 3
    for i in range(n_bn):
        x = _conv(t, lay, f"conv{i}", f"features.{i}.conv", x, cin, channels, 1)
        x = _bn(t, lay, f"bn{i}", f"features.{i}.bn", x, channels, i)
        x = _act(lay, f"relu{i}", x)
        cin = channels
    lay.append(KerasLayer("avg_pool", "GlobalAveragePooling2D", [x]))
    seed = len(t)
    t.append(Tensor("predictions", "kernel", "fc.weight", (channels, 10), (10, channels),
                    "weight", seed))
    t.append(Tensor("predictions", "bias", "fc.bias", (10,), (10,), "bias", seed + 1))
    lay.append(KerasLayer("predictions", "Dense", ["avg_pool"],
                          {"units": 10, "activation": "softmax", "use_bias": True}))
    planted = sum(DEAD_PER_LAYER for i in range(n_bn) if i % DEAD_EVERY == 0)
    return Model(t, lay, planted, n_bn)


def build_model(target_bytes: int) -> Model:
    """ResNet-152 plus padding tensors until the float32 payload reaches ``target_bytes``."""
    tensors, layers, planted, relu_bn = resnet152()
    total = sum(4 * x.size for x in tensors if x.kind != "count")
    layers.append(KerasLayer("tokens", "InputLayer", [], {"batch_input_shape": [None, None],
                                                          "dtype": "int32"}))
    i = 0
    first = True
    while total < target_bytes:
        kind, (rows, cols) = PAD_TEMPLATES[i % len(PAD_TEMPLATES)]
        rows = min(rows, max(1, -(-(target_bytes - total) // (4 * cols))))
        seed = len(tensors)
        if kind == "embed":
            name = f"embedding_{i}"
            tensors.append(Tensor(name, "embeddings", f"embed.{i}.weight", (rows, cols),
                                  (rows, cols), "weight", seed, plant_nonfinite=first))
            layers.append(KerasLayer(name, "Embedding", ["tokens"],
                                     {"input_dim": rows, "output_dim": cols}))
            total += 4 * rows * cols
        else:
            name = f"dense_{i}"
            tensors.append(Tensor(name, "kernel", f"head.{i}.weight", (rows, cols),
                                  (cols, rows), "weight", seed, plant_nonfinite=first))
            tensors.append(Tensor(name, "bias", f"head.{i}.bias", (cols,), (cols,), "bias",
                                  seed + 1))
            layers.append(KerasLayer(name, "Dense", ["avg_pool"],
                                     {"units": cols, "activation": "linear"}))
            total += 4 * (rows + 1) * cols
        first = False
        i += 1
    return Model(tensors, layers, planted, relu_bn)


# -- content ------------------------------------------------------------------

class Content:
    """Deterministic tensor values from one reusable random pool."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.pool = (rng.standard_normal(POOL_ELEMENTS, dtype=np.float32) * 0.05)

    def chunks(self, t: Tensor, row: int) -> Iterator[np.ndarray]:
        """Flat C-order chunks of whole rows (``row`` elements each), at most 32 MB."""
        if t.kind == "count":
            yield np.array([1000], dtype=np.int64)
            return
        if t.kind in ("gamma", "beta", "mean", "var"):
            yield self._bn_vector(t)
            return
        if t.kind == "bias":
            yield np.zeros(t.size, dtype=np.float32)
            return
        n = t.size
        step = max(row, (POOL_ELEMENTS // max(row, 1)) * row)
        start = (t.seed * 7919) % (POOL_ELEMENTS // 2)
        for done in range(0, n, step):
            k = min(step, n - done)
            chunk = self._pool_slice(start + done, k)
            if t.plant_nonfinite and done == 0:
                chunk = chunk.copy()
                chunk[[1, 5, 9]] = np.nan
                chunk[[2, 6]] = np.inf
            yield chunk

    def _pool_slice(self, offset: int, k: int) -> np.ndarray:
        offset %= POOL_ELEMENTS
        if offset + k <= POOL_ELEMENTS:
            return self.pool[offset:offset + k]
        return np.concatenate([self.pool[offset:], self.pool[: k - (POOL_ELEMENTS - offset)]])

    def _bn_vector(self, t: Tensor) -> np.ndarray:
        c = t.size
        rng = np.random.default_rng(t.seed)
        gamma = rng.uniform(0.8, 1.2, c).astype(np.float32)
        beta = rng.normal(0.1, 0.05, c).astype(np.float32)
        mean = rng.normal(0.0, 0.5, c).astype(np.float32)
        var = rng.uniform(0.5, 2.0, c).astype(np.float32)
        if t.plant_dead:  # strongly negative beta, small gamma: p_active ~ Phi(-40)
            gamma[:DEAD_PER_LAYER] = 0.1
            beta[:DEAD_PER_LAYER] = -4.0
        return {"gamma": gamma, "beta": beta, "mean": mean, "var": var}[t.kind]


def _row(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


# -- Keras 2 HDF5 ---------------------------------------------------------------

def keras_model_config(model: Model) -> dict:
    """A tf.keras 2 Functional config: layer list with [[name, 0, 0, {}]] inbound nodes."""
    entries = []
    for layer in model.keras_layers:
        cfg = {"name": layer.name, "trainable": True, "dtype": "float32", **layer.config}
        inbound = [[[src, 0, 0, {}] for src in layer.inputs]] if layer.inputs else []
        entries.append({"class_name": layer.class_name, "config": cfg, "name": layer.name,
                        "inbound_nodes": inbound})
    outputs = ["predictions"] + [x.name for x in model.keras_layers
                                 if x.name.startswith(("dense_", "embedding_"))]
    return {"class_name": "Functional", "config": {
        "name": "resnet152_padded", "layers": entries,
        "input_layers": [["input_1", 0, 0], ["tokens", 0, 0]],
        "output_layers": [[n, 0, 0] for n in outputs]}}


def write_h5(path: str, model: Model, content: Content) -> None:
    """``model.save('x.h5')`` layout of tf.keras 2: root attrs ``model_config`` /
    ``keras_version`` / ``backend``, weights under ``model_weights/<layer>/<layer>/<var>:0``."""
    import h5py

    by_layer: dict[str, list[Tensor]] = {}
    for t in model.tensors:
        if t.keras_layer:
            by_layer.setdefault(t.keras_layer, []).append(t)
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(keras_model_config(model)).encode()
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = [x.name.encode() for x in model.keras_layers]
        mw.attrs["backend"] = "tensorflow"
        mw.attrs["keras_version"] = "2.15.0"
        for layer in model.keras_layers:
            g = mw.create_group(layer.name)
            weights = by_layer.get(layer.name, [])
            g.attrs["weight_names"] = (
                [f"{layer.name}/{t.keras_var}:0".encode() for t in weights]
                if weights else np.asarray([]))
            for t in weights:
                ds = g.create_dataset(f"{layer.name}/{t.keras_var}:0", shape=t.keras_shape,
                                      dtype="<f4")
                row = _row(t.keras_shape)
                r = 0
                for chunk in content.chunks(t, row):
                    n = chunk.size // row
                    if len(t.keras_shape) <= 1:
                        ds[...] = chunk.reshape(t.keras_shape)
                    else:
                        ds[r:r + n] = chunk.reshape((n, *t.keras_shape[1:]))
                    r += n


# -- safetensors ----------------------------------------------------------------

def _torch_tensors(model: Model) -> list[Tensor]:
    return [t for t in model.tensors if t.torch_name]


def _torch_chunks(content: Content, t: Tensor) -> Iterator[np.ndarray]:
    """Values in torch layout: the same numbers, laid out C-order in the torch shape."""
    return content.chunks(t, _row(t.torch_shape))


def write_safetensors(path: str, model: Model, content: Content) -> None:
    """u64 header length, JSON header padded to 8 bytes, then the tensors back to back."""
    tensors = sorted(_torch_tensors(model), key=lambda t: (t.kind != "count", t.torch_name))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in tensors:
        dtype, item = ("I64", 8) if t.kind == "count" else ("F32", 4)
        n = item * t.size
        header[t.torch_name] = {"dtype": dtype, "shape": list(t.torch_shape),
                                "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for t in tensors:
            for chunk in _torch_chunks(content, t):
                fh.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))


# -- torch zip ------------------------------------------------------------------

class _Pickle:
    """Protocol-2 pickle opcodes as CPython's pickler emits them for ``torch.save``:
    every string, global, non-empty tuple and reduce result is memoised (BINPUT),
    repeats of the same object come back as BINGET, dict items go in SETITEMS
    batches of 1000. Globals are only named, never imported, so no torch is needed.
    """

    BATCH = 1000

    def __init__(self) -> None:
        self.out: list[bytes] = [pickle.PROTO + b"\x02"]
        self.memo: dict[object, int] = {}
        self.next = 0

    def put(self, key: object = None) -> None:
        idx = self.next
        self.next += 1
        if key is not None:
            self.memo[key] = idx
        self.out.append(pickle.BINPUT + bytes([idx]) if idx < 256
                        else pickle.LONG_BINPUT + struct.pack("<I", idx))

    def get(self, key: object) -> bool:
        idx = self.memo.get(key)
        if idx is None:
            return False
        self.out.append(pickle.BINGET + bytes([idx]) if idx < 256
                        else pickle.LONG_BINGET + struct.pack("<I", idx))
        return True

    def integer(self, n: int) -> None:
        if 0 <= n < 256:
            self.out.append(pickle.BININT1 + bytes([n]))
        elif 0 <= n < 65536:
            self.out.append(pickle.BININT2 + struct.pack("<H", n))
        elif -(1 << 31) <= n < (1 << 31):
            self.out.append(pickle.BININT + struct.pack("<i", n))
        else:
            raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out.append(pickle.LONG1 + bytes([len(raw)]) + raw)

    def string(self, s: str, shared: bool = False) -> None:
        """``shared``: the same (interned) str object each time, so pickled once."""
        if shared and self.get(("str", s)):
            return
        raw = s.encode("utf8")
        self.out.append(pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw)
        self.put(("str", s) if shared else None)

    def glob(self, module: str, name: str) -> None:
        if not self.get(("global", module, name)):
            self.out.append(pickle.GLOBAL + f"{module}\n{name}\n".encode())
            self.put(("global", module, name))

    def ints(self, values: tuple[int, ...]) -> None:
        """A tuple of ints: TUPLE1..3 or MARK ... TUPLE, memoised unless empty."""
        if not values:
            self.out.append(pickle.EMPTY_TUPLE)
            return
        if len(values) > 3:
            self.out.append(pickle.MARK)
        for v in values:
            self.integer(v)
        self.out.append({1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(
            len(values), pickle.TUPLE))
        self.put()

    def empty_ordered_dict(self) -> None:
        self.glob("collections", "OrderedDict")
        self.out += [pickle.EMPTY_TUPLE, pickle.REDUCE]
        self.put()

    def tensor(self, key: str, shape: tuple[int, ...], storage: str) -> None:
        """``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, hooks)``."""
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.out += [pickle.MARK, pickle.MARK]
        self.string("storage", shared=True)
        self.glob("torch", storage)
        self.string(key)
        self.string("cpu", shared=True)
        self.integer(math.prod(shape))
        self.out.append(pickle.TUPLE)
        self.put()
        self.out.append(pickle.BINPERSID)
        self.integer(0)
        self.ints(shape)
        self.ints(tuple(math.prod(shape[i + 1:]) for i in range(len(shape))))
        self.out.append(pickle.NEWFALSE)
        self.empty_ordered_dict()
        self.out.append(pickle.TUPLE)
        self.put()
        self.out.append(pickle.REDUCE)
        self.put()

    def items(self, pairs: list[tuple[str, object]], value) -> None:
        for b in range(0, len(pairs), self.BATCH):
            batch = pairs[b:b + self.BATCH]
            if len(batch) > 1:
                self.out.append(pickle.MARK)
            for k, v in batch:
                self.string(k)
                value(v)
            self.out.append(pickle.SETITEMS if len(batch) > 1 else pickle.SETITEM)


def _module_versions(names: list[str]) -> list[tuple[str, int]]:
    """``state_dict()._metadata``: every module that owns a tensor and its parents,
    with ``_version`` 2 for BatchNorm (owns a running_var) and 1 otherwise."""
    bn = {n.rsplit(".", 1)[0] for n in names if n.endswith(".running_var")}
    seen: dict[str, int] = {"": 1}
    for name in names:
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            seen.setdefault(mod, 2 if mod in bn else 1)
    return list(seen.items())


def state_dict_pickle(entries: list[tuple[str, str, tuple[int, ...], str]]) -> bytes:
    """What ``torch.save(model.state_dict())`` puts in ``data.pkl``.

    ``entries``: (name, storage key, shape, storage class), one storage per tensor.
    """
    p = _Pickle()
    p.empty_ordered_dict()
    p.items([(name, (key, shape, storage)) for name, key, shape, storage in entries],
            lambda v: p.tensor(*v))
    p.out.append(pickle.EMPTY_DICT)
    p.put()

    def version(v: object) -> None:
        p.out.append(pickle.EMPTY_DICT)
        p.put()
        p.string("version", shared=True)
        p.integer(int(v))  # type: ignore[call-overload]
        p.out.append(pickle.SETITEM)

    p.string("_metadata")
    p.empty_ordered_dict()
    p.items(_module_versions([e[0] for e in entries]), version)
    p.out += [pickle.SETITEM, pickle.BUILD, pickle.STOP]
    return b"".join(p.out)


def _aligned_info(fh, name: str, size: int) -> zipfile.ZipInfo:
    """A stored ZipInfo whose data starts on a 64-byte boundary (torch's ``FB`` padding)."""
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.file_size = size
    header = 30 + len(name.encode())
    pad = -(fh.tell() + header + 4) % 64
    zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return zi


def write_pt(path: str, model: Model, content: Content) -> None:
    """A ``torch.save(state_dict)`` zip: ``archive/data.pkl``, 64-byte aligned stored
    ``archive/data/<key>`` records, ``byteorder``, ``version``; the padding extra field
    only in the local headers, as torch writes it."""
    tensors = _torch_tensors(model)
    entries = [(t.torch_name, str(i), t.torch_shape,
                "LongStorage" if t.kind == "count" else "FloatStorage")
               for i, t in enumerate(tensors)]
    small = [("data.pkl", state_dict_pickle(entries)), (".format_version", b"1"),
             (".storage_alignment", b"64"), ("byteorder", b"little")]
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", allowZip64=True) as zf:
        for name, data in small:
            zf.writestr(_aligned_info(fh, f"archive/{name}", len(data)), data)
        for i, t in enumerate(tensors):
            nbytes = (8 if t.kind == "count" else 4) * t.size
            zi = _aligned_info(fh, f"archive/data/{i}", nbytes)
            with zf.open(zi, "w") as w:
                for chunk in _torch_chunks(content, t):
                    w.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
        for name, data in (("version", b"3\n"), (".data/serialization_id", b"0" * 20)):
            zf.writestr(_aligned_info(fh, f"archive/{name}", len(data)), data)
        for zi in zf.infolist():
            zi.extra = b""  # central directory without the padding, like torch


# -- TF tensor bundle -------------------------------------------------------------

TF_BLOCK_BYTES = 4096      # LevelDB's default block size, which TF's table builder keeps
TF_RESTART_INTERVAL = 16
DT_FLOAT = 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_int(field_no: int, n: int) -> bytes:
    return _varint(field_no << 3) + _varint(n)


def _pb_bytes(field_no: int, raw: bytes) -> bytes:
    return _varint((field_no << 3) | 2) + _varint(len(raw)) + raw


def _bundle_entry(shape: tuple[int, ...], offset: int, size: int) -> bytes:
    """BundleEntryProto: dtype, TensorShapeProto{dim{size}}, shard 0, offset, size.

    proto3 leaves zero fields out; the optional crc32c (field 6) is omitted too.
    """
    dims = b"".join(_pb_bytes(2, _pb_int(1, d)) for d in shape)
    out = _pb_int(1, DT_FLOAT) + _pb_bytes(2, dims)
    if offset:
        out += _pb_int(4, offset)
    return out + _pb_int(5, size)


def _sst_block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """One prefix-compressed LevelDB block: entries, restart offsets, restart count."""
    out = bytearray()
    restarts: list[int] = []
    prev = b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % TF_RESTART_INTERVAL == 0:
            restarts.append(len(out))
        else:
            limit = min(len(prev), len(key))
            while shared < limit and prev[shared] == key[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        prev = key
    if not restarts:
        restarts.append(0)
    out += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def sstable(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A complete uncompressed LevelDB table of sorted (key, value) pairs.

    Each block is followed by a type byte 0 and the masked crc32c of block + type;
    an empty metaindex, an index of (last key -> block handle), the 48-byte footer.
    """
    from bnexporter.formats.sstable import MAGIC, crc32c, mask_crc

    out = bytearray()

    def put(block: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(block))
        trailer = b"\x00"
        out.extend(block + trailer + struct.pack("<I", mask_crc(crc32c(block + trailer))))
        return handle

    index: list[tuple[bytes, bytes]] = []
    pending: list[tuple[bytes, bytes]] = []
    size = 0
    for key, value in entries:
        pending.append((key, value))
        size += len(key) + len(value) + 6
        if size >= TF_BLOCK_BYTES:
            index.append((key, put(_sst_block(pending))))
            pending, size = [], 0
    if pending:
        index.append((pending[-1][0], put(_sst_block(pending))))
    meta = put(_sst_block([]))
    idx = put(_sst_block(index))
    footer = (meta + idx).ljust(40, b"\x00")
    out += footer + struct.pack("<Q", MAGIC)
    return bytes(out)


def tf_data_path(index_path: str) -> str:
    return index_path[: -len(".index")] + ".data-00000-of-00001"


def write_tf(path: str, model: Model, content: Content) -> None:
    """A TF1-style tensor bundle ``<prefix>.index`` + ``<prefix>.data-00000-of-00001``.

    Keys are ``<keras layer>/<var>`` (no object graph, so readers take them as-is),
    values are float32 little-endian in the Keras (C-order) shape, stored back to back
    in key order as TF's BundleWriter does. The shard is streamed and renamed into
    place before the index, so a reader never sees an index without its data.
    """
    tensors = sorted((t for t in model.tensors if t.keras_layer),
                     key=lambda t: f"{t.keras_layer}/{t.keras_var}".encode())
    entries = [(b"", _pb_int(1, 1) + _pb_bytes(3, _pb_int(1, 1)))]
    data = tf_data_path(path)
    off = 0
    with open(data + ".partial", "wb") as fh:
        for t in tensors:
            for chunk in content.chunks(t, _row(t.keras_shape)):
                fh.write(memoryview(np.ascontiguousarray(chunk, dtype="<f4")).cast("B"))
            entries.append((f"{t.keras_layer}/{t.keras_var}".encode(),
                            _bundle_entry(t.keras_shape, off, 4 * t.size)))
            off += 4 * t.size
        if fh.tell() != off:
            raise AssertionError(f"wrote {fh.tell()} bytes, index says {off}")
    os.replace(data + ".partial", data)
    with open(path + ".partial", "wb") as fh:
        fh.write(sstable(entries))
    os.replace(path + ".partial", path)


def files(fmt: str, path: str) -> list[str]:
    """Every file that makes up the checkpoint at ``path``."""
    return [path, tf_data_path(path)] if fmt == "tf" else [path]


# -- npz and .keras ---------------------------------------------------------------

def write_npz(path: str, model: Model, content: Content) -> None:
    """``np.savez`` of the torch state_dict (stored members ``<name>.npy``), streamed."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for t in _torch_tensors(model):
            descr = "<i8" if t.kind == "count" else "<f4"
            with zf.open(t.torch_name + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_1_0(
                    fh, {"descr": descr, "fortran_order": False, "shape": t.torch_shape})
                for chunk in _torch_chunks(content, t):
                    fh.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))


def write_keras(path: str, model: Model, content: Content) -> None:
    """A ``.keras`` zip: ``config.json`` (the model config), ``metadata.json`` and the
    weights file stored uncompressed as ``model.weights.h5`` (as Keras saves it). The
    weights use the Keras 2 layout of :func:`write_h5`, which the reader accepts inside
    the archive too; the bytes read in a full scan are the same."""
    import zipfile

    inner = path + ".weights.h5"
    write_h5(inner, model, content)
    try:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
            zf.writestr("config.json", json.dumps(keras_model_config(model)))
            zf.write(inner, "model.weights.h5")
    finally:
        os.unlink(inner)


WRITERS = {"h5": write_h5, "safetensors": write_safetensors, "pt": write_pt, "tf": write_tf,
           "npz": write_npz, "keras": write_keras}
SUFFIX = {"h5": ".h5", "safetensors": ".safetensors", "pt": ".pt", "tf": ".index",
          "npz": ".npz", "keras": ".keras"}


def write(fmt: str, path: str, target_bytes: int, seed: int = 0) -> Model:
    model = build_model(target_bytes)
    if fmt == "tf":  # two files, each moved into place by the writer itself
        write_tf(path, model, Content(seed))
        return model
    tmp = path + ".partial"
    WRITERS[fmt](tmp, model, Content(seed))
    os.replace(tmp, path)
    return model
