"""The activation binarizer module (ABC-Net, Lin, Zhao & Pan, NIPS 2017, arXiv 1711.11294, Section 3.2).

Activations R are approximated by N binary tensors with trainable shifts vₙ and scales βₙ::

    A ≈ Σₙ βₙ H_{vₙ}(R),     H_v(R) = +1 if clip(R + v, 0, 1) ≥ 0.5 else −1       (eq. 6–7)

Straight-through estimator (eq. 8): H is treated as clip(R + v, 0, 1), so the gradient passes to R and
to vₙ where 0 ≤ R + vₙ ≤ 1 (slope 1) and is zero elsewhere; ∂c/∂βₙ = Σ ∂c/∂A · H_{vₙ}(R) exactly.

The N initial shifts differ from each other (the seed notebook started them all at 0, which makes the
N bases identical): thresholds 0.5 − vₙ are spread evenly over (0, 1).
:meth:`ActivationBinarizer.calibrate` fits shifts and betas to real inputs
(:func:`.lloyd_max.fit_activation_bases`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lloyd_max import fit_activation_bases
from .staircase_dispatch import KERNELS, staircase_ste
from .staircase_reference import heaviside_bases, staircase
from .weights import check_count, is_exporting


def default_shifts(N: int) -> Tensor:
    """Distinct initial shifts, thresholds 0.5 − vₙ spread evenly over (0, 1).

    Args:
        N: the number of bases (≥ 1).

    Returns:
        (N,) float32 shifts vₙ = 0.5 − n/(N + 1), n = 1..N (v = 0 for N = 1).
    """
    return 0.5 - torch.arange(1, N + 1, dtype=torch.float32) / (N + 1)


class ActivationBinarizer(nn.Module):
    """R ↦ Σₙ βₙ H_{vₙ}(R) with trainable shifts v and betas β and the STE of eq. 8.

    ``kernel`` picks how: ``"auto"`` (default: ``"native"`` where the C++ kernels could be built,
    else ``"bucket"``), ``"native"`` (one C++ pass over x forward and one backward, CPU float32 and
    bfloat16; values bit-identical to the reference; other inputs run ``"bucket"``), ``"bucket"``
    (one table lookup per element forward, one lookup and one per-bucket sum backward, cost
    independent of N, values bit-identical to the reference),
    ``"eager"`` (the reference, N passes), ``"compiled"`` (the reference through ``torch.compile``;
    falls back to eager with a warning where compilation is unavailable). While the model is being
    exported or traced (``torch.export``, ``torch.onnx``, ``torch.jit``) the forward is the
    reference's plain ops, values only (no STE).

    Args:
        N: the number of binary bases (≥ 1).
        kernel: one of ``"auto"``, ``"native"``, ``"bucket"``, ``"eager"``, ``"compiled"``.
    """

    def __init__(self, N: int, kernel: str = "auto"):
        super().__init__()
        self.N = check_count("N", N, 1)
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.shifts = nn.Parameter(default_shifts(N))
        self.betas = nn.Parameter(torch.full((N,), 1.0 / (2 * N)))
        # Relative error ‖R − ΣβA‖/‖R‖ measured by the last calibration (NaN until calibrated).
        self.register_buffer("calibration_error", torch.tensor(float("nan")))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and self.shifts.dtype == torch.float32:
            # Under autocast the input arrives in 16 bits: compare it with the float32 thresholds
            # (float32 holds every 16-bit value exactly) so that no threshold is rounded.
            return self.forward(x.float()).to(x.dtype)
        shifts, betas = self.shifts, self.betas
        if shifts.dtype != x.dtype:  # (a no-op cast would still be a node in an exported graph)
            shifts, betas = shifts.to(x.dtype), betas.to(x.dtype)
        if is_exporting():
            return staircase(x, shifts, betas)  # portable ops for torch.export / ONNX / TorchScript
        return staircase_ste(x, shifts, betas, self.kernel)

    def bases_with_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The N bases, each with its own straight-through gradient (the naive layer path).

        Args:
            x: the layer input.

        Returns:
            (bases, betas): the Aₙ stacked to (N, *x.shape), values ±1, and the (N,) betas.
        """
        shifted = x.unsqueeze(0) + self.shifts.view((-1,) + (1,) * x.dim())
        passed = ((shifted >= 0) & (shifted <= 1)).to(x.dtype)
        bases = heaviside_bases(x.detach(), self.shifts.detach())
        return bases + passed * (shifted - shifted.detach()), self.betas

    @torch.no_grad()
    def calibrate(self, samples: Tensor, iterations: int = 25) -> float:
        """Fit shifts and betas to a sample of this layer's real inputs (see
        :func:`.lloyd_max.fit_activation_bases`) and record the fit's error in ``calibration_error``.

        Args:
            samples: input values of this layer (any shape).
            iterations: the most Lloyd–Max alternations.

        Returns:
            The input offset c the layer must absorb (see :meth:`.ABCLayer.add_calibration_bias`).
        """
        shifts, betas, offset, error = fit_activation_bases(samples, self.N, iterations)
        self.shifts.copy_(shifts)
        self.betas.copy_(betas)
        self.calibration_error.fill_(error)
        return offset

    def extra_repr(self) -> str:
        return f"N={self.N}, kernel={self.kernel}"
