"""Helpers shared by the test modules: tiny run settings, running ``abc-run`` in a subprocess,
reading what a run wrote, and interrupting a run mid-stage. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
