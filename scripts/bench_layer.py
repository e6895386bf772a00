"""Benchmark: forward+backward wall time of an ABC convolution against the plain ``nn.Conv2d``.

Measures, in training mode (input requires grad, backward with a fixed upstream gradient, grads
cleared between iterations), for M, N in {1, 3, 5}:

* ``nn.Conv2d`` (the baseline),
* ``ABCConv2d`` fused (ONE conv of Σβₙ Aₙ with Σαₘ Bₘ), activation kernel ``eager`` and ``compiled``,
* ``ABCConv2d`` naive (M·N binary convs, eager),

on two layer configs: ``cifar`` (64→64, 3×3, pad 1, 32×32 input, batch 128) and ``seed`` (the seed
notebook's second layer: 32→64, 5×5, pad 2, 14×14 input, batch 50). Inputs are ReLU of a normal
tensor. Each case runs warm-up iterations (these also trigger the torch.compile compilation) and
reports the median of ``--repeats`` timed iterations (``time.perf_counter``, CUDA synchronised).
Each ABC case is timed interleaved with the ``nn.Conv2d`` (alternating iterations); "conv ms" is
that paired baseline's median and "× conv" the ratio of the two medians.

Prints a table and writes JSON (default ``outputs/bench/bench_layer.json``) with a ``targets`` entry
checking "fused ABC(5,5) at most 1.3× nn.Conv2d on CPU" per config and kernel.

Run: ``python scripts/bench_layer.py`` (``--quick`` for (1,1), (3,3), (5,5) only; ``--help``). On a
shared machine other busy processes slow the many small parallel ops of the eager and naive paths
far more than one big conv (thread oversubscription); the load average is recorded, and
``--threads 1`` gives steadier ratios there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    from abc_experiments.nn import ABCConv2d, activations
except ModuleNotFoundError:  # run as a file from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from abc_experiments.nn import ABCConv2d, activations

CONFIGS = {  # in, out, kernel, padding, input size, batch
    "cifar": dict(cin=64, cout=64, k=3, pad=1, size=32, batch=128),
    "seed": dict(cin=32, cout=64, k=5, pad=2, size=14, batch=50),
}
COUNTS = (1, 3, 5)
QUICK_PAIRS = ((1, 1), (3, 3), (5, 5))
WARMUP = 3
TARGET_RATIO = 1.3


def time_fwd_bwd(layers: list[nn.Module], x: torch.Tensor, upstream: torch.Tensor, repeats: int) -> list[list[float]]:
    """Wall times (ms) of ``repeats`` forward+backward passes per layer, after ``WARMUP`` untimed ones.

    The layers take turns iteration by iteration, so a load change on a shared machine hits all of
    them alike and their ratio stays meaningful.
    """
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = [[] for _ in layers]
    for i in range(WARMUP + repeats):
        for layer, layer_times in zip(layers, times):
            layer.train()
            layer.zero_grad(set_to_none=True)
            x.grad = None
            sync()
            start = time.perf_counter()
            layer(x).backward(upstream)
            sync()
            if i >= WARMUP:
                layer_times.append((time.perf_counter() - start) * 1e3)
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per case (median)")
    parser.add_argument("--quick", action="store_true", help="only (M, N) in (1,1), (3,3), (5,5)")
    parser.add_argument("--configs", default="cifar,seed", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--json", default="outputs/bench/bench_layer.json", help="where to write results")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive M·N-conv impl")
    parser.add_argument("--no-compiled", action="store_true", help="skip the compiled activation kernel")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}: choose from {', '.join(CONFIGS)}")
    if args.repeats < 1:
        parser.error("--repeats must be ≥ 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pairs = QUICK_PAIRS if args.quick else tuple(itertools.product(COUNTS, COUNTS))
    variants = [("fused", "eager")] + [("fused", "compiled")] * (not args.no_compiled)
    variants += [("naive", "eager")] * (not args.no_naive)
    meta = dict(torch=torch.__version__, device=str(device), threads=torch.get_num_threads(), cpu=cpu_model(),
                python=platform.python_version(), repeats=args.repeats, warmup=WARMUP, quick=args.quick,
                loadavg_start=os.getloadavg()[0])
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    gpu = f" | GPU {meta['gpu']}" if "gpu" in meta else ""
    print(f"# torch {meta['torch']} | device {meta['device']} | threads {meta['threads']} | CPU {meta['cpu']}{gpu}"
          f" | median of {args.repeats} | load average {meta['loadavg_start']:.2f}", flush=True)
    print(f"{'config':<7} {'M':>2} {'N':>2}  {'impl':<15} {'median ms':>10} {'conv ms':>9} {'× conv':>7}", flush=True)

    rows, targets = [], []
    for name in args.configs:
        c = CONFIGS[name]
        torch.manual_seed(0)
        conv = nn.Conv2d(c["cin"], c["cout"], c["k"], padding=c["pad"]).to(device)
        x = torch.randn(c["batch"], c["cin"], c["size"], c["size"], device=device).relu().requires_grad_()
        upstream = torch.randn(conv(x).shape, device=device)
        cases = [(None, None, "nn.Conv2d", "-")] + [(M, N, impl, kernel) for M, N in pairs for impl, kernel in variants]
        for M, N, impl, kernel in cases:
            layers = [conv] if M is None else [conv, ABCConv2d.from_conv(conv, M, N, "per_layer", impl, kernel=kernel)]
            timed = time_fwd_bwd(layers, x, upstream, args.repeats)
            conv_times, times = timed[0], timed[-1]  # the same list for the nn.Conv2d row
            median, conv_median = statistics.median(times), statistics.median(conv_times)
            label = impl if kernel == "-" else f"{impl}/{kernel}"
            row = dict(config=name, M=M, N=N, impl=impl, kernel=kernel, median_ms=round(median, 3),
                       conv_ms=round(conv_median, 3), ratio=round(median / conv_median, 3),
                       times_ms=[round(t, 3) for t in times])
            rows.append(row)
            print(f"{name:<7} {M or '-':>2} {N or '-':>2}  {label:<15} {median:>10.2f} {conv_median:>9.2f}"
                  f" {row['ratio']:>6.2f}×", flush=True)
        for kernel in [k for impl, k in variants if impl == "fused"]:
            row = next(r for r in rows if r["config"] == name and (r["M"], r["N"], r["impl"], r["kernel"])
                       == (5, 5, "fused", kernel))
            targets.append(dict(config=name, kernel=kernel, M=5, N=5, ratio=row["ratio"], limit=TARGET_RATIO,
                                met=row["ratio"] <= TARGET_RATIO, device=str(device)))

    meta["loadavg_end"] = os.getloadavg()[0]  # other processes on the cores make ratios unreliable
    meta["compiled_fell_back_to_eager"] = activations._Kernels.compiled == (
        activations.staircase, activations.staircase_grad)
    result = dict(meta=meta, rows=rows, targets=dict(
        description=f"fused ABC(5,5) at most {TARGET_RATIO}× nn.Conv2d on CPU", checks=targets))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")

    if meta["compiled_fell_back_to_eager"]:
        print("WARNING: torch.compile failed; the 'compiled' rows ran the eager kernels")
    if device.type != "cpu":
        print(f"note: the target is defined on CPU; this run used {device}")
    for name in args.configs:
        checks = [t for t in targets if t["config"] == name]
        met = [t["kernel"] for t in checks if t["met"]]
        detail = ", ".join(f"{t['kernel']} {t['ratio']:.2f}×" for t in checks)
        verdict = f"MET with kernel {' and '.join(met)}" if met else "NOT met"
        print(f"target {name}: fused ABC(5,5) ≤ {TARGET_RATIO}× nn.Conv2d: {verdict} ({detail})")
    print(f"JSON: {path} (load average {meta['loadavg_start']:.2f} at start, {meta['loadavg_end']:.2f} at end)")
    return result


if __name__ == "__main__":
    main()
