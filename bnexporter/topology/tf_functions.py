"""TF2 SavedModel graphs from the function library of ``saved_model.pb``.

A TF2 SavedModel (Keras 3 ``model.export``, ``tf.saved_model.save``, tf_keras without a
usable ``keras_metadata.pb``) keeps its forward pass as FunctionDefs, not as a GraphDef:
variables enter as resource arguments, layers as nested ``StatefulPartitionedCall``s.
This module inlines one concrete function into a flat node list that
:func:`tf_graph.graph_from_graph_def` translates, and names its variables as the TF
bundle reader names the ``variables/`` tensors. The function's captured inputs are
SavedObjectGraph nodes (``bound_inputs``); a node's path from the root is its checkpoint
key. ``tf.nn.batch_normalization``'s unfused arithmetic (Keras 3 writes it) is folded back
into one BN node. Pure wire decoding: nothing in the file is run.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

from bnexporter.errors import CheckpointError
from bnexporter.formats import protowire as pw
from bnexporter.topology.tf_bnfold import fuse_batchnorms
from bnexporter.topology.tf_nodes import TFNode, output_index, parse_node_def

MAX_META = 512 << 20     # bytes of saved_model.pb / a .meta
MAX_NODES = 1 << 20        # inlined nodes per translation
MAX_DEPTH = 48             # nested calls
MAX_CALLS = 1 << 15        # calls inlined per translation (the Keras 3 export fixture: 2)
# nodes + inputs walked per translation, every inlined copy counted: a call node's inputs
# are walked and a body's nodes copied each time it is inlined, so 32k calls of a body
# with one 200k-input node were 6.5 G steps (the Keras 3 export fixture: 232)
MAX_WORK = 1 << 22
MAX_KEY = 4096             # characters of one object path (checkpoint key)
MAX_KEYS = 1 << 24         # characters of all of them: a 300 KB chain of 20k objects made
                           # paths of 772 MB
_CALLS = {"StatefulPartitionedCall", "PartitionedCall"}
_DT_RESOURCE = 20
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


@dataclass
class Function:
    name: str
    inputs: list[tuple[str, int]]      # (argument, dtype)
    outputs: list[str]
    ret: dict[str, str]
    raw_nodes: list[bytes]
    where: str
    _nodes: list[TFNode] | None = field(default=None, repr=False)
    _work: int = field(default=0, repr=False)

    def nodes(self) -> list[TFNode]:
        if self._nodes is None:
            self._nodes = [parse_node_def(pw.parse(r, self.where), self.where)
                           for r in self.raw_nodes]
            self._work = len(self._nodes) + sum(len(n.inputs) for n in self._nodes)
        return self._nodes

    def work(self) -> int:
        """Nodes plus inputs of the body: what inlining it once walks."""
        self.nodes()
        return self._work


@dataclass
class SavedModel:
    functions: dict[str, Function]
    objects: list[tuple[list[tuple[int, str]], tuple[str, tuple[int, ...]] | None]]
    bound: dict[str, list[int]]        # concrete function -> captured object ids
    graph_nodes: list[TFNode]          # the top-level GraphDef (a TF1 SavedModel's graph)
    has_objects: bool


def _ints(values: list, where: str) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, int):
            out.append(v)
        else:
            pos = 0
            while pos < len(v):
                n, pos = pw.read_varint(v, pos, where)
                out.append(n)
    return out


def _function(raw: bytes, where: str) -> Function:
    f = pw.parse(raw, where)
    sig = pw.parse(pw.get_bytes(f, 1, where) or b"", where)
    ins = [(pw.get_str(a, 1, where), pw.get_int(a, 3, where=where))
           for a in pw.get_messages(sig, 2, where)]
    outs = [pw.get_str(a, 1, where) for a in pw.get_messages(sig, 3, where)]
    ret = {pw.get_str(e, 1, where): pw.get_str(e, 2, where) for e in pw.get_messages(f, 4, where)}
    raw_nodes = [v for v in f.get(3, []) if isinstance(v, bytes)]
    return Function(pw.get_str(sig, 1, where), ins, outs, ret, raw_nodes, where)


def _variable(raw: bytes, where: str) -> tuple[str, tuple[int, ...]]:
    v = pw.parse(raw, where)
    shape_raw = pw.get_bytes(v, 2, where)
    dims: tuple[int, ...] = ()
    if shape_raw:
        dims = tuple(pw.get_int(d, 1, where=where, signed=True)
                     for d in pw.get_messages(pw.parse(shape_raw, where), 2, where))
    return pw.get_str(v, 6, where), dims


def parse_saved_model(raw: bytes, where: str) -> SavedModel | None:
    """The function library, object graph and bound inputs of the ``serve`` meta graph."""
    metas = pw.get_messages(pw.parse(raw, where), 2, where)
    if not metas:
        return None
    meta = metas[0]
    for m in metas:
        info = pw.parse(pw.get_bytes(m, 1, where) or b"", where)
        if b"serve" in info.get(4, []):
            meta = m
            break
    gd = pw.parse(pw.get_bytes(meta, 2, where) or b"", where)
    graph_nodes = [parse_node_def(nd, where) for nd in pw.get_messages(gd, 1, where)]
    lib = pw.parse(pw.get_bytes(gd, 2, where) or b"", where)
    functions = {}
    for raw_fn in lib.get(1, []):
        if not isinstance(raw_fn, bytes):
            raise CheckpointError(where, "FunctionDef is not a message")
        fn = _function(raw_fn, where)
        functions[fn.name] = fn
    og_raw = pw.get_bytes(meta, 7, where)
    og = pw.parse(og_raw or b"", where)
    objects = []
    for obj in pw.get_messages(og, 1, where):
        children = [(pw.get_int(c, 1, where=where), pw.get_str(c, 2, where))
                    for c in pw.get_messages(obj, 1, where)]
        var = pw.get_bytes(obj, 7, where)
        objects.append((children, _variable(var, where) if var is not None else None))
    if any(c >= len(objects) for children, _ in objects for c, _ in children):
        raise CheckpointError(where, "SavedObjectGraph references a node that does not exist")
    bound = {}
    for entry in pw.get_messages(og, 2, where):
        cf = pw.parse(pw.get_bytes(entry, 2, where) or b"", where)
        ids = _ints(cf.get(2, []), where)
        if any(i >= len(objects) for i in ids):
            raise CheckpointError(where, "a concrete function captures a missing object")
        bound[pw.get_str(entry, 1, where)] = ids
    return SavedModel(functions, objects, bound, graph_nodes, og_raw is not None)


def _escape(name: str) -> str:
    return name.replace(".", "..").replace("/", ".S")


def checkpoint_keys(sm: SavedModel) -> dict[int, str]:
    """Variable object id -> its bundle key: the breadth-first path from the root, as the
    checkpoint saver names it (``variables/3/.ATTRIBUTES/VARIABLE_VALUE``)."""
    if not sm.objects:
        return {}
    paths: dict[int, str] = {0: ""}
    queue = deque([0])
    total = 0
    while queue:
        nid = queue.popleft()
        for child, edge in sm.objects[nid][0]:
            if child not in paths and 0 <= child < len(sm.objects):  # a broken id: no path
                path = f"{paths[nid]}/{_escape(edge)}" if paths[nid] else _escape(edge)
                total += len(path)
                if len(path) > MAX_KEY or total > MAX_KEYS:
                    continue  # no real key is this long: the object stays unnamed
                paths[child] = path
                queue.append(child)
    return {nid: paths[nid] + _VALUE_SUFFIX for nid, (_, var) in enumerate(sm.objects)
            if var is not None and nid in paths}


# -- inlining -----------------------------------------------------------------------------

class _Inliner:
    def __init__(self, functions: dict[str, Function], where: str):
        self.functions = functions
        self.where = where
        self.out: list[TFNode] = []
        self.calls = 0
        self.work = 0

    def callee(self, n: TFNode) -> str | None:
        if n.op in _CALLS:
            f = n.attrs.get("f")
            return f[1] if isinstance(f, tuple) and f[0] == "func" and \
                f[1] in self.functions else None
        return n.op if n.op in self.functions else None

    def inline(self, name: str, prefix: str, args: dict[str, str], depth: int) -> list[str]:
        """Append ``name``'s nodes (renamed under ``prefix``); returns its output refs."""
        if depth > MAX_DEPTH:
            raise CheckpointError(self.where, f"function calls nest deeper than {MAX_DEPTH}",
                                  "too_large")
        self.calls += 1
        if self.calls > MAX_CALLS:
            raise CheckpointError(self.where, f"more than {MAX_CALLS} function calls inlined",
                                  "too_large")
        fn = self.functions[name]
        nodes = fn.nodes()
        self.work += fn.work()
        if self.work > MAX_WORK:
            raise CheckpointError(self.where, f"inlining walks more than {MAX_WORK} nodes and "
                                  "inputs", "too_large")
        local = {n.name: n for n in nodes}
        called: dict[str, list[str]] = {}

        def ref(inp: str) -> str:
            parts = inp.split(":")
            if len(parts) == 1:
                if inp in args:
                    return args[inp]
                return prefix + inp if inp in local else ""
            base, idx = parts[0], output_index(parts[-1])
            if base in called:
                return called[base][idx] if idx < len(called[base]) else ""
            n = local.get(base)
            if n is None:
                return ""
            if len(parts) == 3 and n.op.startswith("FusedBatchNorm") and parts[1] != "y":
                idx += 1  # batch_mean, batch_variance, ...: never the normalised output
            return prefix + base + (f":{idx}" if idx else "")

        for n in _local_order(local):
            callee = self.callee(n)
            if callee is not None:
                inner = self.functions[callee]
                called[n.name] = self.inline(
                    callee, f"{prefix}{n.name}/",
                    {a: ref(i) for (a, _), i in zip(inner.inputs, n.inputs)}, depth + 1)
                continue
            self.out.append(TFNode(prefix + n.name, n.op, [ref(i) for i in n.inputs], n.attrs))
            if len(self.out) > MAX_NODES:
                raise CheckpointError(self.where, f"inlined graph exceeds {MAX_NODES} nodes",
                                      "too_large")
        return [ref(fn.ret.get(o, "")) for o in fn.outputs]


def _local_order(local: dict[str, TFNode]) -> list[TFNode]:
    """Kahn's order inside one function body (call results must exist before use). One
    node per name (the last, as ``local``): n copies of a name used by m nodes were n * m
    steps."""
    nodes = list(local.values())
    indeg = {n.name: 0 for n in nodes}
    users: dict[str, list[str]] = {}
    for n in nodes:
        for i in n.inputs:
            b = i.split(":")[0]
            if b in local and b != n.name:
                indeg[n.name] += 1
                users.setdefault(b, []).append(n.name)
    ready = deque(n.name for n in nodes if indeg[n.name] == 0)
    out: list[TFNode] = []
    while ready:
        name = ready.popleft()
        out.append(local[name])
        for u in users.get(name, []):
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    seen = {n.name for n in out}
    return out + [n for n in nodes if n.name not in seen]


def _bn_score(functions: dict[str, Function], name: str, memo: dict[str, tuple[int, int]],
              depth: int = 0) -> tuple[int, int]:
    """(inference BNs, training BNs) in ``name`` with its callees, for picking the function."""
    if name in memo:
        return memo[name]
    memo[name] = (0, 0)  # a recursive call counts nothing
    if depth > MAX_DEPTH:
        return (0, 0)
    infer = train = 0
    for n in functions[name].nodes():
        if n.op.startswith("FusedBatchNorm"):
            if n.attrs.get("is_training"):
                train += 1
            else:
                infer += 1
        elif n.op == "Rsqrt":
            infer += 1
        f = n.attrs.get("f") if n.op in _CALLS else None
        callee = f[1] if isinstance(f, tuple) and f[0] == "func" else n.op
        if callee in functions:
            a, b = _bn_score(functions, callee, memo, depth + 1)
            infer, train = infer + a, train + b
    memo[name] = (infer, train)
    return memo[name]


# -- the SavedModel's graph ----------------------------------------------------------------

def flatten(sm: SavedModel, name: str, names: dict[int, str], where: str
            ) -> list[TFNode]:
    """Concrete function ``name`` inlined, BNs folded: data arguments become
    ``Placeholder``s, captured variables with a name in ``names`` (object id -> tensor)
    ``VarHandleOp``s called :func:`var_node` of their object id; other captures are
    left unconnected."""
    fn = sm.functions[name]
    bound = sm.bound.get(name, [])
    first_bound = len(fn.inputs) - len(bound)
    inl = _Inliner(sm.functions, where)
    args: dict[str, str] = {}
    for pos, (arg, dtype) in enumerate(fn.inputs):
        if pos >= first_bound:
            oid = bound[pos - first_bound]
            args[arg] = var_node(oid) if oid in names else ""
            if args[arg]:
                inl.out.append(TFNode(args[arg], "VarHandleOp", []))
        elif dtype != _DT_RESOURCE:
            inl.out.append(TFNode(arg, "Placeholder", []))
            args[arg] = arg
    inl.inline(name, "", args, 0)
    return fuse_batchnorms(inl.out)


def var_node(oid: int) -> str:
    """TF node names never start with ``_``: no clash with a real node."""
    return f"__var__/{oid}"


def candidates(sm: SavedModel) -> list[str]:
    """Concrete functions worth translating, best first: most inference BNs (with their
    callees), fewest training-mode ones, then the smallest body."""
    memo: dict[str, tuple[int, int]] = {}
    scored = []
    for name in sorted(sm.bound):
        if name in sm.functions:
            infer, train = _bn_score(sm.functions, name, memo)
            if infer:
                scored.append((-infer, train, len(sm.functions[name].raw_nodes), name))
    return [name for *_, name in sorted(scored)]


def read_saved_model(folder: str) -> SavedModel | None:
    path = os.path.join(folder, "saved_model.pb")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_META + 1)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror}", "io") from None
    if len(raw) > MAX_META:
        raise CheckpointError(path, f"saved_model.pb exceeds {MAX_META} bytes", "too_large")
    return parse_saved_model(raw, path)


def bundle_names(sm: SavedModel, prefix: str) -> dict[int, str]:
    """Variable object id -> the tensor name the TF bundle reader gives its bundle key.
    Where a SavedModel stores a variable twice (Keras 3 ``variables/N`` and
    ``_all_variables/M``), the copy that got the variable's own name is preferred when
    its bytes are the same (equal CRC), so the graph names the tensor a BN layer reads."""
    from bnexporter.formats.tf_bundle import TFBundleReader, load_index

    keys = checkpoint_keys(sm)
    with TFBundleReader(prefix) as reader:
        assert isinstance(reader, TFBundleReader)
        name_of = {k: n for n, k in reader.checkpoint_keys.items()}
        entries = load_index(prefix).entries
        out: dict[int, str] = {}
        for oid, key in keys.items():
            name = name_of.get(key)
            var = sm.objects[oid][1]
            if name is None or var is None:
                continue
            shape = tuple(reader.info(name).shape)
            if len(var[1]) == len(shape) and any(a not in (-1, b) for a, b in zip(var[1], shape)):
                continue  # not this variable
            own = var[0][:-2] if var[0].endswith(":0") else var[0]
            twin = entries.get(reader.checkpoint_keys.get(own, ""))
            mine = entries.get(key)
            if own != name and twin is not None and mine is not None and \
                    twin.crc is not None and (twin.crc, twin.dtype, twin.shape) == \
                    (mine.crc, mine.dtype, mine.shape):
                name = own
            out[oid] = name
    return out
