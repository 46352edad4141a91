"""The peers' BN-only job, one per process: ``python peers.py KIND PATH`` prints one JSON line.

Timed from outside, whole process (interpreter start, imports, load, answer, exit),
against ``bnexporter scan PATH --bn-only``. Each finds the BN layers of a torch
state_dict by their ``running_mean`` keys and counts the dead channels of the plain
estimate (``beta / s < Phi^-1(1e-3)``, s = |gamma| sqrt(var / (var + eps))):

- ``safetensors``: ``safe_open(framework="np")`` + ``get_tensor`` of the four vectors;
- ``torch``: ``torch.load(weights_only=True, mmap=True)`` + the four vectors in torch.

Needs the library (``/work/venv-fw/bin/python`` has both); imports nothing else
but numpy / torch.
"""

from __future__ import annotations

import json
import sys

Z = -3.090232306167813  # Phi^-1(1e-3)


def safetensors_bn(path: str) -> dict[str, int]:
    import numpy as np
    from safetensors import safe_open

    dead = layers = 0
    with safe_open(path, framework="np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if not key.endswith(".running_mean"):
                continue
            p = key[: -len("running_mean")]
            g = f.get_tensor(p + "weight").astype(np.float64)
            b = f.get_tensor(p + "bias").astype(np.float64)
            var = f.get_tensor(p + "running_var").astype(np.float64)
            s = np.abs(g) * np.sqrt(var / (var + 1e-5))
            with np.errstate(divide="ignore", invalid="ignore"):
                dead += int(np.count_nonzero(b / s < Z))
            layers += 1
    return {"bn_layers": layers, "dead": dead}


def torch_bn(path: str) -> dict[str, int]:
    import torch

    torch.set_num_threads(1)
    sd = torch.load(path, weights_only=True, mmap=True)
    dead = layers = 0
    for key in sd:
        if not key.endswith(".running_mean"):
            continue
        p = key[: -len("running_mean")]
        g, b = sd[p + "weight"].double(), sd[p + "bias"].double()
        var = sd[p + "running_var"].double()
        s = g.abs() * torch.sqrt(var / (var + 1e-5))
        dead += int((b / s < Z).sum())
        layers += 1
    return {"bn_layers": layers, "dead": dead}


def main(argv: list[str]) -> None:
    kind, path = argv
    job = {"safetensors": safetensors_bn, "torch": torch_bn}[kind]
    print(json.dumps(job(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
