"""Distillation from the FP model while fine-tuning: the loss against a float64 hand computation, weight 0
identical to plain cross-entropy, and the pipeline wiring (recorded, changes the fine-tuned model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import TINY, read_summary, train_tiny_stage
from torch import nn

from abc_experiments.distillation import DistillationCriterion, distillation_loss
from abc_experiments.pipeline import run


def reference_loss(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, weight: float, t: float) -> float:
    """CE + w·T²·KL(softmax(teacher/T) || softmax(student/T)), batch mean, in float64 numpy."""
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    ce = -log_softmax(student)[np.arange(len(labels)), labels].mean()
    log_p_t, log_p_s = log_softmax(teacher / t), log_softmax(student / t)
    kl = (np.exp(log_p_t) * (log_p_t - log_p_s)).sum(axis=1).mean()
    return ce + weight * t * t * kl


@pytest.mark.parametrize("weight, temperature", [(0.0, 4.0), (0.5, 1.0), (1.0, 4.0), (3.0, 2.5)])
def test_loss_matches_a_hand_computation(weight, temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    labels = torch.randint(0, 10, (16,), generator=g)
    expected = reference_loss(student.double().numpy(), teacher.double().numpy(), labels.numpy(), weight, temperature)
    assert distillation_loss(student, teacher, labels, weight, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_the_soft_term_pulls_the_student_towards_the_teacher():
    teacher = torch.tensor([[4.0, 0.0, -4.0]])
    student = torch.zeros(1, 3, requires_grad=True)
    distillation_loss(student, teacher, torch.tensor([1]), 1.0, 2.0).backward()
    # cross-entropy alone pushes logit 1 up and 0/2 down equally; the teacher adds "0 above 2"
    assert student.grad[0, 0] < student.grad[0, 2]


def test_bad_weight_or_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature > 0"):
        DistillationCriterion(nn.Linear(2, 2), 1.0, 0.0)
    with pytest.raises(ValueError, match="weight >= 0"):
        DistillationCriterion(nn.Linear(2, 2), -1.0, 1.0)


def _train(tmp_path, criterion, name):
    model, fit, _loaders, teacher = train_tiny_stage(tmp_path / name, criterion)
    return model, fit, teacher


def test_weight_zero_trains_bit_identically_to_no_distillation(tmp_path):
    plain, plain_fit, _ = _train(tmp_path, None, "plain")
    zero, zero_fit, _ = _train(tmp_path, lambda t: DistillationCriterion(t, 0.0, 4.0), "zero")
    distilled, _, teacher = _train(tmp_path, lambda t: DistillationCriterion(t, 1.0, 4.0), "distilled")
    for key, value in plain.state_dict().items():
        assert torch.equal(value, zero.state_dict()[key]), key
    assert [r["train_loss"] for r in plain_fit.history] == [r["train_loss"] for r in zero_fit.history]
    assert any(not torch.equal(value, distilled.state_dict()[key]) for key, value in plain.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_pipeline_distills_from_the_fp_model_and_records_it(compose_cfg, tmp_path):
    run(compose_cfg([*TINY, "finetune.epochs=2"], run_dir=tmp_path / "plain"))
    run(compose_cfg([*TINY, "finetune.epochs=2", "finetune.distill.weight=1.0", "finetune.distill.temperature=2"],
                    run_dir=tmp_path / "distilled"))
    plain, distilled = read_summary(tmp_path / "plain"), read_summary(tmp_path / "distilled")
    assert distilled["config"]["finetune"]["distill"] == {"weight": 1.0, "temperature": 2.0}
    assert distilled["fp"] == plain["fp"] and distilled["converted"] == plain["converted"]  # same cached FP model
    assert distilled["finetuned"]["history"][0]["train_loss"] != plain["finetuned"]["history"][0]["train_loss"]
    assert math.isfinite(distilled["finetuned"]["acc"])


def test_distillation_settings_are_range_checked(compose_cfg):
    from abc_experiments.config import ConfigError, validate

    with pytest.raises(ConfigError, match="finetune.distill.temperature"):
        validate(compose_cfg(["finetune.distill.temperature=0"]))
    with pytest.raises(ConfigError, match="finetune.distill.weight"):
        validate(compose_cfg(["finetune.distill.weight=-1"]))


def test_fine_tuning_that_validates_worse_than_calibration_keeps_the_calibrated_model(compose_cfg, tmp_path):
    """Model selection on val includes the starting point: an lr that wrecks the model gives every
    fine-tuned epoch a lower validation accuracy than the calibrated model, which is then the
    result (best_epoch 0, the converted numbers), and the saved final model is that one."""
    from abc_experiments import load_run

    run(compose_cfg([*TINY, "finetune.epochs=1", "finetune.lr=0.5", "finetune.optimizer=adam",
                     "finetune.divergence_factor=1e15"], run_dir=tmp_path / "wrecked"))
    summary = read_summary(tmp_path / "wrecked")
    assert summary["finetuned"]["history"][0]["val_acc"] < summary["converted"]["val_acc"]
    assert summary["finetuned"]["best_epoch"] == 0
    assert summary["finetuned"]["acc"] == summary["converted"]["acc"]
    assert summary["finetuned"]["val_acc"] == summary["converted"]["val_acc"]
    assert load_run(tmp_path / "wrecked") is not None
