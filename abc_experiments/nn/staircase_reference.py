"""The eager reference of the activation staircase Σₙ βₙ H_{vₙ}(x) and its straight-through gradients
(ABC-Net, Lin, Zhao & Pan, NIPS 2017, arXiv 1711.11294, eq. 6–8).

These plain torch ops define the values every other kernel (``staircase_bucket``,
``staircase_native``, ``torch.compile`` of these functions) must reproduce bit for bit; the
``*_blocked`` variants run them one cache-sized block at a time on the CPU (the same values).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1 << 18  # elements per block of the eager CPU kernels: 1 MiB of float32 stays in cache


def heaviside_bases(x: Tensor, shifts: Tensor) -> Tensor:
    """The N binary bases H_{vₙ}(x) = +1 if x + vₙ ≥ 0.5 else −1, stacked (no gradient).

    Args:
        x: the input, any shape.
        shifts: (N,) shifts vₙ.

    Returns:
        (N, *x.shape) tensor of ±1 in ``x``'s dtype.
    """
    view = (-1,) + (1,) * x.dim()
    return torch.where(x.unsqueeze(0) + shifts.view(view) >= 0.5, 1.0, -1.0).to(x.dtype)


def staircase(x: Tensor, shifts: Tensor, betas: Tensor) -> Tensor:
    """Σₙ βₙ H_{vₙ}(x), one term at a time (memory stays at one activation-sized buffer).

    Args:
        x: the input, any shape.
        shifts: (N,) shifts vₙ, in ``x``'s dtype.
        betas: (N,) scales βₙ, in ``x``'s dtype.

    Returns:
        A tensor of ``x``'s shape and dtype: the reference values every kernel reproduces.
    """
    out = None
    for v, b in zip(shifts.unbind(), betas.unbind()):
        term = torch.where(x + v >= 0.5, b, -b)
        out = term if out is None else out + term
    return out


def staircase_grad(x: Tensor, grad: Tensor, shifts: Tensor, betas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Straight-through gradients of :func:`staircase` (eq. 8: H treated as clip(x + v, 0, 1)).

    Args:
        x: the forward input.
        grad: the upstream gradient, ``x``'s shape.
        shifts: (N,) shifts vₙ.
        betas: (N,) scales βₙ.

    Returns:
        (grad_x, grad_shifts, grad_betas): grad_x = Σₙ βₙ · grad where 0 ≤ x + vₙ ≤ 1,
        grad_shiftsₙ = βₙ · Σ grad over that window, grad_betasₙ = Σ grad · H_{vₙ}(x).
    """
    grad_x = torch.zeros_like(x)
    grad_shifts, grad_betas = [], []
    for v, b in zip(shifts.unbind(), betas.unbind()):
        y = x + v
        passed = torch.where((y >= 0) & (y <= 1), grad, 0.0)
        grad_x = grad_x + b * passed
        grad_shifts.append(b * passed.sum())
        grad_betas.append(torch.where(y >= 0.5, grad, -grad).sum())
    return grad_x, torch.stack(grad_shifts), torch.stack(grad_betas)


def _blocks(*tensors: Tensor):
    """Flat contiguous views of ``tensors`` cut into matching blocks of CHUNK elements."""
    flat = [t.contiguous().view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield [t[start:start + CHUNK] for t in flat]


def staircase_blocked(x: Tensor, shifts: Tensor, betas: Tensor) -> Tensor:
    """:func:`staircase` one cache-sized block at a time on the CPU, where the N passes over a
    large activation are bound by memory bandwidth (about 2x faster; the same values).

    Args:
        x: the input, any shape (other devices and small inputs run :func:`staircase` whole).
        shifts: (N,) shifts vₙ, in ``x``'s dtype.
        betas: (N,) scales βₙ, in ``x``'s dtype.

    Returns:
        :func:`staircase`'s values, bit for bit.
    """
    if x.device.type != "cpu" or x.numel() <= CHUNK:
        return staircase(x, shifts, betas)
    out = torch.empty(x.shape, dtype=x.dtype)
    for x_block, out_block in _blocks(x, out):
        out_block.copy_(staircase(x_block, shifts, betas))
    return out


def staircase_grad_blocked(x: Tensor, grad: Tensor, shifts: Tensor, betas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`staircase_grad` block by block on the CPU (see :func:`staircase_blocked`).

    Args:
        x: the forward input.
        grad: the upstream gradient, ``x``'s shape.
        shifts: (N,) shifts vₙ.
        betas: (N,) scales βₙ.

    Returns:
        (grad_x, grad_shifts, grad_betas) as :func:`staircase_grad` (the sums over x added block
        by block).
    """
    if x.device.type != "cpu" or x.numel() <= CHUNK:
        return staircase_grad(x, grad, shifts, betas)
    grad_x = torch.empty(x.shape, dtype=x.dtype)
    grad_shifts, grad_betas = torch.zeros_like(shifts), torch.zeros_like(betas)
    for x_block, grad_block, out_block in _blocks(x, grad, grad_x):
        block_x, block_shifts, block_betas = staircase_grad(x_block, grad_block, shifts, betas)
        out_block.copy_(block_x)
        grad_shifts += block_shifts
        grad_betas += block_betas
    return grad_x, grad_shifts, grad_betas
