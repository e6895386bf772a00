"""A non-editable install ships the configs: abc-run composes from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds and installs a wheel with pip in a subprocess


def test_wheel_ships_every_config_and_the_installed_copy_finds_them(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("abc_experiments-*.whl"))
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    expected = {f"abc_experiments/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
                for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and expected == shipped

    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    composed = subprocess.run([sys.executable, "-m", "abc_experiments.cli", "--cfg", "job",
                               "experiment=cifar10_resnet20", "abc.M=4"], cwd=elsewhere, env=env,
                              capture_output=True, text=True)
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "name: resnet20" in composed.stdout and "M: 4" in composed.stdout
    located = subprocess.run([sys.executable, "-c", "import abc_experiments; print(abc_experiments.__file__)"],
                             cwd=elsewhere, env=env, capture_output=True, text=True)
    assert located.stdout.startswith(str(target))  # the installed copy, not the checkout
