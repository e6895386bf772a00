"""finetune.precise_bn: BatchNorm statistics re-estimated before each validation, on the first
batches of the epoch just trained; the training itself is untouched."""

from __future__ import annotations

import pytest
import torch
from helpers import train_tiny_stage

from abc_experiments.training import evaluate


def _fit(tmp_path, name: str, precise_bn: int):
    model, fit, loaders, _ = train_tiny_stage(tmp_path / name, batch_size=16, epochs=1, lr=3e-2, precise_bn=precise_bn)
    return model, fit, loaders


def test_precise_bn_leaves_training_alone_and_sets_the_statistics_of_the_epochs_first_batches(tmp_path):
    plain, plain_fit, _ = _fit(tmp_path, "plain", 0)
    precise, precise_fit, loaders = _fit(tmp_path, "precise", 2)
    # the training is the same, bit for bit: only the BatchNorm statistics differ
    for name, parameter in plain.named_parameters():
        assert torch.equal(parameter, precise.get_parameter(name)), name
    assert [r["train_loss"] for r in plain_fit.history] == [r["train_loss"] for r in precise_fit.history]
    # by hand: the conv outputs of epoch 0's first two training batches (16 images each), their
    # per-batch means and unbiased variances averaged
    loaders["train"].sampler.set_epoch(0)
    batches = [images for _, (images, _labels) in zip(range(2), loaders["train"])]
    with torch.no_grad():
        outputs = [precise[0](images).double() for images in batches]
    mean = torch.stack([y.mean((0, 2, 3)) for y in outputs]).mean(0)
    var = torch.stack([y.var((0, 2, 3), unbiased=True) for y in outputs]).mean(0)
    norm = precise[1]
    torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain[1].running_mean, norm.running_mean)  # the running averages were elsewhere
    # validation (and so model selection) measured the model with those statistics
    val = evaluate(precise, loaders["val"], torch.device("cpu"))
    assert precise_fit.history[0]["val_loss"] == pytest.approx(val.loss, rel=1e-9)
    assert precise_fit.history[0]["val_acc"] == val.acc


def test_pipeline_records_precise_bn_in_the_summary_and_the_hparams(compose_cfg, tmp_path):
    from helpers import TINY, read_summary
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from abc_experiments.pipeline import run

    run(compose_cfg([*TINY, "finetune.precise_bn=2"], run_dir=tmp_path / "run"))
    summary = read_summary(tmp_path / "run")
    assert summary["config"]["finetune"]["precise_bn"] == 2
    accumulator = EventAccumulator(str(tmp_path / "run" / "tb" / "abc")).Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["precise_bn"].number_value == 2


def test_precise_bn_is_range_checked_and_recorded(compose_cfg):
    from abc_experiments.config import ConfigError, validate

    with pytest.raises(ConfigError, match="finetune.precise_bn=-1 is out of range"):
        validate(compose_cfg(["finetune.precise_bn=-1"]))
    assert compose_cfg(["finetune.precise_bn=8"]).finetune.precise_bn == 8
