"""Packed (inference-only) ABC layers: the M weight bases stored as bits, the input binarized and
packed into N bit-planes at run time, and M·N binary convolutions done with xor and popcount::

    out = Σₘ Σₙ αₘ βₙ (K − 2·popcount(Bₘ xor Aₙ)) + bias

where K = C_in·kh·kw. This equals the eval-mode fused ``ABCConv2d`` / ``ABCLinear``
(``conv(Σₙ βₙ Hₙ(x), Σₘ αₘ Bₘ) + bias``, Hₙ(x) = +1 iff x + vₙ ≥ 0.5, computed in float32 exactly as
the float layer does, with the shift vₙ rather than a rounded threshold).

Zero padding: F.conv2d pads the binarized input with 0, which is neither +1 nor −1. The kernel
packs padded pixels as −1 and the exact correction Sₘ = Σ over the out-of-bounds taps of Σ_c Bₘ
(per output channel and position) goes into a border term computed once per input size::

    out = bias + Σβ·Σₘ αₘ Sₘ  +  Σₘₙ (−2 αₘ βₙ)(popcount − K/2)

(the second form of the same sum: centred counts keep both parts at the output's magnitude).

Layers with groups > 1, a padding mode other than "zeros" or string padding, inputs that are not
on the CPU, and the ``reference`` path compute the fused float form from the unpacked weights
instead (same numbers as the float layer). Layers with N = 0 (full-precision activations) keep
their weights packed in the file and unpack them to float once, at construction.

Checks (before any kernel reads memory): every forward refuses an input of the wrong rank, channel
or feature count, a spatial size smaller than the (dilated) kernel, an integer, bool or complex
dtype, or a device other than the layer's, with a ``ValueError`` that names the layer, what it got
and what it expects. float16, bfloat16 and float64 inputs are computed in float32 and the output is
converted back (the layer's own tensors stay float32 through ``.half()``, ``.to()`` and friends). An
empty batch returns an empty output of the right shape. ``load_state_dict`` rebuilds every derived
tensor (unpacked weights, kernel layout, coefficients, border terms) from the loaded values, and
``state_dict`` holds the folded BatchNorm's scale and shift (``output_scale``, ``output_shift``).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.activations import staircase
from ..nn.layers import ABCConv2d, ABCLinear
from ..nn.weights import combine
from . import _ext
from ._bits import pack_bits, pack_words, unpack_bits

# What a packed layer remembers per input size and path (border terms, operator arguments, checked
# shapes; a chain its programs): at most this many entries each, then forgotten and rebuilt.
CACHE_ENTRIES = 16

log = logging.getLogger(__name__)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class PackedABCLayer(nn.Module):
    """What the packed conv and linear layers share: the stored tensors, their validation, the
    unpacked float weight for the reference path, the kernel's weight layout, the input checks and
    the state dict (loading rebuilds every derived tensor).

    Persistent buffers: ``weight_bits`` (uint8, M·numel(W) bits, dense, element order (m, *W.shape),
    bit i at bit i % 8 of byte i // 8), ``alphas`` ((M,) per layer or (M, C_out) per channel),
    ``shifts`` and ``betas`` ((N,), empty for N = 0) and ``bias`` (or None); in the state dict also
    ``output_scale`` and ``output_shift`` where a BatchNorm is folded in.
    """

    kind = ""
    STORED = ("weight_bits", "alphas", "shifts", "betas", "bias")

    def _setup(self, weight_shape, M, N, scope, weight_bits, alphas, shifts, betas, bias, input_offset=0.0) -> None:
        self.M, self.N, self.scope = int(M), int(N), scope
        self.weight_shape = tuple(int(s) for s in weight_shape)
        if self.M < 1 or self.N < 0:
            raise ValueError(f"bad M = {M} or N = {N}")
        if scope not in ("per_layer", "per_channel"):
            raise ValueError(f"unknown scope {scope!r}")
        given = {"weight_bits": weight_bits, "alphas": alphas, "shifts": shifts, "betas": betas, "bias": bias}
        for name, (dtype, shape) in self._stored_shapes(bias is not None).items():
            tensor = given[name]
            if not isinstance(tensor, Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"{self.kind} {name}: expected {dtype} {shape}, got {got}")
            self.register_buffer(name, tensor.detach().clone().contiguous())
        if bias is None:
            self.register_buffer("bias", None)
        # the calibrated input offset c (R ≈ c + ΣβA; see ABCLayer.set_input_offset): c·ΣŴ is in the
        # bias; a conv's zero-padded borders, where the input is 0 and not c, are corrected in the
        # border term. The file keeps it in the layer's header row.
        self.register_buffer("input_offset", torch.tensor(float(input_offset), dtype=torch.float32))
        self.K = math.prod(self.weight_shape) // self.weight_shape[0]
        self.native = False
        # the module name in the model (pack_model and load_packed set it): error messages name the layer
        self.name = ""
        # the output affine of a following BatchNorm folded in (PackedABCConv2d.fold_batchnorm): float64
        # CPU tensors, plain attributes like the kernel's other float64 helpers (see _prepare_kernel)
        self.post_scale: Tensor | None = None
        self.post_shift: Tensor | None = None
        # the module name of the BatchNorm folded in by pack_model (the packed file stores its affine);
        # None when nothing is folded or the fold was a run-time one (fuse_batchnorm_relu)
        self.folded_batchnorm: str | None = None
        self.relu = False  # a following ReLU done in the kernel (fuse_batchnorm_relu; packed convs only)
        # bumped whenever a derived tensor is replaced: PackedConvChain's cached programs hold them
        self.state_version = 0

    def _stored_shapes(self, bias: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of each persistent buffer (fixed by M, N, scope and the weight's shape)."""
        C_out, numel = self.weight_shape[0], math.prod(self.weight_shape)
        shapes = {"weight_bits": (torch.uint8, ((self.M * numel + 7) // 8,)),
                  "alphas": (torch.float32, (self.M,) if self.scope == "per_layer" else (self.M, C_out)),
                  "shifts": (torch.float32, (self.N,)), "betas": (torch.float32, (self.N,))}
        if bias:
            shapes["bias"] = (torch.float32, (C_out,))
        return shapes

    def _derive(self) -> None:
        """(Re)build every tensor computed from the stored ones: the unpacked float weight, and the
        kernel's layout, coefficients and border terms (subclasses); caches emptied."""
        raise NotImplementedError

    def _unpacked(self) -> tuple[Tensor, Tensor]:
        """(bits (M, *W.shape) bool, bases ±1 float32) from ``weight_bits``; sets ``weight_hat``."""
        numel = math.prod(self.weight_shape)
        bits = unpack_bits(self.weight_bits, self.M * numel).view(self.M, *self.weight_shape)
        bases = torch.where(bits, 1.0, -1.0)
        # Σ αₘ Bₘ exactly as the float layer forms it (reference path, N = 0 layers, fallbacks)
        self.register_buffer("weight_hat", combine(self.alphas, bases), persistent=False)
        return bits, bases

    def _prepare_kernel(self, bits: Tensor, bases: Tensor, kh: int, kw: int) -> None:
        """The kernel's layout: weights (M, COB, kh, kw, Wc, 8) int64 with the same word of 8 output
        channels side by side, and coef (M, N, COB·8) = −2 αₘ[co] βₙ.

        Dense taps: when a kernel row's kw·C_in bits fit in fewer words than kw·ceil(C_in/64) (fewer
        than 64 input channels, mostly), the row is packed as one bit string, (M, COB, kh, 1, Wr, 8)
        with Wr = ceil(kw·C_in/64), and the kernel packs the input the same way (16 channels, 3×3:
        a third of the popcounts)."""
        M, C_out = self.M, self.weight_shape[0]
        COB = (C_out + 7) // 8
        by_tap = bits.reshape(M, C_out, -1, kh, kw).permute(0, 1, 3, 4, 2)  # (M, C_out, kh, kw, C_in)
        C_in, taps = by_tap.shape[-1], kw
        if kw > 1 and (kw * C_in + 63) // 64 < kw * ((C_in + 63) // 64):
            by_tap = by_tap.reshape(M, C_out, kh, 1, kw * C_in)
            taps = 1
        words = pack_words(by_tap)  # (M, C_out, kh, taps, Wc)
        words = F.pad(words, (0, 0, 0, 0, 0, 0, 0, COB * 8 - C_out))
        wk = words.view(M, COB, 8, kh, taps, -1).permute(0, 1, 3, 4, 5, 2).contiguous()
        alphas = self.alphas.double()
        alphas = alphas.view(M, 1).expand(M, C_out) if alphas.dim() == 1 else alphas
        self.register_buffer("_wk", wk, persistent=False)
        # float64 helpers the CPU kernel's coefficients and border term are computed from: plain
        # attributes, not buffers, so that model.float() / .to() leave their precision alone
        self._alpha_by_channel = alphas  # (M, C_out)
        self._rowsums = bases.double().sum(2).reshape(M * C_out, 1, kh, kw) if bases.dim() == 5 else None
        self.register_buffer("_coef", self._kernel_coef(), persistent=False)
        self.native = True

    def _kernel_coef(self) -> Tensor:
        """coef (M, N, COB·8) float32 = −2 αₘ[co] βₙ (times a folded BatchNorm's scale), 0 for the
        padded channels; the products in float64, rounded once."""
        M, C_out = self.M, self.weight_shape[0]
        coef = -2.0 * self._alpha_by_channel.view(M, 1, C_out) * self.betas.double().view(1, -1, 1)
        if self.post_scale is not None:
            coef = coef * self.post_scale.view(1, 1, C_out)
        return F.pad(coef, (0, (C_out + 7) // 8 * 8 - C_out)).float().contiguous()

    def _use_native(self, x: Tensor) -> str | None:
        """The native path to run ``x`` on, or None for the reference path."""
        if not self.native or x.device.type != "cpu" or x.dtype != torch.float32:
            return None
        isa = _ext.get_isa()
        return None if isa == "reference" else isa

    def _clear_caches(self) -> None:
        self.state_version += 1
        if hasattr(self, "_bterms"):
            self._bterms.clear()  # border terms depend on the stored tensors and a folded affine

    # ----------------------------------------------------------------------------------- input checks

    def describe(self) -> str:
        """The layer as error messages name it: kind, module name and geometry."""
        name = f" {self.name!r}" if self.name else ""
        return f"packed {self.kind}{name} ({self._geometry()})"

    def _geometry(self) -> str:
        raise NotImplementedError

    def _check_tensor(self, x, what: str = "input") -> None:
        """Type, dtype and device of an input (subclasses check its shape)."""
        if not isinstance(x, Tensor):
            raise ValueError(f"{self.describe()}: expected a tensor {what}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{self.describe()}: expected a floating-point {what} (float32; float16, bfloat16 and "
                             f"float64 are computed in float32), got {x.dtype}: convert it with .float() (and "
                             "normalize it as in training)")
        device = self.weight_bits.device
        if x.device != device:
            raise ValueError(f"{self.describe()}: the {what} is on {x.device} but the layer is on {device}: move the "
                             f"{what} (x.to({str(device)!r})) or the model (model.to(...))")

    # ------------------------------------------------------------------------- dtype and device moves

    def _apply(self, fn, recurse=True):
        # .to() / .cpu() move the buffers; .half() / .double() / .to(dtype) must not change the stored
        # float32 values (the kernel reads float32, and a rounding would change every output): the
        # buffers keep their dtype and values, on the new device
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
        result = super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers.get(name)
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        self._clear_caches()
        return result

    # ------------------------------------------------------------------------------------- state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.post_scale is not None:
            # a fold by pack_model is float32 (as the file stores it); a run-time fold float64, as used
            dtype = torch.float32 if self.folded_batchnorm else torch.float64
            destination[prefix + "output_scale"] = self.post_scale.to(dtype)
            destination[prefix + "output_shift"] = self.post_shift.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Load the stored tensors (and a folded BatchNorm's scale and shift, if this layer has one),
        then rebuild every derived tensor from them. M, N, scope, shape, bias and whether a BatchNorm is
        folded are fixed when a layer is packed: a state dict that differs there is refused."""
        errors = len(error_msgs)
        if any(prefix + name in state_dict for name in self.STORED):  # states from before the input offset
            state_dict.setdefault(prefix + "input_offset", torch.zeros((), dtype=torch.float32))
        affine_keys = (prefix + "output_scale", prefix + "output_shift")
        if not any(prefix + name in state_dict for name in (*self.STORED, "output_scale", "output_shift")):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if self.post_scale is not None:
                missing_keys.extend(affine_keys)
            return  # nothing of this layer loaded: nothing to rebuild
        affine = None
        if self.post_scale is not None:
            present = [key in state_dict for key in affine_keys]
            missing_keys.extend(key for key, here in zip(affine_keys, present) if not here)
            if all(present):
                affine = [state_dict[key] for key in affine_keys]
                for key, value in zip(affine_keys, affine):
                    if not isinstance(value, Tensor) or tuple(value.shape) != (self.weight_shape[0],):
                        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                        error_msgs.append(f"size mismatch for {key}: expected ({self.weight_shape[0]},), got {got}")
                        affine = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.post_scale is not None:  # ours, not unexpected
            unexpected_keys[:] = [key for key in unexpected_keys if key not in affine_keys]
        elif strict and any(key in state_dict for key in affine_keys):
            error_msgs.append(f"{prefix}output_scale/output_shift: the state has a BatchNorm folded into "
                              f"{self.describe()}, this model does not")
        try:  # buffers replaced (assign=True) or converted must still be what the kernel reads
            for name, (dtype, shape) in self._stored_shapes(self.bias is not None).items():
                tensor = self._buffers[name]
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"{prefix}{name} has shape {tuple(tensor.shape)}, expected {shape}")
                self._buffers[name] = tensor.to(dtype).contiguous()
            offset = self._buffers["input_offset"]
            if offset.dim() != 0:
                raise ValueError(f"{prefix}input_offset has shape {tuple(offset.shape)}, expected a scalar")
            self._buffers["input_offset"] = offset.float()
            if affine is not None:
                scale, shift = (value.detach().to("cpu", torch.float64) for value in affine)
                if self.folded_batchnorm:  # stored in the file as float32: keep it exactly that
                    scale, shift = scale.float().double(), shift.float().double()
                self.post_scale, self.post_shift = scale.contiguous(), shift.contiguous()
        except ValueError as error:
            error_msgs.append(str(error))
        if len(error_msgs) > errors:
            error_msgs.append(f"{prefix or 'the model'}: a packed layer's M, N, scope, shapes, bias and folded "
                              "BatchNorm are fixed when it is packed: to load other values, pack the model they come "
                              "from (pack_model) or load its packed file (load_packed)")
        self._derive()  # from whatever the buffers now hold: never a mix of old and new

    # -------------------------------------------------------------------------------------- the file

    def stored_tensors(self) -> dict[str, Tensor]:
        """The tensors a file keeps for this layer: the persistent buffers, and the scale and shift of a
        BatchNorm that pack_model folded in (float32, exactly as the layer uses them)."""
        if self.relu or (self.post_scale is not None and not self.folded_batchnorm):
            raise ValueError(f"{type(self).__name__} has a BatchNorm or ReLU fused at run time "
                             "(fuse_batchnorm_relu), which a packed file cannot hold: save the pack_model result")
        names = ("weight_bits", "alphas", "shifts", "betas") + (("bias",) if self.bias is not None else ())
        stored = {name: getattr(self, name) for name in names}
        if self.folded_batchnorm:
            stored["output_scale"], stored["output_shift"] = self.post_scale.float(), self.post_shift.float()
        return stored

    def binary_weight_count(self) -> int:
        """Returns:
            the number of binary weights (entries of the float weight, each stored as M bits)."""
        return math.prod(self.weight_shape)


class PackedABCConv2d(PackedABCLayer):
    """Inference-only packed version of an eval-mode :class:`~abc_experiments.nn.ABCConv2d`."""

    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", *, M: int, N: int, scope: str,
                 weight_bits: Tensor, alphas: Tensor, shifts: Tensor, betas: Tensor, bias: Tensor | None = None,
                 input_offset: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups = {groups} must divide in_channels = {in_channels} and out_channels = "
                             f"{out_channels}")
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._setup(shape, M, N, scope, weight_bits, alphas, shifts, betas, bias, input_offset)
        if self.padding == "valid":
            self.padding = (0, 0)
        self._bterms: dict[tuple[int, int], Tensor] = {}
        self._calls: dict[tuple[int, int, str, bool], tuple] = {}  # _operator_args, per size, path, layout
        # (input shape, strides, path) -> _operator_args, for dense float32 CPU inputs that passed every check
        self._checked: dict[tuple[torch.Size, tuple, str], tuple] = {}
        reasons = []
        if self.groups != 1:
            reasons.append(f"groups = {self.groups}")
        if self.padding_mode != "zeros":
            reasons.append(f"padding_mode = {self.padding_mode!r}")
        if isinstance(self.padding, str):
            reasons.append(f"padding = {self.padding!r}")
        self._kernel_ok = self.N > 0 and not reasons
        if self.N > 0 and reasons:
            log.info("packed conv %s: %s has no binary kernel; using the float reference path",
                     self.extra_repr(), ", ".join(reasons))
        self._derive()

    def _derive(self) -> None:
        # whether the input offset changes the output beyond the bias (zero-padded borders), read once
        # here (init, load_state_dict) rather than from the buffer in every forward (a device sync)
        padded = isinstance(self.padding, str) or any(p > 0 for p in self.padding)
        self._offset_at_borders = bool(self.N and padded and self.padding_mode == "zeros"
                                       and float(self.input_offset) != 0.0)
        bits, bases = self._unpacked()
        if self._kernel_ok:
            self._prepare_kernel(bits, bases, *self.kernel_size)
        self._clear_caches()

    def _geometry(self) -> str:
        kh, kw = self.kernel_size
        return f"{self.in_channels} -> {self.out_channels} channels, {kh}x{kw} kernel"

    def _check_input(self, x) -> None:
        """Refuse (ValueError) an input this layer cannot compute, before anything reads it."""
        self._check_tensor(x)
        if x.dim() != 4:
            raise ValueError(f"{self.describe()}: expected a 4-d input (batch, {self.in_channels} channels, height, "
                             f"width), got shape {tuple(x.shape)}" + (" (for one image use x.unsqueeze(0))"
                                                                      if x.dim() == 3 else ""))
        self._check_shape(tuple(x.shape))

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        """Channels and spatial size of a 4-d input shape against the layer."""
        if shape[1] != self.in_channels:
            raise ValueError(f"{self.describe()}: expected an input with {self.in_channels} channels, got shape "
                             f"{shape}")
        if shape[2] < 1 or shape[3] < 1:
            raise ValueError(f"{self.describe()}: expected a non-empty image, got shape {shape}")
        if not isinstance(self.padding, str):
            need = [d * (k - 1) + 1 - 2 * p for k, p, d in zip(self.kernel_size, self.padding, self.dilation)]
            if shape[2] < need[0] or shape[3] < need[1]:
                raise ValueError(f"{self.describe()}: expected an input of at least {need[0]}x{need[1]} pixels "
                                 f"(kernel {self.kernel_size}, padding {self.padding}, dilation {self.dilation}), "
                                 f"got shape {shape}")

    @classmethod
    def from_abc(cls, layer: ABCConv2d) -> PackedABCConv2d:
        """Pack an eval-mode ABCConv2d (its frozen alphas, bases, shifts, betas and bias)."""
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.groups, layer.padding_mode, **_abc_parts(layer))

    def config(self) -> dict:
        """Hyper-parameters (JSON-able) to rebuild the layer with the stored tensors."""
        return {"type": self.kind, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "padding_mode": self.padding_mode,
                "M": self.M, "N": self.N, "scope": self.scope, "bias": self.bias is not None}

    def border_term(self, H: int, W: int) -> Tensor:
        """bias + Σβ·Σₘ αₘ Sₘ for an H×W input: (C_out, OH, OW) float32, cached per input size."""
        key = (H, W)
        if key not in self._bterms:
            ph, pw = self.padding
            outside = torch.ones(1, 1, H + 2 * ph, W + 2 * pw, dtype=torch.float64)
            outside[..., ph:ph + H, pw:pw + W] = 0
            S = F.conv2d(outside, self._rowsums, stride=self.stride, dilation=self.dilation)[0]
            S = S.view(self.M, self.out_channels, *S.shape[-2:])
            # padded pixels are packed as −1 in every plane: + Σβ·Σₘ αₘSₘ makes them 0; − c·Σₘ αₘSₘ removes
            # the input offset c there (the bias holds c·ΣŴ, all taps; the border sees 0, not c)
            weight = self.betas.double().sum() - self.input_offset.double()
            term = weight * (self._alpha_by_channel.view(self.M, -1, 1, 1) * S).sum(0)
            if self.bias is not None:
                term = term + self.bias.double().view(-1, 1, 1)
            if self.post_scale is not None:
                term = term * self.post_scale.view(-1, 1, 1) + self.post_shift.view(-1, 1, 1)
            if len(self._bterms) >= CACHE_ENTRIES:
                self._bterms.clear()
            self._bterms[key] = term.float().contiguous()
        return self._bterms[key]

    def reference_forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The fused float form conv(Σβₙ Hₙ(x), Σ αₘ Bₘ) + bias (what the float layer computes),
        then the fused output steps (folded BatchNorm, residual, ReLU) if any."""
        a = staircase(x, self.shifts.to(x.dtype), self.betas.to(x.dtype)) if self.N else x
        weight = self.weight_hat.to(x.device, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        if self._offset_at_borders:
            # as ABCConv2d: conv(c + ΣβA, Ŵ) with zero padding, the bias without the folded c·ΣŴ
            c = self.input_offset.to(x.device, x.dtype)
            a = a + c
            bias = (0.0 if bias is None else bias) - c * weight.flatten(1).sum(1)
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            out = F.conv2d(F.pad(a, (pw, pw, ph, ph), mode=self.padding_mode), weight, bias, self.stride, 0,
                           self.dilation, self.groups)
        else:
            out = F.conv2d(a, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.post_scale is not None:
            out = out * self.post_scale.to(x.device, x.dtype).view(-1, 1, 1) \
                + self.post_shift.to(x.device, x.dtype).view(-1, 1, 1)
        if residual is not None:
            out = out + residual
        return torch.relu(out) if self.relu else out

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.BatchNorm2d, *, name: str | None = None) -> None:
        """Fold an eval-mode BatchNorm2d that takes this layer's output into the layer: its affine
        y·s + t (s = γ/√(σ² + ε), t = β − μ·s, per output channel) scales the kernel's coefficients
        and the border term, so the kernel writes the normalized output and no pass over it is left.
        Equal to the BatchNorm applied after, up to float rounding (not bit for bit).

        ``name`` (the BatchNorm's module name; what :func:`~abc_experiments.packed.pack_model` does)
        makes the fold part of the layer's stored state: s and t are rounded to float32, so that the
        packed file holds them exactly, and the name is recorded to rebuild the model. Without it the
        fold is a run-time step (composed with an earlier fold) that a file cannot hold."""
        if bn.training or bn.running_mean is None or bn.num_features != self.out_channels:
            raise ValueError(f"cannot fold {bn} into a packed conv with {self.out_channels} output channels: "
                             "it needs an eval-mode BatchNorm2d with running statistics over those channels")
        if self.relu:
            raise ValueError("a BatchNorm cannot follow a fused ReLU")
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        if name is not None:
            if self.post_scale is not None:
                raise ValueError(f"a BatchNorm ({self.folded_batchnorm or 'at run time'}) is already folded into "
                                 f"this layer; a second stored fold ({name}) is not supported")
            self.set_output_affine(scale.float(), shift.float(), batchnorm=name)
            return
        if self.post_scale is not None:  # a second fold composes with the first
            scale, shift = self.post_scale * scale, self.post_shift * scale + shift
        self.set_output_affine(scale, shift)

    @torch.no_grad()
    def set_output_affine(self, scale: Tensor, shift: Tensor, *, batchnorm: str | None = None) -> None:
        """Make the layer output y·scale + shift per output channel (a folded BatchNorm; float64 kept
        as given). ``batchnorm``: the folded module's name, for the packed file (see fold_batchnorm)."""
        shape = (self.out_channels,)
        if tuple(scale.shape) != shape or tuple(shift.shape) != shape:
            raise ValueError(f"output scale and shift must have shape {shape}, got {tuple(scale.shape)} and "
                             f"{tuple(shift.shape)}")
        self.post_scale = scale.detach().double().cpu().contiguous()
        self.post_shift = shift.detach().double().cpu().contiguous()
        self.folded_batchnorm = batchnorm
        self._clear_caches()
        if self.native:
            self._coef = self._kernel_coef()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``residual`` (the output's shape; given by :func:`fuse_batchnorm_relu` for a residual
        addition that follows the layer) is added before the fused ReLU.

        Raises:
            ValueError: an input of the wrong rank, channel count, spatial size, dtype or device
                (see the module docstring); float16, bfloat16 and float64 are computed in float32."""
        if residual is None and type(x) is Tensor and x.dtype is torch.float32 and x.is_cpu:
            # an input shape that passed every check before on this path (at batch 1 the checks and
            # argument building in Python cost as much as a small layer's binary loop)
            checked = self._checked.get((x.shape, x.stride(), _ext.get_isa()))  # (a dense layout seen before)
            if checked is not None:
                return checked[0](x, *checked[1], self.relu, None)
        self._check_input(x)
        if x.dtype != torch.float32:
            if isinstance(residual, Tensor) and residual.is_floating_point():
                residual = residual.float()
            return self._forward_float32(x.float(), residual).to(x.dtype)
        return self._forward_float32(x, residual)

    def _forward_float32(self, x: Tensor, residual) -> Tensor:
        isa = self._use_native(x) if x.shape[0] > 0 else None  # an empty batch: F.conv2d's empty output
        if isa is None or (residual is not None and not (isinstance(residual, Tensor)
                                                         and residual.dtype == torch.float32
                                                         and residual.device == x.device)):
            return self.reference_forward(x, residual)  # adds a non-tensor "residual" (a number) as the graph did
        # a channels_last input runs channels-last (no transposes; the output channels_last, as
        # F.conv2d's), with the border term in that layout; any other layout is made NCHW first.
        # (An input dense in both orders, 1 channel or a 1x1 map, gets the NCHW border term; the
        # operator follows its strides whichever output layout torch picks: the same numbers.)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if not (channels_last or x.is_contiguous()):
            x = x.contiguous()
        op, args = self._operator_args(x.shape[2], x.shape[3], isa, channels_last)
        if residual is None:
            if x.is_cpu:  # (a CPU input of a checked shape and layout: forward's fast path next time)
                if len(self._checked) >= CACHE_ENTRIES:
                    self._checked.clear()
                self._checked[(x.shape, x.stride(), isa)] = (op, args)
            return op(x, *args, self.relu, None)
        if residual.shape != (x.shape[0], *args[2].shape):  # a broadcast addition
            out = op(x, *args, False, None) + residual
            return torch.relu(out) if self.relu else out
        return op(x, *args, self.relu, residual)  # (the operator copies it to the output's layout if needed)

    def _operator_args(self, H: int, W: int, isa: str, channels_last: bool = False) -> tuple:
        """(operator, its arguments after the input up to the ISA code) for an H×W input: built once
        per input size, path and layout (at batch 1 the Python around a small layer's call costs as
        much as its kernel; the operator's C++ side checks every argument on every call).
        ``channels_last``: the border term laid out as (OH, OW, C_out) in memory, which a
        channels-last output reads 8 channels at a time."""
        key = (H, W, isa, channels_last)
        args = self._calls.get(key)
        if args is None:
            bterm = self.border_term(H, W)
            if channels_last:
                bterm = bterm.permute(1, 2, 0).contiguous().permute(2, 0, 1)
            args = (torch.ops.abc_packed.conv2d.default,
                    (self._wk, self._coef, bterm, self.shifts, self.out_channels,
                     list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation),
                     self.K / 2, _ext.ISA_CODES[isa]))
            if len(self._calls) >= CACHE_ENTRIES:
                self._calls.clear()
            self._calls[key] = args
        return args

    def _clear_caches(self) -> None:
        # .to() / .cpu(), load_state_dict and a new fold replace the tensors the cached arguments hold
        self._bterms.clear()
        self._calls.clear()
        self._checked.clear()
        super()._clear_caches()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, M={self.M}, N={self.N}, "
                f"scope={self.scope}, bias={self.bias is not None}"
                + ("" if self.post_scale is None else f", batchnorm {self.folded_batchnorm} folded"
                   if self.folded_batchnorm else ", batchnorm folded") + (", relu" if self.relu else ""))


class PackedABCLinear(PackedABCLayer):
    """Inference-only packed version of an eval-mode :class:`~abc_experiments.nn.ABCLinear`."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, *, M: int, N: int, scope: str, weight_bits: Tensor,
                 alphas: Tensor, shifts: Tensor, betas: Tensor, bias: Tensor | None = None, input_offset: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        # a linear layer has no borders: the folded bias alone is exact, the offset is only recorded
        self._setup((self.out_features, self.in_features), M, N, scope, weight_bits, alphas, shifts, betas, bias,
                    input_offset)
        self._derive()

    def _derive(self) -> None:
        bits, bases = self._unpacked()
        if self.N > 0:
            self._prepare_kernel(bits.view(self.M, self.out_features, self.in_features, 1, 1), bases, 1, 1)
            # no padding, so the border term is just the bias
            term = self.bias if self.bias is not None else torch.zeros(self.out_features)
            self.register_buffer("_bterm", term.float().contiguous(), persistent=False)
        self._clear_caches()

    def _geometry(self) -> str:
        return f"{self.in_features} -> {self.out_features} features"

    def _check_input(self, x) -> None:
        """Refuse (ValueError) an input this layer cannot compute, before anything reads it."""
        self._check_tensor(x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.describe()}: expected an input of shape (..., {self.in_features}), got shape "
                             f"{tuple(x.shape)}")

    @classmethod
    def from_abc(cls, layer: ABCLinear) -> PackedABCLinear:
        """Pack an eval-mode ABCLinear."""
        return cls(layer.in_features, layer.out_features, **_abc_parts(layer))

    def config(self) -> dict:
        return {"type": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "M": self.M, "N": self.N, "scope": self.scope, "bias": self.bias is not None}

    def reference_forward(self, x: Tensor) -> Tensor:
        a = staircase(x, self.shifts.to(x.dtype), self.betas.to(x.dtype)) if self.N else x
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(a, self.weight_hat.to(x.device, x.dtype), bias)

    def forward(self, x: Tensor) -> Tensor:
        """The packed layer on ``x`` (..., in_features).

        Raises:
            ValueError: an input of the wrong feature count, dtype or device; float16, bfloat16 and
                float64 are computed in float32."""
        self._check_input(x)
        if x.dtype != torch.float32:
            return self._forward_float32(x.float()).to(x.dtype)
        return self._forward_float32(x)

    def _forward_float32(self, x: Tensor) -> Tensor:
        isa = self._use_native(x) if x.numel() > 0 else None  # no rows: F.linear's empty output
        if isa is None:
            return self.reference_forward(x)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.abc_packed.linear(rows, self._wk, self._coef, self._bterm, self.shifts, self.out_features,
                                          self.K / 2, _ext.ISA_CODES[isa])
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, M={self.M}, N={self.N}, "
                f"scope={self.scope}, bias={self.bias is not None}")


@torch.no_grad()
def _abc_parts(layer) -> dict:
    """What a packed layer keeps of an eval-mode ABC layer: M, N, scope, the bases as bits, the
    frozen alphas, shifts, betas and bias, as float32 on the CPU."""
    _check_eval(layer)
    bases = layer.weight_binarizer.compute_bases(layer.weight.detach()).float().cpu()
    act = layer.activation_binarizer
    shifts = act.shifts.detach().float().cpu() if layer.N else torch.zeros(0)
    betas = act.betas.detach().float().cpu() if layer.N else torch.zeros(0)
    return dict(M=layer.M, N=layer.N, scope=layer.weight_binarizer.scope, weight_bits=pack_bits(bases > 0),
                alphas=layer.weight_binarizer.alphas.detach().float().cpu(), shifts=shifts, betas=betas,
                bias=None if layer.bias is None else layer.bias.detach().float().cpu(),
                input_offset=float(layer.input_offset) if layer.N else 0.0)


def _check_eval(layer: nn.Module) -> None:
    if layer.training:
        raise RuntimeError(f"cannot pack {type(layer).__name__} in training mode: its alphas are refitted every "
                           "step. Call model.eval() first (that fits and freezes them).")


def pack_layer(layer: nn.Module) -> PackedABCLayer:
    """The packed version of an eval-mode ABCConv2d or ABCLinear."""
    if isinstance(layer, ABCConv2d):
        return PackedABCConv2d.from_abc(layer)
    if isinstance(layer, ABCLinear):
        return PackedABCLinear.from_abc(layer)
    raise TypeError(f"expected an ABCConv2d or ABCLinear, got {type(layer).__name__}")
