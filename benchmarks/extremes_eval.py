"""False alarms and detection rate of the role-aware tensor anomaly rule (issue 12).

    python benchmarks/extremes_eval.py [--out /tmp/extremes-eval] [--fw /work/venv-fw/bin/python]

1. Healthy checkpoints: the committed uninjected fixtures, ``tests/fixtures/topology/`` and
   ``/work/topo-heldout/`` when present, and models generated here with the real frameworks
   (random init and briefly trained: Keras applications MobileNetV2 / ResNet50 / ConvNeXtTiny /
   EfficientNetB0, hand-built torch ResNet / MobileNetV2 / Transformer, fp32 / fp16 / bf16).
   Prints the anomalous tensors of each (a false alarm is any anomalous tensor).
2. Injected anomalies: every kind injected into a trained torch and Keras model, saved in every
   writable format (torch .pt fp32 / fp16, safetensors fp32 / bf16, npz, Keras .keras,
   .weights.h5, legacy .h5, TF checkpoint). A kind is detected in a file when the report has an
   anomalous tensor of an expected kind (or, for ``never_updated``, a never-updated layer).

The generation step runs under the framework venv (``--fw``); the scan under this one. Generated
files are cached in ``--out`` (delete it to regenerate).
"""

# ruff: noqa: E501  (the framework-side generator below is one embedded script)
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# kind injected -> anomaly kinds that count as detecting it
EXPECT = {
    "nan": {"nonfinite"}, "inf": {"nonfinite"},
    "collapsed_gamma": {"deep_tiny"},            # gamma 1e-30, beta -1.3 (seed pattern 1)
    "dead_input": {"dead_input_stats"},          # mean = var = 1e-37 (seed pattern 2)
    "exploding": {"huge", "nonfinite"},          # one kernel value 1e30 (Inf in fp16)
    "zeroed_tensor": {"zeroed"}, "zeroed_filter": {"zero_filter"},
    "subnormal_flood": {"deep_tiny", "tiny_excess"},  # 30% of a kernel subnormal
    "tiny_flood": {"tiny_excess", "deep_tiny"},  # 30% of a kernel scaled to ~1e-8
    "constant_tensor": {"constant"},             # a kernel all one value
    "never_updated": set(),                      # a BN layer reset to its init values
}
# in a 16-bit file the seed's 1e-30 / 1e-37 cannot be stored: they round to 0, which the
# channel classes report (collapsed_gamma / dead_input); counted as found there
CHANNEL_FALLBACK = {"collapsed_gamma": "collapsed_gamma", "dead_input": "dead_input"}


# --------------------------------------------------------------------------- generation
GEN = r'''
import os, sys, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
out = sys.argv[1]
os.makedirs(out + "/healthy", exist_ok=True); os.makedirs(out + "/injected", exist_ok=True)
rng = np.random.default_rng(0)
KINDS = ["nan", "inf", "collapsed_gamma", "dead_input", "exploding", "zeroed_tensor",
         "zeroed_filter", "subnormal_flood", "tiny_flood", "constant_tensor", "never_updated"]

def inject(arrays, kind, bn, kernel, filt_axis, sixteen=False):
    """arrays: name -> np array (copied). bn: (gamma, beta, mean, var) names."""
    a = {k: v.copy() for k, v in arrays.items()}
    g, b, m, v = bn
    w = a[kernel]
    if kind == "nan": w.flat[3] = np.nan
    elif kind == "inf": w.flat[5] = np.inf
    elif kind == "collapsed_gamma": a[g][1] = 1e-30; a[b][1] = -1.3
    elif kind == "dead_input": a[m][2] = 1e-37; a[v][2] = 1e-37
    elif kind == "exploding": w.flat[7] = 1e30
    elif kind == "zeroed_tensor": w[...] = 0
    elif kind == "zeroed_filter":
        idx = [slice(None)] * w.ndim; idx[filt_axis] = 1; w[tuple(idx)] = 0
    elif kind == "subnormal_flood":
        sel = rng.random(w.shape) < 0.3; w[sel] = np.sign(w[sel]) * (1e-6 if sixteen else 1e-40)
    elif kind == "tiny_flood":
        sel = rng.random(w.shape) < 0.3; w[sel] = w[sel] * (1e-4 if sixteen else 1e-7)
    elif kind == "constant_tensor": w[...] = 0.01
    elif kind == "never_updated":
        a[g][...] = 1; a[b][...] = 0; a[m][...] = 0; a[v][...] = 1
    return a

def torch_part():
    import torch, torch.nn as nn
    from safetensors.torch import save_file
    torch.manual_seed(0); torch.set_num_threads(1)
    class Block(nn.Module):
        def __init__(s, cin, cout, stride):
            super().__init__()
            s.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); s.bn1 = nn.BatchNorm2d(cout)
            s.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); s.bn2 = nn.BatchNorm2d(cout)
            s.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        def forward(s, x):
            y = torch.relu(s.bn1(s.conv1(x))); y = s.bn2(s.conv2(y))
            return torch.relu(y + (x if s.down is None else s.down(x)))
    class ResNet(nn.Module):
        def __init__(s, w=32):
            super().__init__()
            s.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False); s.bn1 = nn.BatchNorm2d(w)
            s.layer1 = nn.Sequential(Block(w, w, 1), Block(w, w, 1))
            s.layer2 = nn.Sequential(Block(w, 2 * w, 2), Block(2 * w, 2 * w, 1))
            s.layer3 = nn.Sequential(Block(2 * w, 4 * w, 2), Block(4 * w, 4 * w, 1))
            s.fc = nn.Linear(4 * w, 10)
        def forward(s, x):
            x = torch.relu(s.bn1(s.conv1(x)))
            x = s.layer3(s.layer2(s.layer1(x)))
            return s.fc(x.mean((2, 3)))
    class IR(nn.Module):
        def __init__(s, cin, cout, e):
            super().__init__(); h = cin * e
            s.conv = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                   nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                   nn.ReLU6(), nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
        def forward(s, x): return s.conv(x)
    class MNV2(nn.Module):
        def __init__(s):
            super().__init__()
            s.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                       nn.ReLU6(), IR(16, 24, 6), IR(24, 32, 6), IR(32, 64, 6))
            s.classifier = nn.Linear(64, 10)
        def forward(s, x): return s.classifier(s.features(x).mean((2, 3)))
    class TinyTransformer(nn.Module):
        def __init__(s):
            super().__init__()
            s.embed = nn.Embedding(1000, 64, padding_idx=0)
            s.pos = nn.Parameter(torch.zeros(1, 32, 64))
            layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
            s.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            s.norm = nn.LayerNorm(64); s.head = nn.Linear(64, 10)
        def forward(s, x): return s.head(s.norm(s.encoder(s.embed(x) + s.pos)).mean(1))
    def train(model, steps, opt, data):
        model.train()
        for _ in range(steps):
            x, y = data()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
        return model
    img = lambda: (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    tok = lambda: (torch.randint(1, 1000, (16, 32)), torch.randint(0, 10, (16,)))
    runs = {}
    for name, mk, data in (("resnet", ResNet, img), ("mnv2", MNV2, img), ("transformer", TinyTransformer, tok)):
        runs[name + "_init"] = mk()
        m = mk(); runs[name + "_sgd60"] = train(m, 60, torch.optim.SGD(m.parameters(), 0.05, momentum=0.9, weight_decay=5e-4), data)
        m = mk(); runs[name + "_adamwd60"] = train(m, 60, torch.optim.Adam(m.parameters(), 3e-3, weight_decay=5e-4), data)
    for name, m in runs.items():
        sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
        torch.save(sd, f"{out}/healthy/torch_{name}.pt")
        torch.save({"state_dict": sd, "global_step": 0 if name.endswith("_init") else 60}, f"{out}/healthy/torch_{name}_wrapped.pt")
        torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, f"{out}/healthy/torch_{name}_fp16.pt")
        save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, f"{out}/healthy/torch_{name}_bf16.safetensors")
        np.savez(f"{out}/healthy/torch_{name}.npz", **{k: v.numpy() for k, v in sd.items()})
    base = {k: v.numpy() for k, v in runs["resnet_sgd60"].state_dict().items()}
    bn = ("layer2.0.bn1.weight", "layer2.0.bn1.bias", "layer2.0.bn1.running_mean", "layer2.0.bn1.running_var")
    for kind in KINDS:
        for fmt in ("pt", "pt16", "safetensors", "st_bf16", "npz"):
            six = fmt in ("pt16", "st_bf16")
            a = inject(base, kind, bn, "layer2.0.conv2.weight", 0, sixteen=six)
            t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}
            p = f"{out}/injected/torch_{kind}"
            if fmt == "pt": torch.save({"model": t, "step": 60}, p + ".pt")
            elif fmt == "pt16": torch.save({"model": {k: (v.half() if v.is_floating_point() else v) for k, v in t.items()}, "step": 60}, p + "_fp16.pt")
            elif fmt == "safetensors": save_file(t, p + ".safetensors")
            elif fmt == "st_bf16": save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in t.items()}, p + "_bf16.safetensors")
            else: np.savez(p + ".npz", **a)

def keras_part():
    import keras, tensorflow as tf
    keras.utils.set_random_seed(0)
    apps = keras.applications
    x = np.random.default_rng(1).normal(size=(16, 96, 96, 3)).astype("float32")
    y = np.random.default_rng(2).integers(0, 10, 16)
    def mnv2(): return apps.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10)
    m = mnv2(); m.save(f"{out}/healthy/keras_mnv2_init.keras"); m.save_weights(f"{out}/healthy/keras_mnv2_init.weights.h5")
    m.compile("adam", "sparse_categorical_crossentropy"); m.fit(x, y, epochs=20, batch_size=8, verbose=0)
    m.save(f"{out}/healthy/keras_mnv2_trained.keras"); m.save(f"{out}/healthy/keras_mnv2_trained.h5")
    m.save_weights(f"{out}/healthy/keras_mnv2_trained.weights.h5")
    tf.train.Checkpoint(model=m).write(f"{out}/healthy/keras_mnv2_trained_tfckpt/ckpt-40")
    for name, mk in (("resnet50", lambda: apps.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)),
                     ("convnext_tiny", lambda: apps.ConvNeXtTiny(weights=None, input_shape=(64, 64, 3), classes=10)),
                     ("efficientnetb0", lambda: apps.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=10))):
        mk().save_weights(f"{out}/healthy/keras_{name}_init.weights.h5")
    names = [v.path for v in m.weights]
    vals = [v.numpy() for v in m.weights]
    base = dict(zip(names, vals))
    bnl = "block_3_expand_BN"
    bn = tuple(next(n for n in names if n.startswith(bnl + "/") and n.endswith(s))
               for s in ("gamma", "beta", "moving_mean", "moving_variance"))
    kern = next(n for n in names if n.startswith("block_3_expand/") and n.endswith("kernel"))
    for kind in KINDS:
        a = inject(base, kind, bn, kern, -1)
        m.set_weights([a[n] for n in names])
        p = f"{out}/injected/keras_{kind}"
        m.save(p + ".keras"); m.save(p + ".h5"); m.save_weights(p + ".weights.h5")
        tf.train.Checkpoint(model=m).write(f"{p}_tfckpt/ckpt-40")
    m.set_weights(vals)

if "torch" in sys.argv[2:]: torch_part()
if "keras" in sys.argv[2:]: keras_part()
'''


def generate(out: str, fw: str) -> None:
    for part in ("torch", "keras"):
        marker = os.path.join(out, f".{part}.done")
        if os.path.exists(marker):
            continue
        script = os.path.join(out, "gen.py")
        os.makedirs(out, exist_ok=True)
        with open(script, "w") as f:
            f.write(GEN)
        subprocess.run([fw, script, out, part], check=True)
        open(marker, "w").close()


# --------------------------------------------------------------------------- measurement
def checkpoints(folder: str) -> list[str]:
    """Checkpoint paths in a folder: files, plus one entry per TF bundle (its .index)."""
    out = []
    for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isdir(p) or p.endswith((".json", ".npz.expected", ".md", ".py", ".done")) \
                or ".expected." in p or os.path.basename(p) == "checkpoint":
            continue
        if ".data-" in p:
            continue
        out.append(p)
    return out


def healthy_fixtures() -> list[str]:
    fx = os.path.join(ROOT, "tests", "fixtures")
    paths = [p for p in checkpoints(os.path.join(fx, "keras")) if "_inj" not in p]
    # tf fixtures: tf1_slim and k3_manager are healthy; the others carry a deliberate dead BN
    paths += checkpoints(os.path.join(fx, "tf", "k3_manager"))
    paths += checkpoints(os.path.join(fx, "tf", "tf1_slim"))
    for extra in (os.path.join(fx, "topology"), "/work/topo-heldout"):
        if os.path.isdir(extra):
            paths += checkpoints(extra)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/extremes-eval")
    ap.add_argument("--fw", default="/work/venv-fw/bin/python")
    ap.add_argument("--no-generate", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from bnexporter.scan import analyse_path

    if not args.no_generate:
        generate(args.out, args.fw)
    healthy = healthy_fixtures() + checkpoints(os.path.join(args.out, "healthy"))
    print("== healthy checkpoints: anomalous tensors (false alarms)")
    models = alarms = tensors = raw = 0
    for p in healthy:
        r = analyse_path(p)
        if r.error:
            print(f"  skip {os.path.relpath(p)}: {r.error_reason}")
            continue
        s = r.summary
        models += 1
        tensors += s.tensors
        raw += s.extreme_tensors
        alarms += s.anomalous_tensors + s.never_updated_layers
        print(f"  {os.path.relpath(p, ROOT) if p.startswith(ROOT) else p}: {s.anomalous_tensors} "
              f"anomalous / {s.tensors} tensors (seed rule: {s.extreme_tensors}), "
              f"never-updated BN {s.never_updated_layers}")
        for t in r.tensors:
            if t.anomaly:
                print(f"      {t.name} [{t.role}] {t.anomaly}: {t.anomaly_detail}")
    print(f"  total: {alarms} false alarms in {models} models, {tensors} tensors "
          f"(seed rule: {raw} tensors flagged)")

    print("== injected anomalies: detected per kind and format")
    found: dict[str, list[tuple[str, bool, bool]]] = defaultdict(list)
    for p in checkpoints(os.path.join(args.out, "injected")):
        base = os.path.basename(os.path.dirname(p) if p.endswith(".index") else p)
        framework, rest = base.split("_", 1)
        kind = next(k for k in sorted(EXPECT, key=len, reverse=True) if rest.startswith(k))
        fmt = framework + ":" + (rest[len(kind):].lstrip("_") or os.path.splitext(p)[1].lstrip("."))
        if p.endswith(".index"):
            fmt = framework + ":tfckpt"
        elif p.endswith(".h5") and not p.endswith(".weights.h5"):
            fmt = framework + ":h5"
        elif p.endswith(".weights.h5"):
            fmt = framework + ":weights.h5"
        r = analyse_path(p)
        if r.error:
            found[kind].append((fmt, False, False))
            continue
        kinds = {t.anomaly for t in r.tensors if t.anomaly}
        ok = bool(kinds & EXPECT[kind]) if EXPECT[kind] else r.summary.never_updated_layers > 0
        via_channel = False
        if not ok and kind in CHANNEL_FALLBACK:
            via_channel = r.summary.counts.get(CHANNEL_FALLBACK[kind], 0) > 0
        if kind in ("nan", "inf"):
            ok = ok and r.summary.nonfinite > 0
        found[kind].append((fmt, ok, via_channel))
    total = hits = 0
    for kind in EXPECT:
        rows = found.get(kind, [])
        n_ok = sum(1 for _, ok, ch in rows if ok or ch)
        total += len(rows)
        hits += n_ok
        detail = ", ".join(f"{fmt}{'' if ok else (' (channel class)' if ch else ' MISSED')}"
                           for fmt, ok, ch in sorted(rows))
        print(f"  {kind}: {n_ok}/{len(rows)}  [{detail}]")
    print(f"  total: {hits}/{total} injected files detected")
    print(json.dumps({"healthy_models": models, "false_alarms": alarms,
                      "injected_files": total, "detected": hits}))
    return 0 if alarms == 0 and hits == total else 1


if __name__ == "__main__":
    sys.exit(main())
