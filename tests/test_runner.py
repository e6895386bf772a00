"""abc-run end to end on the bundled digits: run dir, summary.json, TensorBoard, cache, resume, errors."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    CONF,
    TINY,
    cli_command,
    interrupt_at,
    read_summary,
    read_summary_after,
    results,
    run_cli,
    tree_bytes,
)
from hydra.errors import ConfigCompositionException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

import abc_experiments.pipeline as pipeline
from abc_experiments import tb
from abc_experiments.checkpoints import CheckpointError, ResumeRefusedError
from abc_experiments.config import ConfigError, validate
from abc_experiments.pipeline import run

EPOCH_TAGS = set(tb.EPOCH_TAGS.values())


def untimed(history: list[dict]) -> list[dict]:
    """Epoch records without the throughput, which depends on the machine's load."""
    return [{k: v for k, v in record.items() if k != "images_per_s"} for record in history]


def event_tags(event_dir: Path) -> set[str]:
    """Every summary tag in the event files, including those EventAccumulator does not list."""
    return {value.tag for path in event_dir.glob("events.*") for event in EventFileLoader(str(path)).Load()
            for value in event.summary.value}


def test_run_writes_summary_checkpoints_and_tensorboard(compose_cfg, tmp_path):
    metric = run(compose_cfg(TINY))
    run_dir = tmp_path / "run"
    summary = read_summary(run_dir)
    assert summary["status"] == "finished"
    assert metric == summary["finetuned"]["val_acc"]
    for stage in ("fp", "converted", "finetuned"):
        assert 0 <= summary[stage]["acc"] <= 100 and summary[stage]["loss"] > 0
    assert summary["abc"] == {"M": 2, "N": 2, "scope": "per_layer", "layers": {}}
    assert summary["gaps"]["finetuned"] == pytest.approx(summary["fp"]["acc"] - summary["finetuned"]["acc"])
    assert [layer["name"] for layer in summary["layers"]] == ["conv2"]
    assert 0 < summary["layers"][0]["weight_error"] < 1 and 0 < summary["layers"][0]["activation_error"] < 1
    assert summary["size"]["compression"] > 1
    assert set(summary["wall_time_s"]) == {"pretrain", "convert", "finetune", "total"}
    assert summary["config"]["abc"]["M"] == 2 and summary["fp_source"] == "trained"
    # accuracy on 359 held-out digits is well above chance even after 2 tiny epochs
    assert summary["fp"]["acc"] > 50 and summary["finetuned"]["acc"] > 50
    assert summary["fp"]["test_size"] == 359 and summary["finetuned"]["val_size"] == 144
    assert summary["images_per_s"]["pretrain"] > 0 and summary["images_per_s"]["finetune"] > 0
    # TensorBoard: one dir per stage, same tags, one scalar per alpha/beta/shift, text and hparams
    fp_events = EventAccumulator(str(run_dir / "tb" / "fp")).Reload()
    assert EPOCH_TAGS | {tb.TEST_ACC} <= set(fp_events.Tags()["scalars"])
    abc_events = EventAccumulator(str(run_dir / "tb" / "abc")).Reload()
    abc_scalars = set(abc_events.Tags()["scalars"])
    assert EPOCH_TAGS | {tb.TEST_ACC, tb.FP_TEST_ACC, tb.GAP_TO_FP} <= abc_scalars
    # the comparison sorts first: accuracy, then loss, before any per-layer parameter
    groups = [tag.split("/")[0] for tag in sorted(abc_scalars)]
    assert groups[:8] == ["1_accuracy"] * 3 + ["2_vs_fp"] * 2 + ["3_loss"] * 3
    # one x axis, epochs since initialisation: FP 1..2, ABC from 2 (converted) to 2 + 1 fine-tuning epoch
    assert [e.step for e in fp_events.Scalars(tb.EPOCH_TAGS["val_acc"])] == [1, 2]
    assert [e.step for e in fp_events.Scalars(tb.TEST_ACC)] == [2]
    assert [e.value for e in fp_events.Scalars(tb.TEST_ACC)] == [pytest.approx(summary["fp"]["acc"])]
    assert [e.step for e in abc_events.Scalars(tb.EPOCH_TAGS["val_acc"])] == [2, 3]
    assert [e.step for e in abc_events.Scalars("alphas/conv2/0")] == [2, 3]
    test_points = abc_events.Scalars(tb.TEST_ACC)
    assert [(e.step, e.value) for e in test_points] == [
        (2, pytest.approx(summary["converted"]["acc"])), (3, pytest.approx(summary["finetuned"]["acc"]))]
    assert [e.value for e in abc_events.Scalars(tb.GAP_TO_FP)] == [
        pytest.approx(summary["gaps"]["converted"]), pytest.approx(summary["gaps"]["finetuned"])]
    assert [e.value for e in abc_events.Scalars(tb.FP_TEST_ACC)] == [pytest.approx(summary["fp"]["acc"])] * 2
    assert {"alphas/conv2/0", "alphas/conv2/1", "betas/conv2/1", "shifts/conv2/1"} <= abc_scalars
    assert not abc_events.Tags()["histograms"]
    assert "abc/layers/text_summary" in abc_events.Tags()["tensors"]
    # the HParams dashboard reads the per-epoch tags: no single-point charts in Scalars
    assert not any(tag.startswith("hparam") for tag in abc_scalars)
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= event_tags(run_dir / "tb" / "abc")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        abc_events.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics[:3] == [tb.TEST_ACC, tb.FP_TEST_ACC, tb.GAP_TO_FP] and set(metrics) <= abc_scalars
    # checkpoints load with weights_only=True
    for name in ("pretrain_last.pt", "pretrain_best.pt", "finetune_last.pt", "finetune_best.pt"):
        assert isinstance(torch.load(run_dir / "checkpoints" / name, weights_only=True), dict)
    assert next((tmp_path / "cache" / "pretrain").glob("seed_cnn-digits-*.pt")).is_file()


@pytest.mark.slow
def test_same_seed_same_numbers_and_the_cache_is_reused(compose_cfg, tmp_path):
    first = read_summary_after(run, compose_cfg(TINY + ["seed=3"], run_dir=tmp_path / "a"), tmp_path / "a")
    second = read_summary_after(run, compose_cfg(TINY + ["seed=3"], run_dir=tmp_path / "b"), tmp_path / "b")
    assert second["fp_source"].startswith("cache")
    assert results(first) == results(second)
    retrained = read_summary_after(run, compose_cfg(TINY + ["seed=3", "pretrain.reuse=false"], run_dir=tmp_path / "c"),
                                   tmp_path / "c")
    assert retrained["fp_source"] == "trained" and results(retrained) == results(first)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs_on_the_cpu_and_is_recorded(compose_cfg, tmp_path, precision):
    run(compose_cfg(TINY + [f"precision={precision}", "channels_last=true"]))
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "finished" and summary["precision"] == precision
    assert summary["config"]["channels_last"] is True
    assert summary["fp"]["acc"] > 50 and summary["finetuned"]["acc"] > 50
    # the cached FP model depends on the precision it was trained in
    run(compose_cfg(TINY, run_dir=tmp_path / "fp32"))
    assert read_summary(tmp_path / "fp32")["fp_source"] == "trained"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_validates(compose_cfg, preset):
    cfg = compose_cfg([f"experiment={preset}"])
    validate(cfg)
    assert cfg.experiment == preset


@pytest.mark.parametrize("override,key", [
    ("abc.M=five", "abc.M"),
    ("abc.scope=per_pixel", "abc.scope"),  # choices are Enum fields: one mechanism, at compose time
    ("dataset.name=svhn", "dataset.name"),
    ("finetune.optimizer=adamw", "finetune.optimizer"),
    ("pretrain.schedule=linear", "pretrain.schedule"),
    ("precision=fp8", "precision"),
])
def test_type_and_choice_errors_are_rejected_when_composing(compose_cfg, override, key):
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg([override])
    assert f"full_key: {key}" in str(error.value.__cause__) and "expected" in str(error.value.__cause__) \
        or key == "abc.M"


@pytest.mark.parametrize("override,message", [
    ("abc.M=0", "abc.M=0 is out of range"),
    ("abc.N=-1", "abc.N=-1 is out of range"),
    ("finetune.lr=0", "finetune.lr=0.0 is out of range"),
    ("pretrain.epochs=0", "pretrain.epochs=0 skips FP training"),
    ("+model.options.pretrained=true", "model seed_cnn does not take option(s) pretrained"),
    ("finetune.weight_decay=-1", "finetune.weight_decay=-1.0 is out of range"),
    ("finetune.schedule=step finetune.step_size=0", "finetune.step_size=0 is out of range"),
    ("finetune.schedule=step finetune.gamma=-0.5", "finetune.gamma=-0.5 is out of range"),
    ("abc.exclude=[*]", "abc: nothing to convert in model=seed_cnn"),
])
def test_range_errors_are_config_errors_before_training(compose_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        run(compose_cfg(TINY + override.split()))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing trained or written


@pytest.mark.slow
def test_cli_bad_values_give_one_message_and_no_traceback(tmp_path):
    for override, expected in (("abc.M=five", "abc.M"), ("abc.M=0", "abc.M=0 is out of range")):
        result = run_cli([override], cwd=tmp_path)
        assert result.returncode != 0
        assert expected in result.stderr + result.stdout
        assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs" / "cache").exists()  # nothing trained


@pytest.mark.slow
def test_cli_missing_dataset_offline(tmp_path):
    result = run_cli(["dataset=mnist", f"data.root={tmp_path / 'nodata'}", "data.download=false",
                      "hydra.run.dir=" + str(tmp_path / "run")], cwd=tmp_path)
    output = result.stderr + result.stdout
    assert result.returncode == 1 and "Traceback" not in output
    assert "train-images-idx3-ubyte" in output and str(tmp_path / "nodata") in output
    assert not (tmp_path / "run").exists()  # failed before anything ran: no run dir left behind


@pytest.mark.slow
def test_corrupt_and_mismatched_checkpoints_give_one_clear_error(compose_cfg, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    result = run_cli(TINY + [f"pretrain.checkpoint={corrupt}", "hydra.run.dir=" + str(tmp_path / "r1")], cwd=tmp_path)
    output = result.stderr + result.stdout
    assert result.returncode == 1 and "Traceback" not in output
    assert f"pretrain.checkpoint {corrupt} is not a readable torch checkpoint" in output
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"model": torch.nn.Linear(3, 3).state_dict()}, mismatched)
    with pytest.raises(CheckpointError, match="does not fit the SeedCNN"):
        run(compose_cfg(TINY + [f"pretrain.checkpoint={mismatched}"]))


@pytest.mark.slow
def test_nan_loss_stops_with_the_stage_and_step(tmp_path):
    result = run_cli(TINY + ["pretrain.lr=1e30", "pretrain.optimizer=sgd", "hydra.run.dir=" + str(tmp_path / "run")],
                     cwd=tmp_path)
    output = result.stderr + result.stdout
    assert result.returncode == 1 and "Traceback" not in output
    assert "the pretrain loss became" in output and "epoch 1, step" in output
    assert "checkpoint" not in output.split("the pretrain loss became")[1].splitlines()[0]  # none saved yet
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and "TrainingDiverged" in summary["error"]


@pytest.mark.slow
# 1,294 training digits in batches of 256: 6 steps per epoch, 12 per stage. The FP model's hook is
# deep-copied into the ABC model, so step 5 falls in pretraining and step 14 in fine-tuning.
@pytest.mark.parametrize("steps", [5, 14])
def test_interrupt_and_resume_equals_an_uninterrupted_run(compose_cfg, tmp_path, monkeypatch, steps):
    settings = TINY + ["pretrain.batch_size=256", "finetune.batch_size=256", "finetune.epochs=2"]
    reference = read_summary_after(run, compose_cfg(settings + ["cache_dir=" + str(tmp_path / "c1")],
                                                    run_dir=tmp_path / "ref"), tmp_path / "ref")
    interrupt_at(monkeypatch, steps)
    cfg = compose_cfg(settings + ["cache_dir=" + str(tmp_path / "c2")], run_dir=tmp_path / "int")
    with pytest.raises(pipeline.TrainingInterrupted):
        run(cfg)
    assert read_summary(tmp_path / "int")["status"] == "interrupted"
    monkeypatch.undo()
    resumed = read_summary_after(run, compose_cfg(settings + ["cache_dir=" + str(tmp_path / "c2"), "resume=true"],
                                                  run_dir=tmp_path / "int"), tmp_path / "int")
    assert resumed["status"] == "finished"
    stage, step = ("pretrain", 5) if steps == 5 else ("finetune", 2)
    assert resumed["resumed_from"] == [{"stage": stage, "epoch": 1, "step": step}]  # not a restart
    assert results(resumed) == results(reference)
    assert untimed(resumed["finetuned"]["history"]) == untimed(reference["finetuned"]["history"])


@pytest.mark.slow
def test_cli_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    command = cli_command()
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command + TINY + ["pretrain.epochs=200", "pretrain.batch_size=8",
                                                 f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "pretrain_last.pt"
    for _ in range(600):
        if last.exists() or process.poll() is not None:
            break
        subprocess.run(["sleep", "0.1"])
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "resume=true" in output and "Traceback" not in output
    assert torch.load(last, weights_only=True)["stage"] == "pretrain"
    assert read_summary(run_dir)["status"] == "interrupted"


@pytest.mark.slow
def test_multirun_pretrains_once_for_all_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    settings = [o for o in TINY if not o.startswith("abc.M=")]
    result = run_cli(["-m", "abc.M=1,2", *settings, f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(name.split(",")[0] for name in summaries) == ["abc.M=1", "abc.M=2"]  # readable job dirs
    sources = sorted(s["fp_source"].split()[0] for s in summaries.values())
    assert sources == ["cache", "trained"]
    assert len({s["fp"]["acc"] for s in summaries.values()}) == 1
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.pt"))) == 1


@pytest.mark.slow
def test_concurrent_launches_get_their_own_dirs_and_share_one_cache(tmp_path):
    command = cli_command()
    processes = [subprocess.Popen(command + TINY + [f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    run_dirs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(run_dirs) == 2
    sources = sorted(read_summary(d)["fp_source"].split()[0] for d in run_dirs)
    assert sources == ["cache", "trained"]
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.pt"))) == 1


def test_resume_with_other_settings_is_refused(compose_cfg, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 3)
    with pytest.raises(pipeline.TrainingInterrupted):
        run(compose_cfg(TINY))
    monkeypatch.undo()
    before = tree_bytes(tmp_path / "run")
    with pytest.raises(ResumeRefusedError, match=r"run with other settings \(pretrain.lr: 0.001 -> 0.01\)"):
        run(compose_cfg(TINY + ["resume=true", "pretrain.lr=0.01"]))
    assert tree_bytes(tmp_path / "run") == before  # refused before anything was written
    assert read_summary(tmp_path / "run")["status"] == "interrupted"


def test_long_override_lists_still_get_distinct_job_dirs():
    from abc_experiments.rundirs import readable as _readable

    long = "abc.exclude=[" + ",".join(f"layer{i}" for i in range(40)) + "]"
    names = {_readable(f"{long},seed={seed}") for seed in (0, 1)}
    assert len(names) == 2 and all(len(name) <= 120 for name in names)
    assert _readable("abc.M=3,abc.N=5") == "abc.M=3,abc.N=5"
