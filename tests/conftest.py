"""Fixtures: composing abc-run's configs in tmp_path; the hooks behind ``helpers.RunIf``. Shared
helpers are in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

import abc_experiments.config  # noqa: F401  (registers the schema and resolvers)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n (the default, pyproject's addopts): one intra-op thread per worker, here and in the
    # abc-run subprocesses, so that the workers share the cores instead of oversubscribing them
    # (2 workers of 2 threads each on 2 cores ran the quick loop in 375 s; of 1 thread, in 134 s)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "run_if(**conditions): skipped where a condition fails (use helpers.RunIf)")


@pytest.hookimpl(tryfirst=True)  # before -m selects: RunIf(cuda=True) tests are picked by -m cuda
def pytest_collection_modifyitems(items):
    for item in items:
        if any(mark.kwargs.get("cuda") or mark.kwargs.get("min_gpus") for mark in item.iter_markers("run_if")):
            item.add_marker(pytest.mark.cuda)


def pytest_runtest_setup(item):
    """Skip a test whose RunIf conditions fail here, with the first reason (checked once per condition)."""
    from helpers import skip_reason

    for mark in item.iter_markers("run_if"):
        for condition, value in mark.kwargs.items():
            reason = skip_reason(condition, value)
            if reason:
                pytest.skip(reason)


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


def _tiny_run(root, *overrides):
    from helpers import TINY

    from abc_experiments.pipeline import run

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="abc_experiments.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"run_dir={root / 'run'}", f"cache_dir={root / 'cache'}", *TINY, *overrides])
    GlobalHydra.instance().clear()
    run(cfg)
    return root / "run"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One tiny run of resnet20 (its convs have no bias: calibration adds them) on digits."""
    return _tiny_run(tmp_path_factory.mktemp("finished"), "model=resnet20", "finetune.epochs=2", "pretrain.epochs=1")


@pytest.fixture(scope="session")
def confident_run(tmp_path_factory):
    """A tiny seed_cnn run with its hidden FC layer converted too, accurate enough (about 95 %) that
    no test image sits on a near-tie between two classes."""
    return _tiny_run(tmp_path_factory.mktemp("confident"), "abc.linear=true", "finetune.epochs=2")
