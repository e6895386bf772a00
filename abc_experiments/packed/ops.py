"""Python wrappers of the C++ operators (``torch.ops.abc_packed``): they check their inputs and say
exactly what is wrong, then call the kernels without copying anything."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ext


def _isa_code(isa: str | None) -> int:
    name = _ext.get_isa() if isa is None else isa
    native = tuple(path for path in _ext.ISAS + _ext.TEST_ISAS if path != "reference")
    if name not in native:
        raise ValueError(f"the C++ operators run the native paths {', '.join(native)}, not {name!r}")
    if not _ext.extension_available():
        raise RuntimeError(f"the packed ABC C++ extension is unavailable: {_ext.extension_error()}")
    if name not in _ext.runnable_isas():
        raise RuntimeError(f"this CPU cannot run the {name!r} kernels; available: {', '.join(_ext.cpu_isas())}")
    return _ext.ISA_CODES[name]


def _check_input(x: Tensor, dims: int, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"{what}: the packed kernels run on the CPU; got a tensor on {x.device}")
    if x.dtype != torch.float32:
        raise TypeError(f"{what}: expected float32 input, got {x.dtype} (convert with .float())")
    if x.dim() != dims:
        raise ValueError(f"{what}: expected a {dims}-d input, got shape {tuple(x.shape)}")
    if not (x.is_contiguous() or (dims == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        raise ValueError(f"{what}: the input must be contiguous (call .contiguous() first)"
                         + (" or channels_last" if dims == 4 else ""))


def _check_shifts(shifts: Tensor) -> None:
    if shifts.dtype != torch.float32 or shifts.dim() != 1 or shifts.numel() == 0 or not shifts.is_contiguous():
        raise ValueError(f"shifts: expected a non-empty contiguous float32 vector, got {shifts.dtype} "
                         f"{tuple(shifts.shape)}")


def pack_activations(x: Tensor, shifts: Tensor, padding: Sequence[int] = (0, 0), isa: str | None = None) -> Tensor:
    """Binarize an NCHW float32 input (contiguous or channels_last) at every shift and pack it:
    (B, H+2ph, W+2pw, N, ceil(C/64)) int64 words; bit c % 64 of word c // 64 is 1 iff
    x[b, c, y, x] + shifts[n] >= 0.5 (padding: 0)."""
    _check_input(x, 4, "pack_activations")
    _check_shifts(shifts)
    return torch.ops.abc_packed.pack_nchw(x, shifts, int(padding[0]), int(padding[1]), _isa_code(isa))


def pack_rows(x: Tensor, shifts: Tensor, isa: str | None = None) -> Tensor:
    """Binarize a (rows, features) float32 input and pack it: (rows, N, ceil(F/64)) int64 words."""
    _check_input(x, 2, "pack_rows")
    _check_shifts(shifts)
    return torch.ops.abc_packed.pack_rows(x, shifts, _isa_code(isa))


def packed_conv2d(x: Tensor, wk: Tensor, coef: Tensor, bterm: Tensor, shifts: Tensor, out_channels: int,
                  kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  half_k: float, isa: str | None = None) -> Tensor:
    """Binarize-and-pack ``x`` (NCHW float32, contiguous or channels_last; the output has the input's
    memory format) and run the binary convolution; see ``csrc/packed_ops.h``."""
    _check_input(x, 4, "packed_conv2d")
    _check_shifts(shifts)
    return torch.ops.abc_packed.conv2d(x, wk, coef, bterm, shifts, out_channels, list(kernel), list(stride),
                                       list(padding), list(dilation), float(half_k), _isa_code(isa))
