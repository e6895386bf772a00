"""Benchmark: the three layers of ``bench_inference.py`` at batch 1 on one thread, packed ABC(1,1)
and (3,3) against ``F.conv2d`` (interleaved medians, binarizing and packing included), in about a
minute. Prints one line per layer and the load average, and writes them to
outputs/packed_layer_speedups.json in the working directory; meant for A/B runs of two checkouts
(``scripts/ab_packed_layers.sh``), where only the ratios of runs made at the same time compare.

Run: ``python scripts/packed_layer_speedups.py [REPEATS]`` in the checkout to measure (it imports
``abc_experiments`` from the working directory).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.getcwd())  # the package of the checkout it runs in (an A/B runs one script in two)
from abc_experiments import packed as P  # noqa: E402
from abc_experiments.nn import ABCConv2d  # noqa: E402

LAYERS = {"64-64 3x3 32x32": (64, 64, 3, 1, 32), "64-64 3x3 56x56": (64, 64, 3, 1, 56),
          "32-64 5x5 14x14": (32, 64, 5, 2, 14)}
PAIRS = ((1, 1), (3, 3))


def main(repeats: int) -> None:
    torch.set_num_threads(1)
    result = {"packed": P.__file__, "path": P._ext.get_isa(), "threads": 1, "batch": 1, "repeats": repeats,
              "load_average_before": os.getloadavg(), "layers": {}}
    print(f"packed {P.__file__}, path {P._ext.get_isa()}, load average {os.getloadavg()}")
    for name, (cin, cout, k, pad, size) in LAYERS.items():
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, padding=pad, bias=False)
        x = torch.relu(torch.randn(1, cin, size, size))
        fns = {"float": lambda conv=conv, x=x, pad=pad: F.conv2d(x, conv.weight, None, 1, pad)}
        for pair in PAIRS:
            layer = P.PackedABCConv2d.from_abc(ABCConv2d.from_conv(conv, *pair).eval())
            fns[pair] = lambda layer=layer, x=x: layer(x)
        times = {key: [] for key in fns}
        with torch.no_grad():
            for i in range(repeats + 3):
                for key, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    if i >= 3:
                        times[key].append(time.perf_counter() - start)
        med = {key: statistics.median(values) for key, values in times.items()}
        result["layers"][name] = {"float_us": med["float"] * 1e6, **{
            f"ABC{pair}": {"us": med[pair] * 1e6, "speedup": med["float"] / med[pair]} for pair in PAIRS}}
        print(f"{name}: float {med['float'] * 1e6:.0f} us " + " ".join(
            f"ABC{pair} {med[pair] * 1e6:.0f} us x{med['float'] / med[pair]:.2f}" for pair in PAIRS), flush=True)
    result["load_average_after"] = os.getloadavg()
    os.makedirs("outputs", exist_ok=True)
    with open(os.path.join("outputs", "packed_layer_speedups.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
