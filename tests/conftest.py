"""Fixtures: composing abc-run's configs in tmp_path. Shared helpers are in helpers.py."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

import abc_experiments.config  # noqa: F401  (registers the schema and resolvers)


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
