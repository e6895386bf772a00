"""Reopening a finished run: load_run and abc-eval reproduce its numbers; bad run dirs say why."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, read_summary, run_cli

from abc_experiments import load_run
from abc_experiments.nn import abc_layers
from abc_experiments.pipeline import run
from abc_experiments.runs import RunError, evaluate_run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny run of resnet20 (its convs have no bias: calibration adds them) on digits."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    root = tmp_path_factory.mktemp("finished")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="abc_experiments.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"run_dir={root / 'run'}", f"cache_dir={root / 'cache'}", *TINY, "model=resnet20",
            "finetune.epochs=2", "pretrain.epochs=1"])
    GlobalHydra.instance().clear()
    run(cfg)
    return root / "run"


def test_load_run_and_abc_eval_reproduce_the_finetuned_accuracy_exactly(finished_run):
    summary = read_summary(finished_run)
    model = load_run(finished_run)
    assert not model.training and any(layer.bias_added for _, layer in abc_layers(model))
    result = evaluate_run(finished_run)
    assert result["acc"] == summary["finetuned"]["acc"] and result["loss"] == pytest.approx(summary["finetuned"]["loss"])
    assert result["images"] == summary["finetuned"]["test_size"] == 359 and result["images_per_s"] > 0
    last = load_run(finished_run, which="last")
    assert set(last.state_dict()) == set(model.state_dict())


@pytest.mark.slow
def test_abc_eval_command_prints_accuracy_loss_and_throughput(finished_run, tmp_path):
    summary = read_summary(finished_run)
    result = run_cli([str(finished_run)], cwd=tmp_path, name="abc-eval")
    assert result.returncode == 0, result.stderr
    assert f"test accuracy {summary['finetuned']['acc']:.2f}%" in result.stdout
    assert "images/s" in result.stdout and "loss" in result.stdout


def test_load_run_errors_name_what_is_wrong(finished_run, tmp_path):
    with pytest.raises(RunError, match="is not a directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(RunError, match="holds no summary.json"):
        load_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    with pytest.raises(RunError, match="is corrupt"):
        load_run(broken)
    failed = tmp_path / "failed"
    failed.mkdir()
    summary = json.loads((finished_run / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**summary, "status": "failed", "error": "boom"}))
    with pytest.raises(RunError, match="is a failed run, not a finished one.*boom"):
        load_run(failed)
    (failed / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(RunError, match="finetuned.pt does not exist"):
        load_run(failed)
    (failed / "checkpoints").mkdir()
    (failed / "checkpoints" / "finetuned.pt").write_bytes(b"garbage")
    with pytest.raises(RunError, match="not a readable torch checkpoint"):
        load_run(failed)
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, failed / "checkpoints" / "finetuned.pt")
    with pytest.raises(RunError, match="does not fit the model"):
        load_run(failed)
    with pytest.raises(ValueError, match="which='worst'"):
        load_run(finished_run, which="worst")
