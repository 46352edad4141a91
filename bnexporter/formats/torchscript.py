"""TorchScript archives (``torch.jit.save`` of a scripted or traced module) as checkpoints.

The zip holds what ``torch.save`` writes (``<root>/data.pkl``, one stored record
``<root>/data/<key>`` per storage) plus the module's sources under ``code/``. So
the storages are read exactly as :mod:`.torch_zip` reads them (lazily, in
place); only the object graph differs: ``data.pkl`` pickles ``__torch__.*``
module objects, unpickled by :mod:`.torch_pickle` in its TorchScript mode (they
stay inert :class:`~.torch_pickle.Opaque` records) and named by
:mod:`.torchscript_layout` from the class declarations in ``code/``.
"""

from __future__ import annotations

from bnexporter.formats import torchscript_layout, zipmember
from bnexporter.formats.spec import Format, Probe
from bnexporter.formats.torch_pickle import Refused
from bnexporter.formats.torch_zip import TORCH_PATTERNS, TorchZipReader, looks_like_members

# the class sources are read whole: bound what a hostile archive can make us inflate
MAX_CODE_FILE = 16 << 20
MAX_CODE_TOTAL = 64 << 20
MAX_CODE_FILES = 100_000


class TorchScriptReader(TorchZipReader):
    format = "torchscript"
    kind = "torchscript"

    def _setup(self, root: object) -> None:
        try:
            layout = torchscript_layout.interpret(root, self._classes())
        except Refused as exc:
            raise self.error(exc.cause, exc.reason) from None
        self._setup_layout(layout)

    def _classes(self) -> dict[str, torchscript_layout.ClassDecl]:
        assert self._file is not None
        classes: dict[str, torchscript_layout.ClassDecl] = {}
        total = count = 0
        for name, entry in self._entries.items():
            module = torchscript_layout.code_module(name, self._root)
            if module is None:
                continue
            count += 1
            total += entry.file_size
            if count > MAX_CODE_FILES or total > MAX_CODE_TOTAL:
                raise self.error(f"TorchScript code/ holds more than {MAX_CODE_FILES} files "
                                 f"or {MAX_CODE_TOTAL} bytes", "too_large")
            text = zipmember.read_member(self._file, entry, MAX_CODE_FILE)
            torchscript_layout.parse_classes(module, text.decode("utf-8", "replace"),
                                             classes)
        return classes


def _sniff(probe: Probe) -> bool:
    return probe.is_zip and looks_like_members(probe.members()) == "torchscript"


FORMAT = Format("torchscript", zipmember.looks_like, _sniff, TorchScriptReader,
                zipmember.incomplete, (*TORCH_PATTERNS, "*.jit"))
