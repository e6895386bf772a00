"""Sweeps at scale: multirun + abc-report, failing jobs, launchers, Optuna, DDP, SLURM requeue."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, RunIf, interrupt_at, read_summary_after, run_cli
from matplotlib.image import imread

from abc_experiments.report import main as report_main

PNG = b"\x89PNG\r\n\x1a\n"
# A sweep varies abc.M/abc.N itself; everything else is tiny.
SWEEP_SETTINGS = [o for o in TINY if not o.startswith(("abc.M=", "abc.N="))]

pytestmark = pytest.mark.slow  # every test here starts abc-run in a subprocess (or several)


def summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def test_four_job_sweep_then_abc_report(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "abc.M=1,2", "abc.N=0,2", *SWEEP_SETTINGS, f"hydra.sweep.dir={sweep}",
                      f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = summaries(sweep)
    assert len(jobs) == 4 and all(s["status"] == "finished" for s in jobs.values())
    assert sorted(s["fp_source"].split()[0] for s in jobs.values()) == ["cache", "cache", "cache", "trained"]
    assert all(name.startswith("abc.M=") for name in jobs)  # readable job dirs

    assert report_main([str(sweep)]) == 0
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 4
    assert {"dataset", "model", "M", "N", "finetuned_acc_mean", "fp_acc_mean", "converted_acc_mean",
            "compression_mean", "own_time_s_mean", "test_n", "finetuned_acc_se"} <= set(rows[0])
    assert sorted((r["M"], r["N"]) for r in rows) == [("1", "0"), ("1", "2"), ("2", "0"), ("2", "2")]
    by_key = {(int(r["M"]), int(r["N"])): r for r in rows}
    job_22 = next(s for s in jobs.values() if s["abc"] == {"M": 2, "N": 2, "scope": "per_layer", "layers": {}})
    assert float(by_key[2, 2]["finetuned_acc_mean"]) == pytest.approx(job_22["finetuned"]["acc"])
    markdown = (sweep / "report.md").read_text()
    assert markdown.split("## Results")[1].split("\n## ")[0].count("| digits | seed_cnn |") == 4
    for name in ("accuracy_heatmap.png", "accuracy_vs_size.png"):
        path = sweep / name
        assert path.read_bytes()[:8] == PNG and imread(path).shape[0] > 100


def test_sweep_job_dirs_and_tensorboard_runs_are_named_by_the_swept_keys(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    sweep = tmp_path / "sweep"
    common = [*SWEEP_SETTINGS, "abc.N=1", "finetune.lr=0.002"]  # shared by both jobs: not in their names
    result = run_cli(["-m", "abc.M=1,2", *common, f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}"],
                     cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(summaries(sweep)) == ["abc.M=1", "abc.M=2"]
    assert "abc.M=2  " in result.stdout  # the closing table names the jobs by their dirs
    # what is shared stays on record: in the sweep's multirun.yaml and each job's overrides.yaml
    assert "finetune.lr=0.002" in (sweep / "multirun.yaml").read_text()
    assert "finetune.lr=0.002" in (sweep / "abc.M=2" / ".hydra" / "overrides.yaml").read_text()
    # TensorBoard's run list on the sweep dir: each job's ABC run, short enough to read at a
    # glance, and the FP model they share once (not one identical FP curve per job)
    runs = sorted(EventMultiplexer().AddRunsFromDirectory(str(sweep)).Runs())
    cache_entry = next((tmp_path / "cache" / "pretrain").glob("*.pt")).stem
    assert runs == ["abc.M=1/tb/abc", "abc.M=2/tb/abc", f"tb_fp/{cache_entry}"]
    assert (sweep / "tb_fp" / cache_entry / "claimed_by").read_text().strip() == str(sweep / "abc.M=1")

    # a job of the sweep resumes as a single run in its own dir (the command Ctrl-C would print)
    job = sweep / "abc.M=2"
    before = json.loads((job / "summary.json").read_text())
    resumed = run_cli(["abc.M=2", *common, f'hydra.run.dir="{job}"', "resume=true",
                       f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((job / "summary.json").read_text())
    assert after["status"] == "finished" and after["finetuned"]["acc"] == before["finetuned"]["acc"]
    assert sorted(p.name for p in sweep.iterdir()) == ["abc.M=1", "abc.M=2", "multirun.yaml", "tb_fp"]


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "abc.M=0,1", *SWEEP_SETTINGS, f"hydra.sweep.dir={sweep}",
                      f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, timeout=600)
    # the sweep ran both jobs, then says how many failed, in its last line and its exit status
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == \
        "abc-run: 1 of 2 job(s) failed (see each job's summary.json and log)"
    assert f"abc-report {sweep}" in result.stdout  # the closing table points to the report
    jobs = {s["abc"]["M"]: s for s in summaries(sweep).values()}
    assert jobs[0]["status"] == "failed" and "abc.M=0 is out of range" in jobs[0]["error"]
    assert jobs[1]["status"] == "finished"
    assert report_main([str(sweep)]) == 0
    markdown = (sweep / "report.md").read_text()
    assert "Failed or unfinished" in markdown and "abc.M=0 is out of range" in markdown


@pytest.mark.parametrize("launcher", [
    pytest.param("submitit_local", marks=RunIf(modules=("hydra_plugins.hydra_submitit_launcher",))),
    pytest.param("joblib", marks=RunIf(modules=("hydra_plugins.hydra_joblib_launcher",)))])
def test_launcher_runs_two_jobs_into_one_sweep_dir(tmp_path, launcher):
    result = run_cli(["-m", f"hydra/launcher={launcher}", "abc.M=1,2", *SWEEP_SETTINGS,
                      f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1  # both jobs resolved the launcher's sweep dir
    jobs = summaries(sweeps[0])
    assert sorted(jobs) == ["abc.M=1", "abc.M=2"]  # the jobs' own processes read the swept keys too
    assert sorted(s["abc"]["M"] for s in jobs.values()) == [1, 2]
    assert all(s["status"] == "finished" for s in jobs.values())


@RunIf(modules=("hydra_plugins.hydra_optuna_sweeper",))
def test_optuna_search_maximises_the_returned_validation_accuracy(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["hparams_search=optuna_finetune", "hydra.sweeper.n_trials=2", *SWEEP_SETTINGS,
                      f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = list(summaries(sweep).values())
    assert len(jobs) == 2
    # Optuna writes no multirun.yaml: job dirs fall back to every override, shared ones included
    assert all("finetune.batch_size=128" in name for name in summaries(sweep))
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best
    import yaml

    best_value = yaml.safe_load(best)["best_value"]
    assert best_value == pytest.approx(max(j["finetuned"]["val_acc"] for j in jobs))


def test_slurm_preset_requeues_and_a_requeued_job_resumes(compose_cfg, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="abc_experiments.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.max_num_timeout > 0 and launcher.gpus_per_node == 1 and launcher.array_parallelism > 0


    import abc_experiments.pipeline as pipeline
    settings = TINY + ["pretrain.batch_size=256"]
    interrupt_at(monkeypatch, 3)
    with pytest.raises(pipeline.TrainingInterrupted):
        pipeline.run(compose_cfg(settings))
    monkeypatch.undo()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets in a requeued job
    resumed = read_summary_after(pipeline.run, compose_cfg(settings), tmp_path / "run")
    assert resumed["status"] == "finished"
    assert resumed["resumed_from"] == [{"stage": "pretrain", "epoch": 1, "step": 3}]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, gloo, 2 CPU processes with batch 64 each against 1 process with batch 128.

    Tolerance: 5 accuracy points. The runs differ legitimately: BatchNorm statistics are per
    process (no SyncBatchNorm) and the sharded epoch is padded to an even length. Fine-tuning
    re-estimates the BatchNorm statistics before each validation (finetune.precise_bn: each rank on
    its shard, then averaged over the ranks)."""
    common = [o for o in TINY if "batch_size" not in o] + ["pretrain.epochs=3", "finetune.epochs=2",
                                                           "finetune.precise_bn=2"]
    single = run_cli([*common, "pretrain.batch_size=128", "finetune.batch_size=128",
                      f"hydra.run.dir={tmp_path / 'single'}", f"cache_dir={tmp_path / 'c1'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "abc_experiments.cli",
                          *common, "pretrain.batch_size=64", "finetune.batch_size=64", f"cache_dir={tmp_path / 'c2'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(run_dirs) == 1  # every rank agreed on one run dir
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    reference = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    # each rank trained on its half and the counts were summed: one pass over the 1,294 digits
    assert [record["train_samples"] for record in summary["finetuned"]["history"]] == [1294, 1294]
    assert len(list((run_dirs[0] / "tb" / "abc").glob("events.*"))) >= 1
    assert len(list((tmp_path / "c2" / "pretrain").glob("*.pt"))) == 1
    for stage in ("fp", "converted", "finetuned"):
        assert abs(summary[stage]["acc"] - reference[stage]["acc"]) <= 5.0, (stage, summary[stage], reference[stage])
