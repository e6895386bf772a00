"""Benchmark: training cost of ABC layers and models against full precision, on the CPU by default.

Two parts, both timed interleaved (the cases take turns iteration by iteration, so a load change on
a shared machine hits all of them alike) and reported as medians:

* **layer**: forward + backward (input requires grad, a fixed upstream gradient, grads cleared
  between iterations) of a fused ``ABCConv2d`` against its ``nn.Conv2d``, at each ``--threads``
  count, on ``cifar`` (64→64, 3×3, pad 1, 32×32 input, batch 64) and ``seed`` (the seed notebook's
  second layer: 32→64, 5×5, pad 2, 14×14 input, batch 64); activation kernels ``--kernels``
  (default ``auto,bucket``: the default kernel, which is ``native`` where the C++ kernel builds, and
  the table kernel for comparison; no compilation), (M, N) from ``--pairs`` (default 5,5).
* **epoch**: ``--steps`` SGD steps (batch ``--batch``) on random 32×32 RGB data of each
  ``--models`` model, full precision against ``convert(model, M, N)`` for M, N in ``--model-pairs``;
  "epoch s" is the median step time × steps; the models use the default activation kernel (auto).

Targets: fused ABC(5,5) at most 1.3× ``nn.Conv2d`` (quiet machine) and at most 1.5× with
``--load`` (a background process per core spinning, started before and stopped after the
measurements); a converted model's training epoch at most 1.5× full precision. The load average
is printed and, with everything else, written to JSON (``--json``).

Run: ``python scripts/bench_layer.py`` (``--quick``: fewer repeats and steps; ``--help``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from abc_experiments.models import build_model
    from abc_experiments.nn import ABCConv2d, convert
except ModuleNotFoundError:  # run as a file from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from abc_experiments.models import build_model
    from abc_experiments.nn import ABCConv2d, convert
from abc_experiments.nn.activations import KERNELS
from abc_experiments.nn.native import native_available

CONFIGS = {  # in, out, kernel, padding, input size, batch
    "cifar": dict(cin=64, cout=64, k=3, pad=1, size=32, batch=64),
    "seed": dict(cin=32, cout=64, k=5, pad=2, size=14, batch=64),
}
WARMUP = 3
LAYER_LIMIT, LOADED_LIMIT, EPOCH_LIMIT = 1.3, 1.5, 1.5


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item.strip()]


def interleaved(steps: list, repeats: int, warmup: int = WARMUP) -> list[list[float]]:
    """Wall times (ms) of ``repeats`` calls of each step function, taking turns, after warm-up."""
    times = [[] for _ in steps]
    for i in range(warmup + repeats):
        for step, step_times in zip(steps, times):
            start = time.perf_counter()
            step()
            if i >= warmup:
                step_times.append((time.perf_counter() - start) * 1e3)
    return times


def layer_step(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(upstream)
    return step


def train_step(model: nn.Module, batch: int, generator: torch.Generator):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    data = [(torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(10, (batch,), generator=generator))
            for _ in range(4)]
    state = {"i": 0}

    def step():
        x, y = data[state["i"] % len(data)]
        state["i"] += 1
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


class Load:
    """``count`` background processes spinning on a core each, for the duration of a ``with``."""

    def __init__(self, count: int):
        self.count, self.processes = count, []

    def __enter__(self):
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)


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
    parser.add_argument("--threads", default="1,2", help="comma list of torch.set_num_threads values")
    parser.add_argument("--kernels", default="auto,bucket",
                        help="activation kernels for the layer part, the first is held to the targets "
                             f"({', '.join(KERNELS)})")
    parser.add_argument("--pairs", type=pairs, default=[(5, 5)], help="layer (M,N) pairs, e.g. '1,1;3,3;5,5'")
    parser.add_argument("--configs", default="cifar,seed", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=15, help="timed layer iterations per case (median)")
    parser.add_argument("--models", default="resnet20,vgg_small", help="models for the epoch timing ('' to skip)")
    parser.add_argument("--model-pairs", type=pairs, default=[(3, 3), (5, 5)], help="(M,N) pairs for the epoch timing")
    parser.add_argument("--steps", type=int, default=20, help="training steps per model (the 'epoch')")
    parser.add_argument("--batch", type=int, default=64, help="training batch size")
    parser.add_argument("--load", action="store_true", help="keep every core busy with a spinning process")
    parser.add_argument("--quick", action="store_true", help="5 layer repeats, 8 training steps")
    parser.add_argument("--json", default="outputs/bench/bench_layer.json", help="where to write results")
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if any(k not in KERNELS for k in args.kernels):
        parser.error(f"unknown kernel in {args.kernels}: choose from {', '.join(KERNELS)}")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        args.repeats, args.steps = 5, 8
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}: choose from {', '.join(CONFIGS)}")
    return args


def bench_layers(args, threads: int, rows: list) -> None:
    for name in args.configs:
        c = CONFIGS[name]
        torch.manual_seed(0)
        conv = nn.Conv2d(c["cin"], c["cout"], c["k"], padding=c["pad"])
        x = torch.randn(c["batch"], c["cin"], c["size"], c["size"]).relu().requires_grad_()
        upstream = torch.randn(conv(x).shape)
        cases = [(M, N, kernel) for M, N in args.pairs for kernel in args.kernels]
        layers = [ABCConv2d.from_conv(conv, M, N, kernel=kernel) for M, N, kernel in cases]
        timed = interleaved([layer_step(conv, x, upstream)] + [layer_step(l, x, upstream) for l in layers],
                            args.repeats)
        conv_ms = statistics.median(timed[0])
        for (M, N, kernel), times in zip(cases, timed[1:]):
            median = statistics.median(times)
            row = dict(part="layer", config=name, threads=threads, M=M, N=N, kernel=kernel, runs=shown(kernel),
                       load=args.load,
                       median_ms=round(median, 2), conv_ms=round(conv_ms, 2), ratio=round(median / conv_ms, 3))
            rows.append(row)
            print(f"layer  {name:<6} thr {threads}  ABC({M},{N}) {shown(kernel):<12} {median:8.1f} ms  "
                  f"nn.Conv2d {conv_ms:7.1f} ms  {row['ratio']:5.2f}×  load avg {os.getloadavg()[0]:.2f}", flush=True)


def shown(kernel: str) -> str:
    """``auto→native`` / ``auto→bucket``: the kernel ``auto`` runs here (CPU float32)."""
    return f"auto→{'native' if native_available() else 'bucket'}" if kernel == "auto" else kernel


def bench_epochs(args, threads: int, rows: list) -> None:
    for name in args.models:
        torch.manual_seed(0)
        fp = build_model(name, in_channels=3, image_size=32, num_classes=10).train()
        models = [fp]
        for M, N in args.model_pairs:
            model = copy.deepcopy(fp)
            convert(model, M, N)
            models.append(model.train())
        steps = [train_step(m, args.batch, torch.Generator().manual_seed(1)) for m in models]
        timed = interleaved(steps, args.steps, warmup=2)
        fp_ms = statistics.median(timed[0])
        for (M, N), times in zip(args.model_pairs, timed[1:]):
            median = statistics.median(times)
            row = dict(part="epoch", model=name, threads=threads, M=M, N=N, steps=args.steps, batch=args.batch,
                       load=args.load, step_ms=round(median, 1), fp_step_ms=round(fp_ms, 1),
                       epoch_s=round(median * args.steps / 1e3, 2), fp_epoch_s=round(fp_ms * args.steps / 1e3, 2),
                       ratio=round(median / fp_ms, 3))
            rows.append(row)
            print(f"epoch  {name:<9} thr {threads}  ABC({M},{N}) {row['epoch_s']:7.2f} s  FP {row['fp_epoch_s']:6.2f} s"
                  f"  {row['ratio']:5.2f}×  ({args.steps} steps of {args.batch})  load avg {os.getloadavg()[0]:.2f}",
                  flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    meta = dict(torch=torch.__version__, cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version(),
                repeats=args.repeats, warmup=WARMUP, load=args.load, native=native_available(),
                epoch_kernel=shown("auto"), loadavg_start=os.getloadavg())
    print(f"# torch {meta['torch']} | CPU {meta['cpu']} ({meta['cores']} cores) | load {'ON' if args.load else 'off'}"
          f" | load average {meta['loadavg_start'][0]:.2f} | epochs: kernel {meta['epoch_kernel']}", flush=True)
    rows: list[dict] = []
    default_threads = torch.get_num_threads()
    with Load(os.cpu_count() or 1) if args.load else _nothing():
        meta["loadavg_loaded"] = os.getloadavg()
        for threads in args.threads:
            torch.set_num_threads(threads)
            bench_layers(args, threads, rows)
            bench_epochs(args, threads, rows)
    torch.set_num_threads(default_threads)
    meta["loadavg_end"] = os.getloadavg()

    checks = []
    for row in rows:
        if row["part"] == "layer" and (row["M"], row["N"]) == (5, 5) and row["kernel"] == args.kernels[0]:
            limit = LOADED_LIMIT if args.load else LAYER_LIMIT
            checks.append(dict(what=f"layer {row['config']} ABC(5,5) {row['kernel']} threads {row['threads']}",
                               ratio=row["ratio"], limit=limit, met=row["ratio"] <= limit))
        if row["part"] == "epoch":
            checks.append(dict(what=f"epoch {row['model']} ABC({row['M']},{row['N']}) threads {row['threads']}",
                               ratio=row["ratio"], limit=EPOCH_LIMIT, met=row["ratio"] <= EPOCH_LIMIT))
    for check in checks:
        verdict = "MET" if check["met"] else "NOT met"
        print(f"target {check['what']}: {check['ratio']:.2f}× ≤ {check['limit']}×  {verdict}")
    result = dict(meta=meta, rows=rows, targets=checks)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON: {path} (load average {meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} at end)")
    return result


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
