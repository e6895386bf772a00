"""Benchmark: packed ABC inference (abc_experiments.packed) against float32 PyTorch on the CPU.

Measures (all interleaved: the candidates take turns within every repetition, medians reported):

* layers 64→64 3×3 on 32×32 (pad 1), 64→64 3×3 on 56×56 (pad 1), 32→64 5×5 on 14×14 (pad 2), at
  batch 1 and 32, on 1 and 2 threads: ``F.conv2d`` vs packed ABC (1,1), (3,3), (5,5) on every
  native kernel path this CPU runs (the time includes binarizing and packing the input), and
  where the time of one ABC(1,1) layer goes (call overhead, packing, epilogue, loop); the same
  layers at batch 1 with channels_last inputs (the packed layer then runs channels-last);
* whole models seed_cnn (linear=True, 1×28×28) and resnet20 (3×32×32), converted and calibrated on
  random data: float vs packed ABC(1,1) and (3,3) (``pack_model``, which folds the BatchNorms that
  follow packed convs), each also with its residual additions and ReLUs fused into the packed convs
  (``fuse_batchnorm_relu(chain=False)``, "fused"), and then
  with consecutive packed convs run as one operator call (``fuse_batchnorm_relu()``, the default,
  "chained"), latency at batch 1, throughput at batch 64;
* file sizes: resnet20 ABC(1,1) packed file vs its float weights (default conversion, which keeps
  the first conv and the classifier in float, and with every layer converted);
* with ``../shared/datasets/MNIST/raw`` present: a quick pretrain → convert → calibrate →
  fine-tune of seed_cnn on real MNIST, test accuracy unpacked vs packed.

Prints tables and writes JSON (``--out``, default outputs/bench_inference.json), including the load
average: the machine is shared, so only ratios are meaningful. ``--quick`` for a short run.
Run: ``python scripts/bench_inference.py [--quick] [--isas avx2,portable]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from abc_experiments import packed as P
except ModuleNotFoundError:  # run as a file from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from abc_experiments import packed as P
from abc_experiments.models import build_model
from abc_experiments.nn import ABCConv2d, calibrate, convert

LAYERS = {  # name: (C_in, C_out, kernel, padding, size)
    "64-64 3x3 32x32": (64, 64, 3, 1, 32),
    "64-64 3x3 56x56": (64, 64, 3, 1, 56),
    "32-64 5x5 14x14": (32, 64, 5, 2, 14),
}
PAIRS = ((1, 1), (3, 3), (5, 5))
# Per-layer targets, speed-up over F.conv2d at batch 1 on one thread (binarizing and packing included):
# set for an AVX-512 VPOPCNTDQ CPU, and (issue 18) for AVX2 (AMD EPYC Zen 3: no AVX-512).
TARGETS = {"(1,1)": 8.0, "(3,3)": 1.5, "(5,5)": 0.6}
AVX2_TARGETS = {"(1,1)": 5.0, "(3,3)": 0.75}
# whole models, ABC(1,1): (model, batch, threads) -> speed-up over float. AVX2 (issue 18): the
# fastest form pack_model + fuse_batchnorm_relu give; otherwise (the earlier inference issue):
# resnet20 at batch 1 >= 3x in every form (packed, fused, chained).
AVX2_MODEL_TARGETS = {("resnet20", 1, 1): 5.0, ("resnet20", 64, 2): 3.0, ("seed_cnn", 1, 1): 3.0}
MODEL_TARGETS = {("resnet20", 1, 1): 3.0, ("resnet20", 1, 2): 3.0}
BREAKDOWN_LAYER = "64-64 3x3 32x32"
MNIST_RAW = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "MNIST" / "raw"


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median wall time (ms) of each callable, the callables taking turns in every repetition. A
    value may be a pair (prepare, callable): ``prepare()`` runs untimed just before (choosing the
    kernel path, so that only the layer call is timed)."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name, fn in fns.items():
                if isinstance(fn, tuple):
                    fn[0]()
                    fn = fn[1]
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_layers(isas, batches, threads, repeats) -> list[dict]:
    rows = []
    for lname, (cin, cout, k, pad, size) in LAYERS.items():
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, padding=pad, bias=False)
        packed = {pair: P.PackedABCConv2d.from_abc(ABCConv2d.from_conv(conv, *pair).eval()) for pair in PAIRS}
        for batch in batches:
            x = torch.relu(torch.randn(batch, cin, size, size))
            for t in threads:
                torch.set_num_threads(t)
                fns = {"float": lambda x=x, conv=conv, pad=pad: F.conv2d(x, conv.weight, None, 1, pad)}
                for isa in isas:
                    for pair, layer in packed.items():
                        fns[f"{isa} {pair}"] = (lambda isa=isa: P.set_isa(isa), lambda layer=layer, x=x: layer(x))
                reps = repeats if batch == 1 else max(3, repeats // 4)
                try:
                    medians = interleaved(fns, reps)
                finally:
                    P.set_isa(None)
                for isa in isas:
                    for pair in PAIRS:
                        ms = medians[f"{isa} {pair}"]
                        rows.append({"layer": lname, "batch": batch, "threads": t, "isa": isa,
                                     "M": pair[0], "N": pair[1], "float_ms": medians["float"], "packed_ms": ms,
                                     "speedup": medians["float"] / ms})
                print(f"  {lname:16s} batch {batch:2d} threads {t}: float {medians['float']:8.3f} ms | "
                      + " | ".join(f"{isa} ({p[0]},{p[1]}) ×{medians['float'] / medians[f'{isa} {p}']:.2f}"
                                   for isa in isas for p in PAIRS), flush=True)
    return rows


def bench_channels_last(isa, repeats) -> list[dict]:
    """The layers at batch 1 on one thread with a channels_last input (the packed layer then runs
    channels-last, as a chain does: its stores and packing need no transposes), against F.conv2d on
    the NCHW and on the channels_last input."""
    rows = []
    torch.set_num_threads(1)
    for lname, (cin, cout, k, pad, size) in LAYERS.items():
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, padding=pad, bias=False)
        pairs = ((1, 1), (3, 3))
        packed = {pair: P.PackedABCConv2d.from_abc(ABCConv2d.from_conv(conv, *pair).eval()) for pair in pairs}
        x = torch.relu(torch.randn(1, cin, size, size))
        xc = x.contiguous(memory_format=torch.channels_last)
        fns = {"float": lambda: F.conv2d(x, conv.weight, None, 1, pad),
               "float channels_last": lambda: F.conv2d(xc, conv.weight, None, 1, pad)}
        for pair, layer in packed.items():
            fns[f"{pair} NCHW"] = lambda layer=layer: layer(x)
            fns[f"{pair} channels_last"] = lambda layer=layer: layer(xc)
        with P.use_isa(isa):
            m = interleaved(fns, repeats)
        for pair in pairs:
            rows.append({"layer": lname, "isa": isa, "M": pair[0], "N": pair[1], "float_ms": m["float"],
                         "float_channels_last_ms": m["float channels_last"], "packed_ms": m[f"{pair} NCHW"],
                         "packed_channels_last_ms": m[f"{pair} channels_last"],
                         "speedup": m["float"] / m[f"{pair} channels_last"],
                         "speedup_same_format": m["float channels_last"] / m[f"{pair} channels_last"]})
        fl, flc = m["float"], m["float channels_last"]
        print(f"  {lname:16s}: float {fl:.3f} ms (channels_last {flc:.3f}) | "
              + " | ".join(f"ABC{p[0], p[1]} NCHW ×{fl / m[f'{p} NCHW']:.2f}, channels_last "
                           f"×{fl / m[f'{p} channels_last']:.2f} (×{flc / m[f'{p} channels_last']:.2f} "
                           "against channels_last float)" for p in pairs), flush=True)
    return rows


def layer_breakdown(isa, repeats) -> dict:
    """Where the time of one packed ABC(1,1) layer goes (BREAKDOWN_LAYER, batch 1, one thread),
    from interleaved medians of operator-level calls:

    * call: the layer on a 1x1 input (Python module, operator dispatch, argument checks, output
      allocation; its kernels' work on one position is negligible);
    * pack: the binarize-and-pack operator on the input, less the same operator on a 1x1 input;
    * epilogue: a packed 1->64 1x1 conv on the same 32x32 map (the same tile folds and output
      store for every output value, one popcount word each instead of nine), less its call and
      pack;
    * loop: the rest (the XOR/popcount loop over the receptive field).
    """
    cin, cout, k, pad, size = LAYERS[BREAKDOWN_LAYER]
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, padding=pad, bias=False)
    layer = P.PackedABCConv2d.from_abc(ABCConv2d.from_conv(conv, 1, 1).eval())
    store_only = P.PackedABCConv2d.from_abc(ABCConv2d.from_conv(nn.Conv2d(1, cout, 1, bias=False), 1, 1).eval())
    x, tiny = torch.relu(torch.randn(1, cin, size, size)), torch.relu(torch.randn(1, cin, 1, 1))
    x1, tiny1 = torch.relu(torch.randn(1, 1, size, size)), torch.relu(torch.randn(1, 1, 1, 1))
    P._ext.extension_available()  # loads (builds) the operators before any is looked up
    code = P._ext.ISA_CODES[isa]
    pack = torch.ops.abc_packed.pack_nchw
    torch.set_num_threads(1)
    P.set_isa(isa)
    try:
        m = interleaved({
            "float": lambda: F.conv2d(x, conv.weight, None, 1, pad),
            "layer": lambda: layer(x), "layer 1x1 input": lambda: layer(tiny),
            "pack": lambda: pack(x, layer.shifts, pad, pad, code),
            "pack 1x1": lambda: pack(tiny, layer.shifts, pad, pad, code),
            "1->64 1x1 conv": lambda: store_only(x1), "1->64 1x1 conv, 1x1 input": lambda: store_only(tiny1),
        }, max(repeats, 15) * 3)
    finally:
        P.set_isa(None)
    parts = {"call": m["layer 1x1 input"], "pack": max(m["pack"] - m["pack 1x1"], 0.0),
             "epilogue": max(m["1->64 1x1 conv"] - m["1->64 1x1 conv, 1x1 input"], 0.0)}
    parts["loop"] = max(m["layer"] - sum(parts.values()), 0.0)
    result = {"layer": BREAKDOWN_LAYER, "isa": isa, "float_ms": m["float"], "packed_ms": m["layer"],
              "speedup": m["float"] / m["layer"], "parts_ms": parts, "raw_ms": m}
    print(f"  {BREAKDOWN_LAYER} ABC(1,1) {isa}, batch 1, 1 thread: {m['layer'] * 1e3:.0f} us "
          f"(F.conv2d {m['float'] * 1e3:.0f} us, x{m['float'] / m['layer']:.2f}) = "
          + " + ".join(f"{name} {ms * 1e3:.0f} us ({ms / m['layer']:.0%})" for name, ms in parts.items()), flush=True)
    return result


def converted_model(name, shape, M, N, *, linear, keep=True, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, shape[0], shape[1], 10)
    convert(model, M, N, linear=linear, keep_first=keep, keep_last=keep)
    calibrate(model, [torch.randn(16, *shape)], max_samples=1 << 14, iterations=10)
    return model.eval()


def bench_models(isa, repeats) -> list[dict]:
    rows = []
    specs = {"seed_cnn": ((1, 28, 28), True), "resnet20": ((3, 32, 32), False)}
    for name, (shape, linear) in specs.items():
        torch.manual_seed(0)
        float_model = build_model(name, shape[0], shape[1], 10).eval()
        candidates = {"float": float_model}
        for pair in ((1, 1), (3, 3)):
            candidates[f"ABC{pair}"] = P.pack_model(converted_model(name, shape, *pair, linear=linear))
            # (BatchNorms folded into the packed convs by pack_model) residual addition and ReLU in their store
            candidates[f"ABC{pair} fused"] = P.fuse_batchnorm_relu(candidates[f"ABC{pair}"], chain=False)
            # and consecutive packed convs in one operator call (the default)
            candidates[f"ABC{pair} chained"] = P.fuse_batchnorm_relu(candidates[f"ABC{pair}"])
        with P.use_isa(isa):
            for batch, threads, reps in ((1, 1, repeats), (1, 2, repeats), (64, 2, max(3, repeats // 4))):
                torch.set_num_threads(threads)
                x = torch.randn(batch, *shape)
                medians = interleaved({k: (lambda m=m, x=x: m(x)) for k, m in candidates.items()}, reps)
                for key, ms in medians.items():
                    rows.append({"model": name, "variant": key, "batch": batch, "threads": threads, "isa": isa,
                                 "ms": ms, "images_per_s": batch / ms * 1e3, "speedup": medians["float"] / ms})
                print(f"  {name:9s} batch {batch:2d} threads {threads}: "
                      + " | ".join(f"{k} {ms:7.2f} ms (×{medians['float'] / ms:.2f})" for k, ms in medians.items()),
                      flush=True)
    return rows


def bench_sizes(tmp: Path) -> dict:
    from safetensors.torch import save_file

    arch = {"name": "resnet20", "in_channels": 3, "image_size": 32, "num_classes": 10, "options": {}}
    torch.manual_seed(0)
    float_model = build_model("resnet20", 3, 32, 10)
    float_path = tmp / "resnet20_float.safetensors"
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(float_path))
    result = {"float_file_bytes": float_path.stat().st_size}
    for label, keep in (("default (first conv and fc float)", True), ("every layer converted", False)):
        model = converted_model("resnet20", (3, 32, 32), 1, 1, linear=not keep, keep=keep)
        path = P.save_packed(model, tmp / f"r20_{keep}.safetensors", architecture=arch)
        report = P.packed_size_report(path)
        report["vs_float_file"] = result["float_file_bytes"] / report["file_bytes"]
        result[label] = report
        print(f"  resnet20 ABC(1,1) {label}: {report['file_bytes']} B (binary {report['binary_weight_bytes']} B, "
              f"floats {report['float_bytes']} B, header {report['header_bytes']} B) vs float weights "
              f"{result['float_file_bytes']} B file / {report['fp32_bytes']} B fp32: "
              f"1/{report['vs_float_file']:.1f} of the float file, "
              f"{report['bits_per_binary_weight']:.3f} bits per binary weight", flush=True)
    return result


def mnist_accuracy(isa, quick) -> dict | None:
    if not MNIST_RAW.is_dir():
        print("  (no ../shared/datasets/MNIST/raw: skipped)")
        return None
    import torchvision

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as root:
        shutil.copytree(MNIST_RAW, Path(root) / "MNIST" / "raw")
        data = {split: torchvision.datasets.MNIST(root, train=split == "train", download=True)
                for split in ("train", "test")}
    tensors = {s: ((d.data.float() / 255 - 0.1307) / 0.3081).unsqueeze(1) for s, d in data.items()}
    labels = {s: d.targets for s, d in data.items()}
    n_train = 12000 if quick else 60000
    x_train, y_train = tensors["train"][:n_train], labels["train"][:n_train]

    def train(model, epochs, lr):
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=g)
            for i in range(0, len(order), 128):
                idx = order[i:i + 128]
                opt.zero_grad()
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
        return model.eval()

    def accuracy(model):
        with torch.no_grad():
            preds = torch.cat([model(tensors["test"][i:i + 500]).argmax(1) for i in range(0, 10000, 500)])
        return (preds == labels["test"]).float().mean().item()

    torch.manual_seed(0)
    start = time.time()
    model = train(build_model("seed_cnn", 1, 28, 10), 1, 1e-3)
    float_acc = accuracy(model)
    convert(model, 3, 3, linear=True)
    calibrate(model, [x_train[i:i + 256] for i in range(0, 2048, 256)])
    model = train(model, 1, 1e-4)
    unpacked = accuracy(model)
    with P.use_isa(isa):
        packed_model = P.pack_model(model)
        packed_acc = accuracy(packed_model)
        with torch.no_grad():
            agree = (packed_model(tensors["test"][:2000]).argmax(1) == model(tensors["test"][:2000]).argmax(1))
    result = {"train_images": n_train, "float_accuracy": float_acc, "abc33_unpacked_accuracy": unpacked,
              "abc33_packed_accuracy": packed_acc, "prediction_agreement": agree.float().mean().item(),
              "isa": isa, "seconds": time.time() - start}
    print(f"  seed_cnn on MNIST ({n_train} training images, 1 epoch + convert ABC(3,3) linear=True + calibrate + "
          f"1 epoch fine-tune): float {float_acc:.4f}, ABC unpacked {unpacked:.4f}, packed ({isa}) {packed_acc:.4f}",
          flush=True)
    return result


def check_targets(layer_rows, model_rows, sizes, isa) -> dict:
    targets = {}
    goals = AVX2_TARGETS if isa == "avx2" else TARGETS
    for lname in LAYERS:
        for pair in PAIRS:
            key = f"({pair[0]},{pair[1]})"
            if key not in goals:
                continue
            goal = goals[key]
            row = next((r for r in layer_rows if r["layer"] == lname and r["batch"] == 1 and r["threads"] == 1
                        and r["isa"] == isa and (r["M"], r["N"]) == pair), None)
            if row:
                targets[f"{lname} ABC{key} {isa} batch 1, 1 thread ≥ {goal}× F.conv2d"] = {
                    "value": round(row["speedup"], 2), "met": row["speedup"] >= goal}
        one = {(r["M"], r["N"]): r["packed_ms"] for r in layer_rows if r["layer"] == lname and r["batch"] == 32
               and r["threads"] == 1 and r["isa"] == isa}
        two = {(r["M"], r["N"]): r["packed_ms"] for r in layer_rows if r["layer"] == lname and r["batch"] == 32
               and r["threads"] == 2 and r["isa"] == isa}
        for pair in one.keys() & two.keys():
            scaling = one[pair] / two[pair]
            targets[f"{lname} ABC{pair} batch 32: 2 threads ≥ 1.7× 1 thread"] = {"value": round(scaling, 2),
                                                                                "met": scaling >= 1.7}
    for (model, batch, threads), goal in (AVX2_MODEL_TARGETS if isa == "avx2" else MODEL_TARGETS).items():
        rows = [r for r in model_rows if r["model"] == model and r["variant"].startswith("ABC(1, 1)")
                and r["batch"] == batch and r["threads"] == threads]
        if rows and isa == "avx2":
            best = max(rows, key=lambda r: r["speedup"])
            targets[f"{model} ABC(1,1) fastest form ({best['variant'].replace('ABC(1, 1)', '').strip() or 'packed'}) "
                    f"batch {batch}, {threads} thread(s) ≥ {goal}× float"] = {
                "value": round(best["speedup"], 2), "met": best["speedup"] >= goal}
        for row in rows if isa != "avx2" else ():
            label = row["variant"].replace("(1, 1)", "(1,1)")
            targets[f"{model} {label} batch {batch}, {threads} thread(s) ≥ {goal}× float"] = {
                "value": round(row["speedup"], 2), "met": row["speedup"] >= goal}
    if sizes:
        for label in ("default (first conv and fc float)", "every layer converted"):
            ratio = sizes[label]["ratio"]
            targets[f"resnet20 ABC(1,1) file ≤ 1/20 of fp32 weights, {label}"] = {
                "value": f"1/{ratio:.1f}", "met": ratio >= 20}
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, batch 1 only for the layers")
    parser.add_argument("--isas", default=None, help="comma-separated kernel paths (default: every native one)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-mnist", action="store_true")
    parser.add_argument("--out", default="outputs/bench_inference.json")
    args = parser.parse_args(argv)
    isas = args.isas.split(",") if args.isas else [i for i in P.available_isas() if i != "reference"]
    if not isas:
        print(f"no native kernels ({P.extension_error()}); benchmarking the reference path only")
        isas = ["reference"]
    repeats = args.repeats or (7 if args.quick else 21)
    best = isas[0]
    load_before = os.getloadavg()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"kernel paths: {', '.join(isas)} (this CPU runs: {', '.join(P.available_isas())})")
    print(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}. The machine is shared "
          "with other jobs: absolute times are noisy, compare ratios (interleaved medians).")
    print("\nLayers (time includes binarizing and packing the input):")
    layer_rows = bench_layers(isas, (1,) if args.quick else (1, 32), (1, 2), repeats)
    breakdown, channels_last = None, None
    if best != "reference":
        print(f"\nLayers on channels_last inputs ({best}, batch 1, 1 thread):")
        channels_last = bench_channels_last(best, repeats)
        print(f"\nBreakdown of one packed layer ({best}):")
        breakdown = layer_breakdown(best, repeats)
    print(f"\nWhole models ({best}):")
    model_rows = bench_models(best, repeats)
    print("\nFile sizes:")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = bench_sizes(Path(tmp))
    print("\nMNIST:")
    mnist = None if args.no_mnist else mnist_accuracy(best, args.quick)
    targets = check_targets(layer_rows, model_rows, sizes, best)
    load_after = os.getloadavg()
    print(f"\nTargets ({'issue 18, for AVX2' if best == 'avx2' else 'set for an AVX-512 VPOPCNTDQ CPU'}; "
          f"measured here on {best}):")
    for name, result in targets.items():
        print(f"  {'met   ' if result['met'] else 'MISSED'} {name}: {result['value']}")
    print(f"load average now {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} (shared machine)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "isas": isas, "available_isas": list(P.available_isas()), "load_average_before": load_before,
        "load_average_after": load_after, "shared_machine": True, "quick": args.quick, "repeats": repeats,
        "layers": layer_rows, "channels_last": channels_last,
        "breakdown": breakdown, "models": model_rows, "sizes": sizes, "mnist": mnist,
        "targets": targets,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
