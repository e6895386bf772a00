"""The "native" kernel of the activation staircase: one C++ pass over x forward and one backward
(``csrc/staircase.cpp``, loaded by :mod:`.native`), values bit-identical to the reference, shift and
beta gradients summed in double. CPU float32/bfloat16 contiguous inputs only; anything else runs
"bucket" (:mod:`.staircase_dispatch` decides).
"""

from __future__ import annotations

import torch
from torch import Tensor


def native_supported(x: Tensor, shifts: Tensor, betas: Tensor) -> bool:
    """Whether the C++ kernels take these tensors (whether they are built is :func:`.native.native_available`).

    Args:
        x: the staircase input.
        shifts: (N,) shifts vₙ.
        betas: (N,) scales βₙ.

    Returns:
        True for a contiguous CPU float32 or bfloat16 ``x`` with shifts and betas of its dtype on the CPU.
    """
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
            and shifts.dtype == x.dtype and betas.dtype == x.dtype and shifts.device.type == "cpu"
            and betas.device.type == "cpu")


def staircase_native(x: Tensor, shifts: Tensor, betas: Tensor) -> Tensor:
    """:func:`~.staircase_reference.staircase` in one C++ pass (bit-identical values).

    Args:
        x: a contiguous CPU float32 or bfloat16 input (see :func:`native_supported`).
        shifts: (N,) shifts vₙ, in ``x``'s dtype.
        betas: (N,) scales βₙ, in ``x``'s dtype.

    Returns:
        The staircase values, ``x``'s shape and dtype.
    """
    return torch.ops.abc_nn.staircase_forward(x, shifts, betas)


def staircase_grad_native(x: Tensor, grad: Tensor, shifts: Tensor, betas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~.staircase_reference.staircase_grad` in one C++ pass.

    Args:
        x: the forward input (see :func:`native_supported`).
        grad: the contiguous upstream gradient, ``x``'s shape and dtype.
        shifts: (N,) shifts vₙ, in ``x``'s dtype.
        betas: (N,) scales βₙ, in ``x``'s dtype.

    Returns:
        (grad_x, grad_shifts, grad_betas); the sums over x are accumulated in double.
    """
    return torch.ops.abc_nn.staircase_backward(x, grad, shifts, betas)
