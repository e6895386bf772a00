"""Sweep job dir names (abc_experiments/rundirs.py: job_subdir) without running a job: the swept
overrides only, and the full name whenever the swept keys cannot be told. The end-to-end sweep is
test_sweeps.py's test_sweep_job_dirs_and_tensorboard_runs_are_named_by_the_swept_keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from abc_experiments.rundirs import job_subdir, readable

COMMON = ["pretrain.epochs=2", "progress=false", "data.root=/data/my digits"]


def write_multirun(sweep: Path, task: list[str], params: dict | None = None) -> Path:
    """The part of the multirun.yaml Hydra's basic sweeper writes that job_subdir reads."""
    sweep.mkdir(parents=True, exist_ok=True)
    OmegaConf.save({"hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}}, sweep / "multirun.yaml")
    return sweep


def jobs_of(task: list[str], params: dict | None = None) -> list[list[str]]:
    """Each job's overrides as Hydra's basic sweeper makes them (params first, then the command line)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + task
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(lines), None)[0]


def dirname(job: list[str]) -> str:
    """hydra.job.override_dirname of a job (none of these keys is excluded)."""
    return ",".join(sorted(job))


def names(sweep: Path, task: list[str], params: dict | None = None) -> list[str]:
    return [job_subdir(num, dirname(job), job, str(sweep)) for num, job in enumerate(jobs_of(task, params))]


def test_job_dirs_hold_the_swept_overrides_only(tmp_path):
    task = ["abc.M=1,3", "abc.N=1,3", *COMMON]
    sweep = write_multirun(tmp_path / "sweep", task)
    assert names(sweep, task) == ["abc.M=1,abc.N=1", "abc.M=1,abc.N=3", "abc.M=3,abc.N=1", "abc.M=3,abc.N=3"]


def test_sweeper_params_count_and_a_command_line_value_replaces_one(tmp_path):
    # abc.N swept by hydra.sweeper.params; abc.M listed there too but fixed on the command line
    params = {"abc.N": "0,2", "abc.M": "1,3"}
    task = ["abc.M=5", "seed=range(2)", *COMMON]
    sweep = write_multirun(tmp_path / "sweep", task, params)
    assert names(sweep, task, params) == ["abc.N=0,seed=0", "abc.N=0,seed=1", "abc.N=2,seed=0", "abc.N=2,seed=1"]


def test_swept_values_with_commas_and_spaces_still_give_distinct_dirs(tmp_path):
    task = ["abc.exclude=[conv1,fc],[fc]", "data.root='/a b','/c,d'", "pretrain.epochs=2"]
    sweep = write_multirun(tmp_path / "sweep", task)
    found = names(sweep, task)
    assert len(set(found)) == 4 and not any("pretrain.epochs" in name for name in found)
    assert all("/" not in name for name in found)


def test_long_swept_overrides_are_cut_with_a_hash(tmp_path):
    layers = ",".join(f"layer{i}" for i in range(40))
    task = [f"abc.exclude=[{layers}],[{layers},extra]", *COMMON]
    sweep = write_multirun(tmp_path / "sweep", task)
    found = names(sweep, task)
    assert len(set(found)) == 2 and all(len(name) <= 120 and "~" in name for name in found)


@pytest.mark.parametrize("case", ["no multirun.yaml", "unparsable override", "not yaml", "nothing swept",
                                  "a key the sweep lacks", "another shared value", "old two-argument form"])
def test_the_full_name_when_the_swept_keys_cannot_be_told(tmp_path, case):
    task = ["abc.M=1,3", *COMMON]
    job = ["abc.M=3", *COMMON]
    sweep = tmp_path / "sweep"
    if case != "no multirun.yaml":
        write_multirun(sweep, task)
    if case == "unparsable override":
        write_multirun(sweep, ["abc.M=[1,3", *COMMON])
    elif case == "not yaml":
        (sweep / "multirun.yaml").write_text("hydra: [unclosed\n")
    elif case == "nothing swept":
        write_multirun(sweep, ["abc.M=3", *COMMON])
    elif case == "a key the sweep lacks":  # e.g. a key an Optuna sweeper samples, beside a stale file
        job = [*job, "finetune.lr=0.01"]
    elif case == "another shared value":
        job = ["abc.M=3", "pretrain.epochs=5", *COMMON[1:]]
    if case == "old two-argument form":  # a .hydra/hydra.yaml written before the swept names
        assert job_subdir(4, dirname(job)) == readable(dirname(job))
        return
    assert job_subdir(4, dirname(job), job, str(sweep)) == readable(dirname(job))


def test_no_overrides_at_all_gives_job_num(tmp_path):
    assert job_subdir(7, "", [], str(tmp_path)) == "job7"
    assert job_subdir(7, "", None, None) == "job7"
