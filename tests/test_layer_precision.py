"""Per-layer precision (``abc.layers``): overrides reach the right layers, bad patterns and values
are refused before anything trains, and the summary, TensorBoard hparams, load_run, abc-export,
the packed file and abc-report carry each layer's M and N."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import TINY, read_summary
from hydra.errors import ConfigCompositionException
from report_helpers import read_csv, write_typed_job
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from abc_experiments import report
from abc_experiments.config import ConfigError, validate
from abc_experiments.models import build_model
from abc_experiments.nn import LayerPrecisionError, abc_layers, convert, plan_conversion, summary
from abc_experiments.results import RunSummary
from abc_experiments.settings import flat_settings, format_layer_precision

M, N = 2, 2  # the global values of TINY
# seed_cnn converts conv2 by default and fc1 with abc.linear=true (conv1 and fc2 stay FP).
SEED_CNN_LAYERS = "abc.layers={conv2: {M: 4, N: 1}}"


def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", in_channels=3, image_size=32, num_classes=10)


def precisions(model) -> dict[str, tuple[int, int]]:
    return {name: (layer.M, layer.N) for name, layer in abc_layers(model)}


# ---- conversion ---------------------------------------------------------------------------------
def test_overrides_reach_exactly_the_layers_they_match():
    model = resnet20()
    report_ = convert(model, M, N, layers={"layer1.*": {"M": 5}, "layer3.2.conv2": {"M": 1, "N": 1},
                                           "layer2.0.conv?": {"N": 0}})
    got = precisions(model)
    assert len(got) == 20  # every inner conv and downsample; conv1 and fc stay FP
    for name, (m, n) in got.items():
        if name.startswith("layer1."):
            assert (m, n) == (5, N), name  # N omitted: the global value
        elif name == "layer3.2.conv2":
            assert (m, n) == (1, 1)
        elif name in ("layer2.0.conv1", "layer2.0.conv2"):
            assert (m, n) == (M, 0)  # weight-only: N = 0 is full-precision activations
        else:
            assert (m, n) == (M, N), name
    assert report_.layer_precision == {name: {"M": m, "N": n} for name, (m, n) in got.items()}
    assert report_.matched["layer1.2.conv2"] == "layer1.*"
    assert "layer2.0.downsample.0" not in report_.matched
    assert isinstance(model.layer2[0].conv1.activation_binarizer, torch.nn.Identity)


def test_the_first_matching_pattern_wins():
    model = resnet20()
    convert(model, M, N, layers={"layer1.0.conv1": {"M": 4}, "layer1.*": {"M": 5, "N": 3}})
    got = precisions(model)
    assert got["layer1.0.conv1"] == (4, N)  # the first pattern, its N left to the global value
    assert got["layer1.0.conv2"] == (5, 3)


def test_the_layer_summary_counts_each_layers_own_bits_and_binary_macs():
    model = resnet20()
    convert(model, M, N, layers={"layer1.*": {"M": 5, "N": 1}})
    model.eval()
    result = summary(model, torch.randn(2, 3, 32, 32))
    rows = {row.name: row for row in result.layers}
    first, last = rows["layer1.0.conv1"], rows["layer3.2.conv2"]
    assert (first.M, first.N, last.M, last.N) == (5, 1, M, N)
    assert first.bits == 5 * first.binary_weights + 32 * 5  # M bits a weight + 32-bit alphas
    assert first.binary_macs == 5 * 1 * first.macs and last.binary_macs == M * N * last.macs
    weights = sum(row.binary_weights for row in result.layers)
    assert result.mean_M == pytest.approx(sum(row.M * row.binary_weights for row in result.layers) / weights)
    assert M < result.mean_M < 5
    assert result.binary_macs == sum(row.binary_macs for row in result.layers)
    assert "per-layer precision: mean M" in str(result)


@pytest.mark.parametrize("layers,message", [
    ({"layer9.*": {"M": 4}}, "'layer9.*' matches no layer"),
    ({"conv1": {"M": 4}}, "'conv1' matches only layers kept at full precision (conv1: first conv"),
    ({"layer1.*": {"M": 4}, "layer1.0.conv1": {"M": 5}}, "'layer1.0.conv1' matches only layers that the earlier"),
    ({"layer1.*": {"M": 0}}, "layers['layer1.*'].M must be ≥ 1, got 0"),
    ({"layer1.*": {"N": -1}}, "layers['layer1.*'].N must be ≥ 0, got -1"),
    ({"layer1.*": {"M": 2, "bits": 3}}, "unknown key(s) 'bits'"),
    ({"layer1.*": 3}, "give a mapping with M and/or N"),
    ({"": {"M": 3}}, "is not a module-name pattern"),
])
def test_bad_patterns_and_values_are_refused_naming_them(layers, message):
    model = resnet20()
    with pytest.raises(LayerPrecisionError) as error:
        plan_conversion(model, M, N, layers=layers)
    assert message in str(error.value)
    assert not abc_layers(model)  # planning changes nothing


# ---- configuration ------------------------------------------------------------------------------
def test_the_command_line_mapping_composes_typed_and_is_range_checked(compose_cfg):
    cfg = compose_cfg([*TINY, "abc.layers={layer1.*: {M: 5}, layer3.2.conv2: {M: 1, N: 1}}"])
    assert list(cfg.abc.layers) == ["layer1.*", "layer3.2.conv2"]
    assert (cfg.abc.layers["layer1.*"].M, cfg.abc.layers["layer1.*"].N) == (5, None)
    validate(cfg)
    with pytest.raises(ConfigError, match=r"abc\.layers\.conv2\.M=0 is out of range"):
        validate(compose_cfg([*TINY, "abc.layers={conv2: {M: 0}}"]))
    with pytest.raises(ConfigCompositionException) as error:  # a key LayerPrecision does not have
        compose_cfg([*TINY, "abc.layers={conv2: {M: 3, X: 1}}"])
    assert "Key 'X' not in 'LayerPrecision'" in str(error.value.__cause__)
    assert "full_key: abc.layers.conv2.X" in str(error.value.__cause__)
    with pytest.raises(ConfigCompositionException) as error:  # not an integer
        compose_cfg([*TINY, "abc.layers={conv2: {M: five}}"])
    assert "full_key: abc.layers.conv2.M" in str(error.value.__cause__)


def test_a_pattern_matching_no_layer_is_refused_before_pretraining(compose_cfg, tmp_path, monkeypatch):
    import abc_experiments.pipeline as pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(pipeline, "train_stage", no_training)
    cfg = compose_cfg([*TINY, "abc.layers={conv2: {M: 4}, conv9: {M: 1}}"])
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"abc\.layers pattern\(s\) that set no converted layer.*'conv9' matches "
                                          r"no layer.*the converted layers are conv2"):
        pipeline.run(cfg)
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "cache").exists()  # no FP model was trained or cached
    assert not (tmp_path / "run" / "summary.json").exists()


def test_flat_settings_keep_the_mapping_whole_and_ordered():
    config = {"abc": {"M": 3, "layers": {"layer1.*": {"M": 5, "N": None}, "conv2": {"N": 1}}}}
    assert flat_settings(config) == {"abc.M": 3, "abc.layers": "{layer1.*: {M: 5}, conv2: {N: 1}}"}
    reordered = {"abc": {"M": 3, "layers": {"conv2": {"N": 1}, "layer1.*": {"M": 5}}}}
    assert flat_settings(reordered)["abc.layers"] != flat_settings(config)["abc.layers"]  # first match wins
    assert flat_settings({"abc": {"M": 3, "layers": {}}}) == flat_settings({"abc": {"M": 3}})  # none = older configs
    assert format_layer_precision({}) == ""


# ---- a whole run --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from abc_experiments.pipeline import run

    root = tmp_path_factory.mktemp("layer_precision")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="abc_experiments.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"run_dir={root / 'run'}", f"cache_dir={root / 'cache'}", *TINY, "abc.linear=true", SEED_CNN_LAYERS])
    GlobalHydra.instance().clear()
    run(cfg)
    return root / "run"


def test_the_run_summary_records_the_mapping_and_each_layers_precision(mixed_run):
    data = read_summary(mixed_run)
    assert data["status"] == "finished"
    assert data["abc"]["layers"] == {"conv2": {"M": 4, "N": 1}}
    assert {row["name"]: (row["M"], row["N"]) for row in data["layers"]} == {"conv2": (4, 1), "fc1": (M, N)}
    assert data["conversion"]["report"]["layer_precision"] == {"conv2": {"M": 4, "N": 1}, "fc1": {"M": M, "N": N}}
    rows = {row["name"]: row for row in data["layers"]}
    weights = rows["conv2"]["binary_weights"] + rows["fc1"]["binary_weights"]
    assert data["size"]["mean_M"] == pytest.approx((4 * rows["conv2"]["binary_weights"]
                                                    + M * rows["fc1"]["binary_weights"]) / weights)
    assert data["size"]["binary_macs"] == rows["conv2"]["binary_macs"] + rows["fc1"]["binary_macs"]
    assert RunSummary.read(mixed_run / "summary.json").abc.layers == {"conv2": {"M": 4, "N": 1}}


def test_a_resume_with_another_mapping_is_refused(mixed_run):
    from abc_experiments.resume import read_earlier_summary, resume_conflicts

    earlier = read_earlier_summary(mixed_run)
    same = flat_settings(earlier.config)
    assert resume_conflicts(earlier, same) == []
    other = flat_settings({**earlier.config, "abc": {**earlier.config["abc"], "layers": {"conv2": {"M": 5}}}})
    assert resume_conflicts(earlier, other) == ["abc.layers: '{conv2: {M: 4, N: 1}}' -> '{conv2: {M: 5}}'"]


def test_tensorboard_hparams_hold_the_mapping_and_the_mean_bits(mixed_run):
    accumulator = EventAccumulator(str(mixed_run / "tb" / "abc")).Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["layers"].string_value == "{conv2: {M: 4, N: 1}}"
    assert M < hparams["mean_M"].number_value < 4
    assert hparams["M"].number_value == M


def test_load_run_export_and_the_packed_file_keep_each_layers_precision(mixed_run, tmp_path):
    from abc_experiments import load_run
    from abc_experiments.export import REPORT_FILE, export_run, format_report
    from abc_experiments.packed import load_packed, pack_model, packed_layers, save_packed

    model = load_run(mixed_run)
    assert precisions(model) == {"conv2": (4, 1), "fc1": (M, N)}
    result = export_run(mixed_run, tmp_path / "export")
    assert result["layers"] == [{"name": "conv2", "M": 4, "N": 1}, {"name": "fc1", "M": M, "N": N}]
    assert result["abc_layers"] == {"conv2": {"M": 4, "N": 1}}
    assert result["packed_acc"] == result["finetuned_acc"]
    assert json.loads((tmp_path / "export" / REPORT_FILE).read_text())["layers"] == result["layers"]
    assert f"M = {M}–4 by layer" in format_report(result)
    # pack_model -> save_packed -> load_packed round trip, layer by layer
    path = save_packed(pack_model(model), tmp_path / "again.abc.safetensors",
                       architecture={"name": "seed_cnn", "in_channels": 1, "image_size": 8, "num_classes": 10})
    loaded = {name: (layer.M, layer.N) for name, layer in packed_layers(load_packed(path))}
    assert loaded == {"conv2": (4, 1), "fc1": (M, N)}


# ---- abc-report ---------------------------------------------------------------------------------
def test_report_keeps_runs_with_different_mappings_apart(tmp_path):
    mappings = [{}, {}, {"conv2": {"M": 5}}, {"conv2": {"M": 5}}, {"conv2": {"M": 1, "N": 1}}]
    for index, layers in enumerate(mappings):
        job = tmp_path / f"job{index}"
        summary_ = write_typed_job(job, 3, 3, seed=index % 2)
        summary_.config["abc"]["layers"] = layers
        summary_.abc.layers = layers
        summary_.write(job / "summary.json")
    assert report.main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "report.csv")
    assert sorted((r["variant"], r["n_seeds"]) for r in rows) == [
        ("abc.layers=None", "2"), ("abc.layers={conv2: {M: 1, N: 1}}", "1"), ("abc.layers={conv2: {M: 5}}", "2")]
    markdown = (tmp_path / "report.md").read_text()
    assert "abc.layers={conv2: {M: 5}}" in markdown


def test_report_escapes_glob_stars_in_markdown(tmp_path):
    for index, layers in enumerate([{}, {"layer1.*": {"M": 5}, "layer2.*": {"N": 1}}]):
        job = tmp_path / f"job{index}"
        summary_ = write_typed_job(job, 3, 3, seed=0)
        summary_.config["abc"]["layers"] = layers
        summary_.write(job / "summary.json")
    assert report.main([str(tmp_path)]) == 0
    assert "abc.layers={layer1.\\*: {M: 5}, layer2.\\*: {N: 1}}" in (tmp_path / "report.md").read_text()
    assert {r["variant"] for r in read_csv(tmp_path / "report.csv")} == {
        "abc.layers=None", "abc.layers={layer1.*: {M: 5}, layer2.*: {N: 1}}"}
