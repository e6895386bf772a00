"""Loading the one-pass C++ CPU kernels of the activation staircase (``csrc/staircase.cpp``,
operators ``torch.ops.abc_nn.staircase_forward`` / ``staircase_backward``), JIT-built with
``torch.utils.cpp_extension.load`` and ninja at first use (about 30 s on 2 cores, once per
checkout: :func:`abc_experiments.cpp_build.build_root`, like ``abc_experiments.packed``).

If the build or the load fails, ONE warning names the cause and the fix, and :func:`native_available`
is False: the ``"auto"`` kernel then uses ``"bucket"`` (same values).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ..cpp_build import load_extension, load_once, source_digest

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("staircase.cpp",)
# No -ffast-math and no FMA contraction (the reference's bits); -fno-trapping-math changes no value, it
# only lets the compiler if-convert the comparisons and vectorise.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]


class NativeKernelWarning(UserWarning):
    """The C++ staircase kernels are unavailable; the bucket kernel is used instead."""


_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None}


def extension_name() -> str:
    """The extension's name, so that a stale build is never reused.

    Returns:
        ``abc_nn_<digest>`` of the sources, the flags and torch's version.
    """
    return f"abc_nn_{source_digest(CSRC, CFLAGS)}"


def _load() -> None:
    load_extension(extension_name(), [str(CSRC / source) for source in SOURCES], CFLAGS, [str(CSRC)],
                   what="native ABC activation kernels", usual_seconds=30)


def _register_fakes() -> None:
    """Shape-only implementations, so that ``torch.compile`` can trace a model using the operators."""
    forward = "abc_nn::staircase_forward"
    if torch._C._dispatch_has_kernel_for_dispatch_key(forward, "Meta"):
        return  # registered by an earlier load in this process

    @torch.library.register_fake(forward)
    def _(x, shifts, betas):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("abc_nn::staircase_backward")
    def _(x, grad, shifts, betas):
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        return grad_x, torch.empty_like(shifts), torch.empty_like(betas)


def native_available() -> bool:
    """Load (building if needed) the C++ kernels once.

    Returns:
        True if the operators are loaded; False, with one :class:`NativeKernelWarning`, if the
        build or the load failed (remembered: no second attempt in this process).
    """
    return load_once(_state, _lock, lambda: (_load(), _register_fakes()),
                     "abc_experiments.nn: the native C++ activation kernels",
                     "kernel 'auto' uses 'bucket' instead (same values, slower on small activations)",
                     NativeKernelWarning)


def native_error() -> Exception | None:
    """Why the native kernels are unavailable.

    Returns:
        The exception of the failed build or load; None if they loaded or were never tried.
    """
    return _state["error"]
