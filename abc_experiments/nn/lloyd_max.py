"""Fitting activation bases to real inputs: Lloyd–Max alternation of thresholds and least-squares
levels (used by calibration, :func:`.calibrate.calibrate`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .staircase_reference import heaviside_bases
from .weights import check_count


def _least_squares_fit(samples: Tensor, shifts: Tensor) -> tuple[Tensor, Tensor]:
    """(offset c, betas) minimising ‖R − c − Σₙ βₙ H_{vₙ}(R)‖² for fixed shifts."""
    bases = heaviside_bases(samples, shifts).to(torch.float64)  # (N, n)
    design = torch.cat([torch.ones_like(bases[:1]), bases])  # constant column first
    gram = design @ design.t()
    rhs = design @ samples.to(torch.float64)
    solution = (torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ rhs).to(samples.dtype)
    return solution[0], solution[1:]


def fit_activation_bases(samples: Tensor, N: int, iterations: int = 25) -> tuple[Tensor, Tensor, float, float]:
    """Shifts, betas and an input offset c minimising ‖R − c − Σₙ βₙ H_{vₙ}(R)‖² on ``samples``.

    Σₙ βₙHₙ alone has levels symmetric about 0 (±Σβ at the extremes), so for non-negative inputs
    such as ReLU outputs the best fit without an offset puts every threshold at 0 and maps all of R
    to +Σβ (at N = 1: a constant, a dead layer). With the offset the model is any staircase with N
    thresholds, and Lloyd–Max alternation applies: N + 1 levels start evenly spaced between the 1st
    and 99th percentile of R, thresholds at their midpoints; then repeatedly c and the betas are the
    least-squares fit for the current thresholds and each threshold moves to the midpoint of the two
    levels it separates. The error never increases; the best iterate is kept. The offset is not part
    of the layer: calibration folds c·ΣŴ into the layer's bias (a constant input shift is a constant
    output shift of a linear layer).

    Args:
        samples: the layer's input values R (any shape; flattened, fitted in float32 on the CPU).
        N: the number of bases (≥ 1).
        iterations: the most alternations (fewer once the error stops falling).

    Returns:
        (shifts, betas, c, error): (N,) shifts vₙ = 0.5 − thresholdₙ, (N,) betas, the offset c and
        the relative error ‖R − c − ΣβA‖ / ‖R‖.
    """
    check_count("N", N, 1)
    samples = samples.detach().flatten().float().cpu()
    norm = samples.norm().item() or 1.0
    low, high = torch.quantile(samples.double()[: 1 << 24], torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
    if high <= low:
        low, high = samples.min().item(), samples.max().item() + 1e-6
    levels = torch.linspace(low, high, N + 1)
    thresholds = (levels[:-1] + levels[1:]) / 2
    best = None
    for _ in range(iterations):
        shifts = 0.5 - thresholds
        offset, betas = _least_squares_fit(samples, shifts)
        approx = offset + (betas.view(-1, 1) * heaviside_bases(samples, shifts)).sum(0)
        error = (samples - approx).norm().item() / norm
        if best is not None and error >= best[3] * (1 - 1e-4):  # converged (or no better)
            if error < best[3]:
                best = (shifts.clone(), betas.clone(), offset.item(), error)
            break
        best = (shifts.clone(), betas.clone(), offset.item(), error)
        # Levels in threshold order: L₀ = c − Σβ, Lₖ = Lₖ₋₁ + 2β₍ₖ₎; thresholds move to the midpoints.
        order = torch.argsort(thresholds)
        steps = 2 * betas[order].clamp_min(1e-8)
        start = offset - betas.sum()
        levels = torch.cat([start.view(1), start + torch.cumsum(steps, 0)])
        thresholds = torch.empty_like(thresholds).scatter_(0, order, (levels[:-1] + levels[1:]) / 2)
    return best
