"""Knowledge distillation from the full-precision model while fine-tuning the ABC model.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015), as binary-network
training uses it (e.g. Real-to-Binary, Martinez et al. 2020; ReActNet, Liu et al. 2020): the
student's loss is

    L = CE(z_s, y) + w · T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) )

with z_s the ABC model's logits, z_t the FP model's (eval mode, no gradients), temperature T and
weight w. T² keeps the gradient of the soft term on the scale of the hard one as T changes.
Weight 0 is plain cross-entropy, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over the batch, in float32.

    Args:
        student_logits: (B, C) logits of the model being trained.
        teacher_logits: (B, C) logits of the teacher (no gradient flows into them).
        temperature: T > 0.

    Returns:
        A scalar tensor.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """``CE(student, labels) + weight · T² · KL(teacher_T ‖ student_T)`` (see the module docstring).

    Args:
        student_logits: (B, C) logits of the ABC model.
        teacher_logits: (B, C) logits of the FP model.
        labels: (B,) class indices.
        weight: w ≥ 0; 0 gives plain cross-entropy.
        temperature: T > 0.

    Returns:
        A scalar tensor (float32).
    """
    loss = F.cross_entropy(student_logits.float(), labels)
    if weight == 0:
        return loss
    return loss + weight * temperature ** 2 * soft_target_kl(student_logits, teacher_logits, temperature)


class DistillationCriterion:
    """The fine-tuning loss with the FP ``teacher``: call it as ``criterion(logits, labels, images)``.

    The teacher runs in eval mode under ``torch.no_grad`` (BatchNorm statistics frozen, no graph), on
    the same images, in the same autocast as the student (``autocast`` is a context factory).
    """

    def __init__(self, teacher: nn.Module, weight: float, temperature: float,
                 autocast: Callable[[], object] | None = None):
        if weight < 0 or not temperature > 0:
            raise ValueError(f"distillation needs weight >= 0 and temperature > 0 (got {weight}, {temperature})")
        self.teacher, self.weight, self.temperature = teacher.eval(), weight, temperature
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self.autocast = autocast

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.weight == 0:
            return F.cross_entropy(logits.float(), labels)
        with torch.no_grad():
            if self.autocast is None:
                teacher_logits = self.teacher(images)
            else:
                with self.autocast():
                    teacher_logits = self.teacher(images)
        return distillation_loss(logits, teacher_logits, labels, self.weight, self.temperature)


def cross_entropy_criterion(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The plain training loss, with the criterion's signature (``images`` unused)."""
    return F.cross_entropy(logits.float(), labels)
