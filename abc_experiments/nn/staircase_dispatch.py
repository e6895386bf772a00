"""Which staircase kernel runs, and the autograd function that runs it with the straight-through
estimator (ABC-Net eq. 8): :func:`staircase_ste`.

``kernel`` names one of :data:`KERNELS`: ``"native"`` (:mod:`.staircase_native`, where it is built
and the tensors suit it), ``"bucket"`` (:mod:`.staircase_bucket`), ``"eager"``
(:mod:`.staircase_reference`, N passes), ``"compiled"`` (the reference through ``torch.compile``);
``"auto"`` is native where it applies, else bucket. All give the reference's values bit for bit.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .native import native_available
from .staircase_bucket import bucket_supported, bucket_tables, staircase_bucket, staircase_grad_bucket
from .staircase_native import native_supported, staircase_grad_native, staircase_native
from .staircase_reference import staircase, staircase_blocked, staircase_grad, staircase_grad_blocked

KERNELS = ("auto", "native", "bucket", "eager", "compiled")


def resolve_kernel(kernel: str, x: Tensor, shifts: Tensor, betas: Tensor) -> str:
    """The kernel that actually runs for ``kernel`` on these tensors.

    Args:
        kernel: one of :data:`KERNELS`.
        x: the staircase input.
        shifts: (N,) shifts vₙ.
        betas: (N,) scales βₙ.

    Returns:
        ``kernel`` itself, except that ``"auto"`` and ``"native"`` become ``"bucket"`` where the
        native kernel does not apply to these tensors or could not be built.
    """
    if kernel in ("auto", "native"):
        return "native" if native_supported(x, shifts, betas) and native_available() else "bucket"
    return kernel


class _Kernels:
    """The forward and backward functions: ``bucket`` (table lookups), ``eager`` (the
    reference: N passes) or ``compiled`` (the reference through ``torch.compile``: fused into one
    pass each; the first call compiles, ~30 s)."""

    compiled: tuple | None = None

    @classmethod
    def get(cls, kernel: str):
        if kernel == "bucket":
            return staircase_bucket, staircase_grad_bucket
        if kernel == "eager":
            return staircase_blocked, staircase_grad_blocked
        if cls.compiled is None:
            cls.compiled = (torch.compile(staircase, dynamic=True), torch.compile(staircase_grad, dynamic=True))
        return cls.compiled

    @classmethod
    def fall_back(cls, error: Exception):
        warnings.warn(f"torch.compile failed for the ABC activation kernels ({error}); using eager kernels",
                      stacklevel=3)
        cls.compiled = (staircase, staircase_grad)


class _StaircaseSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shifts, betas, kernel):
        kernel = resolve_kernel(kernel, x, shifts, betas)
        if kernel == "native":
            ctx.save_for_backward(x, shifts, betas)
            ctx.tables, ctx.backward_kernel = None, staircase_grad_native
            return staircase_native(x, shifts, betas)
        if kernel == "bucket":
            tables = bucket_tables(shifts, betas, x.dtype) if bucket_supported(x) else None
            fixed = []
            out = staircase_bucket(x, shifts, betas, tables, fixed)
            ctx.save_for_backward(x, shifts, betas, *fixed)
            ctx.tables, ctx.backward_kernel = tables, staircase_grad_bucket
            return out
        forward, backward = _Kernels.get(kernel)
        try:
            out = forward(x, shifts, betas)
        except Exception as error:  # a missing compiler shows up only on the first call
            if kernel == "eager":
                raise
            _Kernels.fall_back(error)
            forward, backward = _Kernels.get(kernel)
            out = forward(x, shifts, betas)
        ctx.save_for_backward(x, shifts, betas)
        ctx.tables = None
        ctx.backward_kernel = backward
        return out

    @staticmethod
    def backward(ctx, grad):
        x, shifts, betas, *fixed = ctx.saved_tensors
        if ctx.tables is not None:
            grad_x, grad_shifts, grad_betas = staircase_grad_bucket(x, grad, shifts, betas, ctx.tables, *fixed)
        else:
            grad_x, grad_shifts, grad_betas = ctx.backward_kernel(x, grad.contiguous(), shifts, betas)
        return grad_x, grad_shifts, grad_betas, None


def staircase_ste(x: Tensor, shifts: Tensor, betas: Tensor, kernel: str = "auto") -> Tensor:
    """Σₙ βₙ H_{vₙ}(x) with straight-through gradients to x, the shifts and the betas (eq. 8).

    Args:
        x: the input, any shape.
        shifts: (N,) shifts vₙ, in ``x``'s dtype.
        betas: (N,) scales βₙ, in ``x``'s dtype.
        kernel: one of :data:`KERNELS` (see :func:`resolve_kernel`).

    Returns:
        The staircase values (the reference's, bit for bit), ``x``'s shape and dtype, connected
        to the autograd graph of ``x``, ``shifts`` and ``betas``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    return _StaircaseSTE.apply(x, shifts, betas, kernel)
