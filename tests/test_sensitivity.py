"""abc-sensitivity: per converted layer, accuracy with only it / all but it converted, and its errors."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, read_summary, run_cli
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from abc_experiments.runs import RunError
from abc_experiments.sensitivity import layer_sensitivity, markdown_table

pytestmark = pytest.mark.slow  # tiny abc-runs of seed_cnn, shared by the tests here


@pytest.fixture(scope="module")
def single_layer_run(tmp_path_factory):
    """seed_cnn with the defaults: conv2 is its only converted layer (BatchNorm after it)."""
    from abc_experiments.pipeline import run

    root = tmp_path_factory.mktemp("single")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="abc_experiments.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"run_dir={root / 'run'}", f"cache_dir={root / 'cache'}", *TINY, "finetune.epochs=0"])
    GlobalHydra.instance().clear()
    run(cfg)
    return root / "run"


def test_single_converted_layer_all_but_it_is_exactly_the_fp_model(single_layer_run):
    summary = read_summary(single_layer_run)
    assert summary["conversion"]["report"]["converted"] == ["conv2"]
    result = layer_sensitivity(single_layer_run, progress=False)
    assert [layer.name for layer in result.layers] == ["conv2"]
    (layer,) = result.layers
    # the run's FP model, and the run's conversion + calibration (same batches and seed)
    assert result.fp_acc == summary["fp"]["val_acc"]
    assert result.all_acc == summary["converted"]["val_acc"]
    assert layer.all_but_acc == result.fp_acc  # nothing converted: the FP model itself
    assert layer.only_acc == result.all_acc  # only this layer = every layer here
    assert layer.M == layer.N == 2 and layer.macs > 0 and layer.kind == "ABCConv2d"
    assert 0 < layer.weight_error < 1 and 0 < layer.activation_error < 1 and layer.output_error > 0
    assert result.val_images == summary["fp"]["val_size"] and result.calibration_batches == 2
    assert set(result.kept) == {"conv1", "fc1", "fc2"}


def test_two_layers_one_row_each_in_forward_order_and_reuse_matches_exact_where_it_must(confident_run):
    summary = read_summary(confident_run)
    result = layer_sensitivity(confident_run, progress=False)
    conv2, fc1 = result.layers
    assert [conv2.name, fc1.name] == summary["conversion"]["report"]["converted"] == ["conv2", "fc1"]
    assert result.all_acc == summary["converted"]["val_acc"]
    # all but fc1 is conv2 alone: the layer before the kept one has exactly the fits a fresh calibration gives
    assert fc1.all_but_acc == conv2.only_acc
    exact = layer_sensitivity(confident_run, progress=False, exact=True)
    assert exact.calibration == "exact" and result.calibration == "reuse"
    assert exact.layers[1].all_but_acc == fc1.all_but_acc
    assert exact.layers[0].all_but_acc == fc1.only_acc  # all but conv2, refitted, is fc1 alone
    # errors through depth: fc1 inherits conv2's error
    assert fc1.inherited_error > 0 and fc1.output_error > 0
    assert [row["name"] for row in result.to_dict()["layers"]] == ["conv2", "fc1"]
    table = markdown_table(result)
    assert table.count("\n| 1 | conv2 |") == 1 and table.count("\n| 2 | fc1 |") == 1


def test_fewer_validation_images_and_bad_arguments(confident_run, tmp_path):
    result = layer_sensitivity(confident_run, progress=False, max_val_images=50, batches=1)
    assert result.val_images == 50 and result.calibration_batches == 1 and len(result.layers) == 2
    with pytest.raises(RunError, match="holds no summary.json"):
        layer_sensitivity(tmp_path, progress=False)
    with pytest.raises(ValueError, match="batches=-1"):
        layer_sensitivity(confident_run, batches=-1, progress=False)


def test_cli_writes_json_table_and_plot_and_prints_the_table(single_layer_run, tmp_path):
    result = run_cli([str(single_layer_run), "--no-progress"], cwd=tmp_path, name="abc-sensitivity")
    assert result.returncode == 0, result.stderr
    out = single_layer_run / "sensitivity"
    data = json.loads((out / "sensitivity.json").read_text())
    assert [row["name"] for row in data["layers"]] == ["conv2"]
    assert data["layers"][0]["all_but_acc"] == data["fp_acc"]
    assert (out / "sensitivity.md").read_text() in result.stdout + "\n"
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "conv2 (1/1): only this layer" in result.stderr  # one log line per layer


def test_cli_refuses_a_folder_that_is_not_a_run_with_one_line(tmp_path):
    result = run_cli([str(tmp_path)], cwd=tmp_path, name="abc-sensitivity")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"abc-sensitivity: {tmp_path} holds no summary.json: it is not an abc-run run dir, or the run never started"]
    assert not (tmp_path / "sensitivity").exists()
