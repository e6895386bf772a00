"""Calibration benchmark: what conversion + calibration keeps of a trained ResNet-20 (not a test).

For each (M, N), converts the FP model and calibrates it three ways, then reports test accuracy,
the logits' relative error against the FP model and the calibration time (same process, same
batches, one after the other):

- ``loop, offset folded``: the layer-by-layer loop (time growing with depth squared) with the input
  offset c folded into the bias only, what earlier versions computed (emulated: the loop's result
  loaded with ``input_offset`` 0, as an old checkpoint loads);
- ``one pass, exact offset``: one forward pass, BatchNorms re-estimated after it;
- ``one pass, exact offset, BN in pass`` (the default): each BatchNorm re-estimated in the pass,
  before the layers after it are fitted.

    python scripts/bench_calibration.py --data-root ../shared/datasets/cifar10-subset \\
        --fp-checkpoint outputs/cache/pretrain/resnet20-cifar10-<key>.pt

``--methods`` picks some of them (``loop_folded,one_pass,one_pass_bn``) and ``--scopes
per_layer,per_channel`` compares one alpha set per layer (the paper) with one per output channel.
``--batchnorm relative,replace`` compares the BatchNorm statistics corrected relative to the FP
model's (the default) with statistics re-estimated from the calibration batches alone, and
``--bases residual`` the greedy residual weight bases with the paper's shifted grid.
``--fp-checkpoint`` is a ResNet-20 state dict (bare or under ``"model"``, e.g. the pretrain cache
of an ``experiment=cifar10_subset_resnet20`` run). Writes ``outputs/bench/bench_calibration.json``.
Target (issue 17): calibration of ResNet-20 in at most 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch

from abc_experiments.data import build_datasets
from abc_experiments.models.registry import build_model
from abc_experiments.nn import calibrate, convert

METHODS = {  # --methods name: (label, calibrate options)
    "loop_folded": ("loop, offset folded", dict(method="layerwise")),
    "one_pass": ("one pass, exact offset", dict(method="one_pass", batchnorm_in_pass=False)),
    "one_pass_bn": ("one pass, exact offset, BN in pass", dict(method="one_pass", batchnorm_in_pass=True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="the folder holding cifar-10-batches-py/")
    parser.add_argument("--fp-checkpoint", required=True, help="a trained ResNet-20 state dict")
    parser.add_argument("--configs", default="5,5 3,3 1,1", help="space-separated M,N pairs")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches of --batch-size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--batchnorm", default="relative,replace",
                        help="comma-separated: relative (the default: FP statistics moved by the shift conversion "
                             "causes) and/or replace (re-estimated from the calibration batches alone)")
    parser.add_argument("--bases", default="shifted",
                        help="weight bases: shifted (the paper's grid), residual or alternating")
    parser.add_argument("--scopes", default="per_layer",
                        help="comma-separated alpha scopes: per_layer (the paper), per_channel (one alpha set "
                             "per output channel)")
    parser.add_argument("--out", default="outputs/bench/bench_calibration.json")
    args = parser.parse_args()
    methods = [METHODS[name] for name in args.methods.split(",")]
    scopes = args.scopes.split(",")
    torch.set_num_threads(args.threads)
    splits = build_datasets("cifar10", root=args.data_root, download=False, verify=False)
    model = build_model("resnet20", splits.in_channels, splits.image_size, splits.num_classes)
    state = torch.load(args.fp_checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state))
    model.eval()
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(splits.calib, batch_size=args.batch_size, shuffle=True, generator=generator)
    batches = [x for _, (x, _) in zip(range(args.batches), loader)]
    test = [(x, y) for x, y in torch.utils.data.DataLoader(splits.test, batch_size=512)]

    @torch.no_grad()
    def evaluate(net):
        logits = torch.cat([net(x) for x, _ in test])
        labels = torch.cat([y for _, y in test])
        return (logits.argmax(1) == labels).float().mean().item() * 100, logits

    fp_acc, fp_logits = evaluate(model)
    load_before = os.getloadavg()
    rows = []
    print(f"FP test accuracy {fp_acc:.2f} % on {len(splits.test)} images; calibration on {args.batches} x "
          f"{args.batch_size} images, {args.threads} threads")
    print(f"{'M':>2} {'N':>2}  {'scope':<11} {'BN':<8} {'calibration':<36} {'seconds':>8} {'test acc':>9} {'gap':>6} "
          f"{'logit err':>9}")
    for pair, scope, (label, options), batchnorm in itertools.product(args.configs.split(), scopes, methods,
                                                                       args.batchnorm.split(",")):
        M, N = (int(v) for v in pair.split(","))
        net = copy.deepcopy(model)
        convert(net, M, N, scope=scope, bases=args.bases)
        started = time.perf_counter()
        calibrate(net, batches, **options, reference=model if batchnorm == "relative" else None)
        seconds = time.perf_counter() - started
        if label.endswith("offset folded"):
            net.load_state_dict({key: torch.zeros_like(value) if key.endswith("input_offset") else value
                                 for key, value in net.state_dict().items()})
        acc, logits = evaluate(net)
        error = ((logits - fp_logits).norm() / fp_logits.norm()).item()
        rows.append({"M": M, "N": N, "scope": scope, "bases": args.bases, "batchnorm": batchnorm,
                     "calibration": label, "seconds": seconds, "test_acc": acc, "gap": fp_acc - acc,
                     "logit_error": error})
        print(f"{M:>2} {N:>2}  {scope:<11} {batchnorm:<8} {label:<36} {seconds:>8.1f} {acc:>9.2f} "
              f"{fp_acc - acc:>6.2f} {error:>9.3f}", flush=True)
    load_after = os.getloadavg()
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other processes on the machine)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"fp_acc": fp_acc, "test_images": len(splits.test), "rows": rows,
                               "batches": args.batches, "batch_size": args.batch_size, "threads": args.threads,
                               "load_average_before": load_before, "load_average_after": load_after,
                               "machine": platform.processor() or platform.machine()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
