"""Helpers shared by the test modules: tiny run settings, running ``abc-run`` in a subprocess,
reading what a run wrote, and interrupting a run mid-stage. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

# The smallest useful run on the bundled digits: seconds on a CPU.
TINY = [
    "pretrain.epochs=2", "finetune.epochs=1", "abc.M=2", "abc.N=2", "abc.calibration.batches=2",
    "pretrain.batch_size=128", "finetune.batch_size=128", "progress=false", "device=cpu",
]
CONF = Path(__file__).resolve().parents[1] / "conf"


def cli_command(name: str = "abc-run") -> list[str]:
    """How to start a console script: the one installed next to this Python, if there."""
    script = Path(sys.executable).parent / name
    module = {"abc-run": "abc_experiments.cli", "abc-report": "abc_experiments.report",
              "abc-eval": "abc_experiments.runs", "abc-export": "abc_experiments.export"}.get(name)
    return [str(script)] if script.exists() or module is None else [sys.executable, "-m", module]


def run_cli(args, cwd, timeout=300, env=None, name: str = "abc-run"):
    """``abc-run ARGS`` (or another console script) in a subprocess."""
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update(env or {})
    return subprocess.run(cli_command(name) + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_summary_after(function, cfg, run_dir):
    function(cfg)
    return read_summary(run_dir)


def scalar_tags(event_dir: Path) -> set[str]:
    return set(EventAccumulator(str(event_dir)).Reload().Tags()["scalars"])


def results(summary: dict) -> dict:
    return {stage: {k: summary[stage][k] for k in ("acc", "loss", "val_acc", "val_loss")}
            for stage in ("fp", "converted", "finetuned")}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content: equal before and after means untouched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def interrupt_at(monkeypatch, stage_steps: int):
    """Send a real SIGINT to this process after ``stage_steps`` training forward passes."""
    import abc_experiments.pipeline as pipeline

    calls = {"n": 0}
    original = pipeline.build_model

    def build_with_signal(*args, **kwargs):
        model = original(*args, **kwargs)

        def hook(module, _inputs):
            if module.training:
                calls["n"] += 1
                if calls["n"] == stage_steps:
                    os.kill(os.getpid(), signal.SIGINT)
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(pipeline, "build_model", build_with_signal)


# ---- ABC layers and activation kernels --------------------------------------------------------
def max_relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def random_conv_case(seed):
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2, 4])
    cin, cout = groups * rng.randint(1, 4), groups * rng.randint(1, 4)
    k = rng.choice([1, 3, 5])
    conv = nn.Conv2d(cin, cout, k, stride=rng.choice([1, 2]), padding=rng.choice([0, 1, 2]),
                     dilation=rng.choice([1, 2]), groups=groups, bias=rng.random() < 0.7)
    size = (k - 1) * conv.dilation[0] + rng.randint(3, 9)
    x = torch.rand(rng.randint(1, 3), cin, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5
    options = dict(M=rng.randint(1, 5), N=rng.randint(0, 5), scope=rng.choice(["per_layer", "per_channel"]),
                   learn_u=rng.random() < 0.3)
    return conv, x, options


def forward_backward(layer, x):
    x = x.clone().requires_grad_()
    out = layer(x)
    upstream = torch.rand(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype) + 0.5
    (out * upstream).sum().backward()
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters() if p.grad is not None})
    return out.detach(), grads


def bucket_case(N, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    shifts = (torch.rand(N, generator=generator) * 2 - 1).to(dtype)  # unsorted
    if N >= 3:
        shifts[2] = shifts[0]  # a duplicate shift: two equal thresholds
    betas = (torch.rand(N, generator=generator) + 0.1).to(dtype)
    x = (torch.randn(1 << 16, generator=generator) * 1.5).to(dtype)
    edges = torch.cat([0.5 - shifts.float(), -shifts.float(), 1 - shifts.float()]).to(dtype)
    # values exactly at the thresholds and STE window edges, and one float either side of them
    x[: 3 * N] = edges
    x[3 * N: 6 * N] = torch.nextafter(edges.float(), torch.full_like(edges.float(), 9)).to(dtype)
    x[6 * N: 9 * N] = torch.nextafter(edges.float(), torch.full_like(edges.float(), -9)).to(dtype)
    x[9 * N: 9 * N + 4] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
    x[9 * N + 4: 9 * N + 4000] = 0.0  # a spike of ReLU zeros
    return x, shifts, betas


def run_kernel(kernel, x, shifts, betas, g):
    x, shifts, betas = (t.clone().requires_grad_() for t in (x, shifts, betas))
    from abc_experiments.nn.staircase_dispatch import staircase_ste

    out = staircase_ste(x, shifts, betas, kernel)
    out.backward(g)
    return out.detach(), x.grad, shifts.grad, betas.grad
