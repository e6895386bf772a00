"""abc-sensitivity: per converted layer, accuracy with only it / all but it converted, and its errors."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, read_summary, run_cli
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from abc_experiments.runs import RunError
from abc_experiments.sensitivity import LayerSensitivity, Sensitivity, layer_sensitivity, markdown_table
from abc_experiments.sensitivity.budget import propose_assignment

slow = pytest.mark.slow  # the tests on tiny abc-runs of seed_cnn (shared through module fixtures)


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


@slow
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
    assert layer.all_but_loss == result.fp_loss == summary["fp"]["val_loss"]  # the losses too, exactly
    assert layer.only_loss == result.all_loss == summary["converted"]["val_loss"]
    assert layer.M == layer.N == 2 and layer.macs > 0 and layer.kind == "ABCConv2d"
    assert 0 < layer.weight_error < 1 and 0 < layer.activation_error < 1 and layer.output_error > 0
    assert result.val_images == summary["fp"]["val_size"] and result.calibration_batches == 2
    assert set(result.kept) == {"conv1", "fc1", "fc2"}


@slow
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


@slow
def test_fewer_validation_images_and_bad_arguments(confident_run, tmp_path):
    result = layer_sensitivity(confident_run, progress=False, max_val_images=50, batches=1)
    assert result.val_images == 50 and result.calibration_batches == 1 and len(result.layers) == 2
    with pytest.raises(RunError, match="holds no summary.json"):
        layer_sensitivity(tmp_path, progress=False)
    with pytest.raises(ValueError, match="batches=-1"):
        layer_sensitivity(confident_run, batches=-1, progress=False)


@slow
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

    proposed = run_cli([str(single_layer_run), "--budget", "1"], cwd=tmp_path, name="abc-sensitivity")
    assert proposed.returncode == 0, proposed.stderr
    assert "using the measurements in" in proposed.stderr and "| conv2 |" not in proposed.stdout  # not measured again
    override = proposed.stdout.strip().splitlines()[-1]
    assert override.startswith("'abc.layers={conv2: {M: ") and override.endswith("}}'")
    refused = run_cli([str(single_layer_run), "--budget", "0.01"], cwd=tmp_path, name="abc-sensitivity")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith(
        "abc-sensitivity: --budget 0.01 is below the least possible cost, 0.250 x the run's")


@slow
def test_cli_refuses_a_folder_that_is_not_a_run_with_one_line(tmp_path):
    result = run_cli([str(tmp_path)], cwd=tmp_path, name="abc-sensitivity")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"abc-sensitivity: {tmp_path} holds no summary.json: it is not an abc-run run dir, or the run never started"]
    assert not (tmp_path / "sensitivity").exists()


# ---- --budget: per-layer bases from the sensitivities (no run needed) ------------------------------
def _measured(layers, fp_acc=90.0, all_acc=70.0, M=3, N=3, losses=None):
    """``losses``: (fp, all, {name: added loss}) for measurements that kept the losses."""
    rows = [LayerSensitivity(name=name, kind="ABCConv2d", M=M, N=N, macs=macs, weight_error=0.4,
                             activation_error=0.3 if N else None, output_error=0.5, inherited_error=0.2,
                             only_acc=fp_acc - drop, all_but_acc=all_acc + drop) for name, macs, drop in layers]
    fp_loss = all_loss = None
    if losses is not None:
        fp_loss, all_loss, added = losses
        for row in rows:
            row.only_loss, row.all_but_loss = fp_loss + added[row.name], all_loss - added[row.name]
    return Sensitivity(run_dir="run", model="m", dataset="d", M=M, N=N, fp_acc=fp_acc, all_acc=all_acc,
                       fp_loss=fp_loss, all_loss=all_loss, val_images=100, calibration_batches=2,
                       calibration="reuse", fp_source="trained", layers=rows)


def _cost(assignment, result):
    return sum(M * max(N, 1) * layer.macs for layer, (M, N) in zip(result.layers, assignment.layers.values()))


def test_budget_gives_the_sensitive_layer_more_bases_within_the_budget():
    result = _measured([("a", 1000, 0.0), ("b", 1000, 8.0), ("c", 4000, 1.0)])
    run_cost = 9 * (1000 + 1000 + 4000)
    for budget in (0.5, 1.0, 2.0):
        assignment = propose_assignment(result, budget)
        assert list(assignment.layers) == ["a", "b", "c"]
        assert _cost(assignment, result) <= budget * run_cost
        assert assignment.relative_cost == pytest.approx(_cost(assignment, result) / run_cost)
        assert assignment.relative_cost > budget - 0.1  # the budget is used, not left over
        (Ma, Na), (Mb, Nb) = assignment.layers["a"], assignment.layers["b"]
        assert Mb * Nb > Ma * Na  # same MACs and errors: the sensitive one gets more
    with pytest.raises(ValueError, match="below the least possible cost, 0.111 x"):
        propose_assignment(result, 0.1)
    with pytest.raises(ValueError, match="positive"):
        propose_assignment(result, 0)


def test_budget_ranks_layers_by_the_validation_loss_when_measured():
    # the accuracies (a few hundred images: steps of noise) say "a"; the losses say "b"
    layers = [("a", 1000, 3.0), ("b", 1000, 0.0)]
    def bases(assignment, name):
        M, N = assignment.layers[name]
        return M * N

    by_accuracy = propose_assignment(_measured(layers), 1.0)
    assert by_accuracy.measure == "validation accuracy" and bases(by_accuracy, "a") > bases(by_accuracy, "b")
    result = _measured(layers, losses=(0.5, 1.5, {"a": 0.05, "b": 0.4}))
    by_loss = propose_assignment(result, 1.0)
    assert by_loss.measure == "validation loss" and "from the validation loss" in by_loss.table()
    assert bases(by_loss, "b") > bases(by_loss, "a")
    # in accuracy points at the whole model's rate: 20 points per nat here, (0.4 + 0.4) / 2 * 20 + 0.1
    assert by_loss.sensitivity == pytest.approx({"a": 0.05 * 20 + 0.1, "b": 0.4 * 20 + 0.1})
    # a conversion that added no loss gives no rate: the accuracies decide
    assert propose_assignment(_measured(layers, losses=(0.5, 0.5, {"a": 0.0, "b": 0.0})), 1.0).measure \
        == "validation accuracy"


def test_budget_keeps_weight_only_layers_weight_only_and_caps_the_bases():
    result = _measured([("a", 10, 1.0), ("b", 10, 2.0)], M=2, N=0)
    assignment = propose_assignment(result, 100, max_bases=5)
    assert assignment.layers == {"a": (5, 0), "b": (5, 0)}


def test_budget_override_is_a_hydra_override_of_abc_layers():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    result = _measured([("layer1.0.conv1", 1000, 2.0), ("layer1.0.conv2", 1000, 0.5)])
    assignment = propose_assignment(result, 1.0)
    text = assignment.override()
    assert text[0] == text[-1] == "'"  # quoted for the shell
    (override,) = OverridesParser.create().parse_overrides([text[1:-1]])
    assert override.key_or_group == "abc.layers"
    assert override.value() == {name: {"M": M, "N": N} for name, (M, N) in assignment.layers.items()}


def test_sensitivity_json_round_trip():
    result = _measured([("a", 10, 1.0)])
    data = result.to_dict()
    assert data["layers"][0]["only_drop"] == 1.0 and data["layers"][0]["all_but_gain"] == 1.0
    assert Sensitivity.from_dict(data) == result


def test_a_run_of_an_unofficial_copy_reads_it_again(tmp_path):
    """A run with data.verify=false (a subset or relabelled copy of CIFAR-10) is measured on the
    same files: the run's data.verify reaches the loaders (it was dropped, and the MD5 check refused
    the folder the run had trained on)."""
    from fake_datasets import write_fake_cifar
    from omegaconf import OmegaConf

    from abc_experiments.sensitivity.measure import _loaders

    write_fake_cifar(tmp_path, n_train=40, n_test=12)
    config = OmegaConf.create({
        "dataset": {"name": "cifar10"}, "seed": 0,
        "data": {"root": str(tmp_path), "download": False, "val_fraction": 0.25, "num_workers": 0, "verify": False},
        "finetune": {"batch_size": 8, "eval_batch_size": 8}})
    splits, val, _ = _loaders(config, "cpu", None)
    assert len(splits.train) + len(splits.val) == 40 and len(splits.test) == 12
    config.data.verify = True
    with pytest.raises(Exception, match="data.verify=false"):
        _loaders(config, "cpu", None)
