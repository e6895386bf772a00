"""Shared fixtures: composing abc-run's configs and running the CLI on tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

import abc_experiments.config  # noqa: F401  (registers the schema and resolvers)

# The smallest useful run on the bundled digits: seconds on a CPU.
TINY = [
    "pretrain.epochs=2", "finetune.epochs=1", "abc.M=2", "abc.N=2", "abc.calibration.batches=2",
    "pretrain.batch_size=128", "finetune.batch_size=128", "progress=false", "device=cpu",
]


@pytest.fixture
def compose_cfg(tmp_path):
    """compose(overrides) -> a config whose run dir and cache live in tmp_path."""

    def _compose(overrides=(), run_dir=None):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="abc_experiments.conf", version_base="1.3"):
            return compose(config_name="config", overrides=[
                f"run_dir={run_dir or tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *overrides])

    yield _compose
    GlobalHydra.instance().clear()


def cli_command() -> list[str]:
    """How to start ``abc-run``: the console script installed next to this Python, if there."""
    script = Path(sys.executable).parent / "abc-run"
    return [str(script)] if script.exists() else [sys.executable, "-m", "abc_experiments.cli"]


def run_cli(args, cwd, timeout=300, env=None):
    """``abc-run ARGS`` in a subprocess."""
    command = cli_command()
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update(env or {})
    return subprocess.run(command + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environment)
