"""ABC convolution and fully connected layers (ABC-Net, Lin, Zhao & Pan, NIPS 2017, arXiv 1711.11294).

The ABC layer computes (paper eq. 9)::

    Conv(W, R) ≈ Σₘ Σₙ αₘ βₙ Conv(Bₘ, Aₙ)

Convolution is bilinear, so the double sum equals ONE convolution of (Σₙ βₙAₙ) with (Σₘ αₘBₘ);
``impl="fused"`` (the default) computes exactly that, like timm's ``StdConv2d``: transform the
weight (and here the input) in ``forward`` and call the ordinary conv. ``impl="naive"`` performs the
M·N separate binary convolutions and sums them, as a hardware implementation would; it is kept as
the reference the fused path is tested against. The bias is added once, outside the binary sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ActivationBinarizer
from .weights import WeightBinarizer, check_count, combine, relative_error

IMPLS = ("fused", "naive")


class ABCLayer(nn.Module):
    """Behaviour shared by :class:`ABCConv2d` and :class:`ABCLinear` (a mixin over the torch layer).

    Attributes: ``weight_binarizer`` (M bases and alphas), ``activation_binarizer`` (N bases with
    shifts and betas, or ``nn.Identity`` when N = 0: full-precision activations, the paper's
    weight-only setting), ``bias_from_calibration`` (True when the layer's bias was created by
    :meth:`add_calibration_bias`: the original layer had none, so it is no part of the original
    model's size).
    """

    bias_from_calibration: bool = False

    def _setup_abc(self, M, N, scope, impl, bases, learn_u, alpha_fit, kernel):
        # The input offset c of the calibrated staircase (R ≈ c + ΣβA): c·ΣŴ is folded into the bias,
        # and zero-padded borders, where the input is 0 and not c, are corrected exactly in forward.
        self.register_buffer("input_offset", torch.zeros((), device=self.weight.device))
        self._offset_set = False  # input_offset != 0, known without reading the buffer (no device sync)
        if N is None:
            N = 0
        check_count("M", M, 1)
        check_count("N", N, 0)
        if impl not in IMPLS:
            raise ValueError(f"unknown impl {impl!r}: choose one of {', '.join(IMPLS)}")
        self.M, self.N, self.impl = M, N, impl
        self.bias_from_calibration = False
        self.weight_binarizer = WeightBinarizer(
            M, scope, bases=bases, learn_u=learn_u, alpha_fit=alpha_fit, out_channels=self.weight.shape[0]
        ).to(self.weight.device)
        self.activation_binarizer = (
            ActivationBinarizer(N, kernel=kernel).to(self.weight.device) if N > 0 else nn.Identity()
        )
        # No alpha fit here: a training forward fits them, and so does the switch to eval().

    def _take_trained(self, source: nn.Module):
        """Copy ``source``'s trained weight and bias and match its train/eval mode; the alphas are
        fitted once, to the trained weight (by ``eval()`` for an eval-mode source)."""
        with torch.no_grad():
            self.weight.copy_(source.weight)
            if source.bias is not None:
                self.bias.copy_(source.bias)
        if source.training:
            self.weight_binarizer.refit(self.weight.detach())
        return self.train(source.training)

    def _linear_op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's own operation (conv or matmul)."""
        raise NotImplementedError

    def _channel_view(self, alphas: Tensor) -> Tensor:
        """Per-output-channel alphas (C_out,) shaped to scale the layer output."""
        raise NotImplementedError

    def _offset_reaches_borders(self) -> bool:
        """Whether the input offset changes the output beyond the folded bias: a calibrated
        convolution that pads with zeros (the padded input is 0, not the offset c)."""
        return False

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "naive":
            return self._naive_forward(x)
        a, weight, bias = self.activation_binarizer(x), self.weight_binarizer(self.weight), self.bias
        if self._offset_reaches_borders():
            # conv(c + ΣβA, Ŵ) with zero padding, and the bias without the folded c·ΣŴ: exact at the
            # borders too (the folded bias alone assumed the input c there).
            c = self.input_offset.to(a.dtype)
            a = a + c
            bias = bias - c * weight.flatten(1).sum(1)
        return self._linear_op(a, weight, bias)

    def _naive_forward(self, x: Tensor) -> Tensor:
        """Σₘ Σₙ αₘ βₙ op(Bₘ, Aₙ) + bias, with M·N separate binary operations."""
        weight_bases, alphas = self.weight_binarizer.bases_with_grad(self.weight)
        if self.N > 0:
            act_bases, betas = self.activation_binarizer.bases_with_grad(x)
        else:
            act_bases, betas = x.unsqueeze(0), torch.ones(1, device=x.device, dtype=x.dtype)
        out = 0
        for m in range(self.M):
            alpha = alphas[m] if alphas.dim() == 1 else self._channel_view(alphas[m])
            for n in range(act_bases.shape[0]):
                out = out + alpha * betas[n] * self._linear_op(act_bases[n], weight_bases[m])
        if self._offset_reaches_borders():  # c·conv(1, Ŵ) − c·ΣŴ: nonzero only at zero-padded borders
            weight = combine(alphas, weight_bases)
            c = self.input_offset.to(x.dtype)
            out = out + c * (self._linear_op(torch.ones_like(act_bases[0]), weight)
                             - self._channel_view(weight.flatten(1).sum(1)))
        return out if self.bias is None else out + self._channel_view(self.bias)

    def train(self, mode: bool = True):
        """Set the training mode; switching to eval refits the alphas to the current weight and
        freezes them.

        Args:
            mode: True for training, False for eval.

        Returns:
            The layer.
        """
        if not mode and self.training:
            self.weight_binarizer.refit(self.weight.detach())
            self.weight_binarizer.approximation(self.weight.detach())  # the frozen weight, cached
        return super().train(mode)

    @torch.no_grad()
    def add_calibration_bias(self) -> Tensor:
        """Give the layer a zero bias, declared as :attr:`bias_from_calibration`, if it has none, so
        that calibration can fold its input offset there (and a checkpoint holding that bias loads).

        Returns:
            The layer's bias (the existing one, or the new zero bias of ``C_out`` entries).
        """
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.weight.shape[0], dtype=self.weight.dtype,
                                                 device=self.weight.device))
            self.bias_from_calibration = True
        return self.bias

    @torch.no_grad()
    def set_input_offset(self, offset: float) -> None:
        """Make the layer compute op(c + ΣβA, Ŵ) for the calibrated staircase R ≈ c + ΣβA: the
        bias gains (c − c_before)·ΣŴ per output channel (so calibrating again replaces the offset,
        not adds to it), and :attr:`input_offset` keeps c for the zero-padded borders of a
        convolution, where the input is 0 and the folded bias alone would be off by c times the
        out-of-image weights. A layer without a bias gets one (:meth:`add_calibration_bias`).

        Args:
            offset: the input offset c that :meth:`.ActivationBinarizer.calibrate` returned.
        """
        change = float(offset) - float(self.input_offset)
        self.add_calibration_bias().add_(change * self.approximated_weight().flatten(1).sum(1))
        self.input_offset.fill_(float(offset))
        self._offset_set = float(offset) != 0.0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints from before the exact border correction have no input offset: their layers
        # folded c·ΣŴ into the bias only, which an offset of 0 reproduces.
        state_dict.setdefault(prefix + "input_offset", torch.zeros_like(self.input_offset))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._offset_set = bool(self.input_offset.detach().cpu() != 0)

    def approximated_weight(self) -> Tensor:
        """The binary approximation of the weight.

        Returns:
            Σₘ αₘBₘ with the stored alphas, the weight's shape, without gradient.
        """
        return self.weight_binarizer.approximation(self.weight.detach())

    def weight_error(self) -> float:
        """How well the binary bases approximate the weight.

        Returns:
            The relative error ‖W − Σ αB‖ / ‖W‖ with the stored alphas.
        """
        return relative_error(self.weight.detach(), self.approximated_weight())

    def activation_error(self) -> float | None:
        """How well the activation bases fitted the layer's inputs at calibration.

        Returns:
            ‖R − c − ΣβA‖ / ‖R‖ from the last calibration; None if uncalibrated or N = 0.
        """
        if self.N == 0:
            return None
        error = self.activation_binarizer.calibration_error.item()
        return None if error != error else error


def _abc_repr(layer: ABCLayer, base: str) -> str:
    return f"{base}, M={layer.M}, N={layer.N}, impl={layer.impl}"


class ABCConv2d(ABCLayer, nn.Conv2d):
    """A ``Conv2d`` whose weight is Σₘ αₘBₘ and whose input is Σₙ βₙAₙ (ABC-Net, arXiv 1711.11294).

    Supports everything ``nn.Conv2d`` does (stride, padding and padding modes, dilation, groups,
    bias). Build one from a trained conv with :meth:`from_conv`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as for ``nn.Conv2d``.
        M: weight bases (≥ 1).
        N: activation bases (≥ 0; 0 or None: full-precision activations).
        scope: ``"per_layer"`` (the paper) or ``"per_channel"`` alphas.
        impl: ``"fused"`` (one conv) or ``"naive"`` (M·N binary convs, the reference).
        bases: ``"shifted"`` (the paper's grid), ``"residual"`` or ``"alternating"`` (see weights.py).
        learn_u: learn the weight shifts uₘ.
        alpha_fit: ``"lstsq"`` (closed form) or ``"adam"``.
        kernel: the activation kernel (see :class:`.ActivationBinarizer`).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, M=3, N=3, scope="per_layer", impl="fused",
                 bases="shifted", learn_u=False, alpha_fit="lstsq", kernel="auto", device=None, dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           bias, padding_mode, device=device, dtype=dtype)
        self._setup_abc(M, N, scope, impl, bases, learn_u, alpha_fit, kernel)

    def _offset_reaches_borders(self) -> bool:
        padded = isinstance(self.padding, str) or any(p > 0 for p in self.padding)
        return self.N > 0 and padded and self.padding_mode == "zeros" and self._offset_set

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, M: int, N: int, scope: str = "per_layer", impl: str = "fused",
                  **options) -> ABCConv2d:
        """An ABC layer with ``conv``'s hyper-parameters and a copy of its trained weight and bias.

        Args:
            conv: the trained convolution.
            M: weight bases (≥ 1).
            N: activation bases (≥ 0; 0: full-precision activations).
            scope: ``"per_layer"`` or ``"per_channel"`` alphas.
            impl: ``"fused"`` or ``"naive"``.
            **options: ``bases``, ``learn_u``, ``alpha_fit``, ``kernel``.

        Returns:
            The new layer, on ``conv``'s device, in ``conv``'s train/eval mode.
        """
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    M=M, N=N, scope=scope, impl=impl, device=conv.weight.device, dtype=conv.weight.dtype,
                    **options)
        return layer._take_trained(conv)

    def _linear_op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return self._conv_forward(x, weight, bias)

    def _channel_view(self, values: Tensor) -> Tensor:
        return values.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return _abc_repr(self, nn.Conv2d.extra_repr(self))


class ABCLinear(ABCLayer, nn.Linear):
    """A ``Linear`` layer with ABC weights Σₘ αₘBₘ and ABC inputs Σₙ βₙAₙ.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        M, N, scope, impl, bases, learn_u, alpha_fit, kernel: as for :class:`ABCConv2d`.
    """

    def __init__(self, in_features, out_features, bias=True, *, M=3, N=3, scope="per_layer", impl="fused",
                 bases="shifted", learn_u=False, alpha_fit="lstsq", kernel="auto", device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_abc(M, N, scope, impl, bases, learn_u, alpha_fit, kernel)

    @classmethod
    def from_linear(cls, linear: nn.Linear, M: int, N: int, scope: str = "per_layer", impl: str = "fused",
                    **options) -> ABCLinear:
        """An ABC layer with a copy of ``linear``'s trained weight and bias.

        Args:
            linear: the trained linear layer.
            M: weight bases (≥ 1).
            N: activation bases (≥ 0; 0: full-precision activations).
            scope: ``"per_layer"`` or ``"per_channel"`` alphas.
            impl: ``"fused"`` or ``"naive"``.
            **options: ``bases``, ``learn_u``, ``alpha_fit``, ``kernel``.

        Returns:
            The new layer, on ``linear``'s device, in ``linear``'s train/eval mode.
        """
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, M=M, N=N, scope=scope,
                    impl=impl, device=linear.weight.device, dtype=linear.weight.dtype, **options)
        return layer._take_trained(linear)

    def _linear_op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(x, weight, bias)

    def _channel_view(self, values: Tensor) -> Tensor:
        return values

    def extra_repr(self) -> str:
        return _abc_repr(self, nn.Linear.extra_repr(self))
