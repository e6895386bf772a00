"""Helpers shared by the test modules: :func:`RunIf` (every skip condition), tiny run settings,
running ``abc-run`` in a subprocess, reading what a run wrote, interrupting a run mid-stage, and the
kernel comparisons (:func:`rel_err`, :func:`check_against_eager`). Fixtures live in conftest.py."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
              "abc-eval": "abc_experiments.runs", "abc-export": "abc_experiments.export",
              "abc-sensitivity": "abc_experiments.sensitivity"}.get(name)
    return [str(script)] if script.exists() or module is None else [sys.executable, "-m", module]


def run_cli(args, cwd, timeout=300, env=None, name: str = "abc-run"):
    """``abc-run ARGS`` (or another console script) in a subprocess."""
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update(env or {})
    return subprocess.run(cli_command(name) + list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def train_tiny_stage(checkpoint_dir: Path, criterion=None, batch_size: int = 32, **settings):
    """``train_stage("finetune", ...)`` of a small conv + BatchNorm net on 96 random 1x8x8 images of
    3 classes (train = val = test = calib), 2 epochs of Adam by default (``settings`` override the
    stage config). ``criterion``: called with a copy of the untrained net (a teacher), or None.

    Returns:
        (the trained model, the :class:`FitResult`, the loaders, the teacher or None).
    """
    import copy

    from torch.utils.data import TensorDataset

    from abc_experiments.data.datasets import DataSplits
    from abc_experiments.data.loaders import build_loaders
    from abc_experiments.training import StageEnvironment, train_stage

    torch.manual_seed(0)
    images, labels = torch.randn(96, 1, 8, 8), torch.randint(0, 3, (96,))
    data = TensorDataset(images, labels)
    splits = DataSplits(name="tiny", train=data, val=data, test=data, in_channels=1, image_size=8, num_classes=3,
                        calib=data)
    loaders = build_loaders(splits, batch_size=batch_size, eval_batch_size=96, num_workers=0, device="cpu", seed=0)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    teacher = copy.deepcopy(model) if criterion else None
    stage = dict(epochs=2, steps_per_epoch=None, optimizer="adam", lr=1e-2, weight_decay=0.0, momentum=0.9,
                 schedule="cosine", step_size=1, gamma=0.1, divergence_factor=0.0)
    cfg = type("Cfg", (), {**stage, **settings})()
    env = StageEnvironment(device=torch.device("cpu"), checkpoint_dir=checkpoint_dir, progress=False)
    checkpoint_dir.mkdir(parents=True)
    writer = type("W", (), {"add_scalar": lambda *a, **k: None, "flush": lambda *a: None})()
    fit = train_stage("finetune", model, loaders, cfg, env, writer, seed=0,
                      criterion=criterion(teacher) if criterion else None)
    return model, fit, loaders, teacher


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_summary_after(function, cfg, run_dir):
    function(cfg)
    return read_summary(run_dir)


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


# ---- skip conditions ---------------------------------------------------------------------------
# The pip extra that brings an optional module (the skip reason names it).
EXTRA_OF = {"onnx": "export", "onnxscript": "export", "onnxruntime": "export", "hydra_plugins": "cluster"}


def RunIf(*, cuda: bool = False, min_gpus: int = 0, cpp_compiler: bool = False, native_kernels: bool = False,
          packed_kernels: bool = False, packed_isa: str | None = None, avx512: bool = False, onnx: bool = False,
          modules: tuple[str, ...] = (), platform: str | None = None) -> pytest.MarkDecorator:
    """The one way a test says what it needs; it is skipped, with the reason, where that is missing
    (in the spirit of lightning-hydra-template's ``RunIf``)::

        @RunIf(cuda=True)
        def test_on_the_gpu(): ...

        @pytest.mark.parametrize("isa", [pytest.param(isa, marks=RunIf(packed_isa=isa)) for isa in ISAS])

    The conditions are checked when the test is set up (conftest.py), not at collection: collecting
    never builds a C++ extension. ``cuda``/``min_gpus`` also add the ``cuda`` marker (``-m cuda``).

    Args:
        cuda: needs a CUDA GPU.
        min_gpus: needs at least this many CUDA GPUs.
        cpp_compiler: needs a C++ compiler ($CXX, c++, g++ or clang++), as ``torch.compile`` does.
        native_kernels: needs the native C++ activation kernels (``abc_experiments.nn.native``) built.
        packed_kernels: needs the packed C++ extension (``abc_experiments.packed``) built.
        packed_isa: needs this packed kernel path to run here (``"reference"`` runs everywhere).
        avx512: needs a CPU with the AVX-512 instructions the packed kernels use.
        onnx: needs the ONNX exporter and runtime (the ``export`` extra).
        modules: needs these modules importable.
        platform: runs only where ``sys.platform`` starts with this (``"linux"``, ``"darwin"``, ``"win"``).

    Returns:
        A ``run_if`` marker holding the conditions.
    """
    conditions = dict(cuda=cuda, min_gpus=min_gpus, cpp_compiler=cpp_compiler, native_kernels=native_kernels,
                      packed_kernels=packed_kernels, packed_isa=packed_isa, avx512=avx512, onnx=onnx,
                      modules=tuple(modules), platform=platform)
    conditions = {name: value for name, value in conditions.items() if value}
    if not conditions:
        raise ValueError("RunIf needs at least one condition, e.g. RunIf(cuda=True)")
    return pytest.mark.run_if(**conditions)


def _missing_module(name: str) -> str | None:
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        found = False
    if found:
        return None
    extra = EXTRA_OF.get(name.split(".")[0])
    return f"needs {name} ({f'pip install -e .[{extra}]' if extra else 'not installed'})"


def _packed_isa_missing(isa: str) -> str | None:
    from abc_experiments import packed
    from abc_experiments.packed import _ext

    if isa == "reference":
        return None
    if not packed.extension_available():
        return f"the packed C++ extension is unavailable: {packed.extension_error()}"
    if isa not in _ext.runnable_isas():
        return f"this CPU cannot run the packed {isa} kernels (it runs {', '.join(packed.cpu_isas())})"
    return None


@functools.cache
def skip_reason(condition: str, value) -> str | None:
    """Why the test cannot run here under one :func:`RunIf` condition; None if it can (cached)."""
    if condition == "cuda":
        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    if condition == "min_gpus":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return None if count >= value else f"needs {value} CUDA GPU(s), found {count}"
    if condition == "cpp_compiler":
        names = [os.environ.get("CXX"), "c++", "g++", "clang++"]
        return None if any(name and shutil.which(name) for name in names) else \
            "needs a C++ compiler (set CXX or install g++ or clang++)"
    if condition == "native_kernels":
        from abc_experiments.nn.native import native_available, native_error

        return None if native_available() else f"the native activation kernels are unavailable: {native_error()}"
    if condition == "packed_kernels":
        from abc_experiments import packed

        return None if packed.extension_available() else \
            f"the packed C++ extension is unavailable: {packed.extension_error()}"
    if condition == "packed_isa":
        return _packed_isa_missing(value)
    if condition == "avx512":
        return _packed_isa_missing("avx512")
    if condition == "onnx":
        return _missing_module("onnxscript") or _missing_module("onnxruntime")
    if condition == "modules":
        return next((reason for reason in map(_missing_module, value) if reason), None)
    if condition == "platform":
        return None if sys.platform.startswith(value) else f"runs on {value} only (this is {sys.platform})"
    raise ValueError(f"unknown RunIf condition {condition!r}")


# ---- ABC layers and activation kernels --------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref|, the largest error relative to the largest reference value
    (max |ref| floored at 1e-12, so two all-zero tensors agree)."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


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
    """(values, grad_x, grad_shifts, grad_betas) of the staircase through ``kernel``, upstream gradient ``g``."""
    x, shifts, betas = (t.clone().requires_grad_() for t in (x, shifts, betas))
    from abc_experiments.nn.staircase_dispatch import staircase_ste

    out = staircase_ste(x, shifts, betas, kernel)
    out.backward(g)
    return out.detach(), x.grad, shifts.grad, betas.grad


def reference_grads_float64(x, g, shifts, betas):
    """STE gradients from the reference's own predicates (x + v rounded in x's dtype), summed in
    float64: the ground truth every kernel is held to."""
    y = x.unsqueeze(0) + shifts.view(-1, *([1] * x.dim()))  # rounded as the kernels round it
    up = torch.where(y >= 0.5, 1.0, -1.0).double()
    active = ((y >= 0) & (y <= 1)).double()
    g64, b64 = g.double(), betas.double()
    grad_x = (active * b64.view(-1, *([1] * x.dim()))).sum(0) * g64
    grad_shifts = b64 * (active * g64).flatten(1).sum(1)
    grad_betas = (up * g64).flatten(1).sum(1)
    return grad_x, grad_shifts, grad_betas


def check_against_eager(kernel, x, shifts, betas, g):
    """``kernel`` against the eager reference: values bit for bit (and the dtypes); the gradients of
    both against the float64 truth within a few roundings of the output dtype, scaled by what they
    sum ((N + 2)·eps·scale: any summation order passes, a wrong bucket or window does not); grad_x
    bit for bit where a single STE window holds the element. Returns the kernel's results."""
    got = run_kernel(kernel, x, shifts, betas, g)
    eager = run_kernel("eager", x, shifts, betas, g)
    assert torch.equal(got[0], eager[0]), kernel
    assert got[0].dtype == x.dtype and all(a.dtype == b.dtype for a, b in zip(got[1:], eager[1:]))
    truth = reference_grads_float64(x, g, shifts, betas)
    tolerance = (shifts.numel() + 2) * torch.finfo(x.dtype).eps
    scale_x = betas.double().abs().sum() * g.double().abs()
    scale_sums = (betas.double().abs().max() + 1) * g.double().abs().sum()
    for name, expected, scale, *values in zip(("x", "shifts", "betas"), truth, (scale_x, scale_sums, scale_sums),
                                              got[1:], eager[1:]):
        for which, value in zip((kernel, "eager"), values):
            error = (value.double() - expected).abs()
            assert (error <= tolerance * scale + 1e-30).all(), (name, which, error.max().item())
    y = x.flatten().unsqueeze(0) + shifts.view(-1, 1)
    single = ((y >= 0) & (y <= 1)).sum(0) == 1
    assert torch.equal(got[1].flatten()[single], eager[1].flatten()[single]), kernel
    return got
