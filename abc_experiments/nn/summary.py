"""A per-layer account of what binarization costs and saves, in the spirit of ``larq.models.summary``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from .layers import ABCLayer

BITS_FP = 32


@dataclass
class LayerSummary:
    """One ABC layer: approximation errors, storage and compute."""

    name: str
    kind: str
    weight_shape: list[int]
    M: int
    N: int
    weight_error: float  # ‖W − ΣαB‖ / ‖W‖
    activation_error: float | None  # ‖R − ΣβA‖ / ‖R‖ after calibration; None if N = 0 or uncalibrated
    binary_weights: int  # entries of W, each stored as M bits
    bits: int  # M bits per weight + 32-bit alphas
    macs: int | None  # multiply-accumulates of the original layer per example
    binary_macs: int | None  # M·N binary MACs (0 with full-precision activations)


@dataclass
class ModelSummary:
    layers: list[LayerSummary]
    fp_kb: float  # the original model's parameters at 32 bit (ABC shifts, betas, added biases excluded)
    abc_kb: float  # converted weights at M bits + alphas, everything else at 32 bit
    compression: float
    total_macs: int | None
    binary_mac_share: float | None  # share of the original MACs run as binary M·N convolutions
    # Per-layer precision in one number each: M averaged over the binary weights, N over the
    # converted layers' MACs (None without MACs); binary_macs = Σ M·N·MACs, the binary operations.
    mean_M: float | None = None
    mean_N: float | None = None
    binary_macs: int | None = None

    def to_dict(self) -> dict:
        """The summary as plain data: the run summary's part (``abc_experiments.results``).

        Returns:
            ``{"layers": [one dict per layer], "size": {fp_kb, abc_kb, compression, total_macs,
            binary_mac_share}}``.
        """
        size = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}
        return {"layers": [asdict(layer) for layer in self.layers], "size": size}

    def __str__(self) -> str:
        header = (f"{'layer':<28} {'M':>2} {'N':>2} {'W err':>7} {'A err':>7} {'bin weights':>12} {'bits':>11} "
                  f"{'binary MACs':>14}")
        rows = [header, "-" * len(header)]
        for s in self.layers:
            act = "-" if s.activation_error is None else f"{s.activation_error:.4f}"
            bmacs = "-" if s.binary_macs is None else f"{s.binary_macs:,}"
            rows.append(f"{s.name:<28} {s.M:>2} {s.N:>2} {s.weight_error:>7.4f} {act:>7} "
                        f"{s.binary_weights:>12,} {s.bits:>11,} {bmacs:>14}")
        rows.append("-" * len(header))
        rows.append(f"model size: {self.fp_kb:,.1f} kB at 32 bit -> {self.abc_kb:,.1f} kB ABC "
                    f"(compression {self.compression:.2f}x)")
        if self.binary_mac_share is not None:
            rows.append(f"MACs per example: {self.total_macs:,}, binary share {100 * self.binary_mac_share:.1f}%")
        if len({(s.M, s.N) for s in self.layers}) > 1:  # per-layer precision: the averages
            mean_n = "" if self.mean_N is None else f", mean N {self.mean_N:.2f} per MAC"
            binary = "" if self.binary_macs is None else f", {self.binary_macs:,} binary MACs (M·N·MACs)"
            rows.append(f"per-layer precision: mean M {self.mean_M:.2f} per binary weight{mean_n}{binary}")
        return "\n".join(rows)


def _count_macs(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """MACs per example of every conv and linear layer, from one forward pass."""
    macs: dict[str, int] = {}

    def hook(name):
        def record(module, _inputs, output):
            per_output = module.weight[0].numel()  # (C_in/groups)·kh·kw or in_features
            macs[name] = macs.get(name, 0) + output[0].numel() * per_output
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return macs


def summary(model: nn.Module, example_input: Tensor | None = None) -> ModelSummary:
    """Per converted layer: relative weight error, activation error after calibration, binary
    weight count, bits stored (M bits per weight + 32-bit alphas), binary MACs (M·N binary
    convolutions); totals: size in kB (1 kB = 1000 bytes) at 32 bit vs ABC, compression ratio,
    share of MACs that are binary (biases that calibration added count for the ABC model only); with
    per-layer precision, M averaged over the binary weights, N over the converted MACs, and the
    binary MACs Σ M·N·MACs. Every figure uses each layer's own M and N. MAC counts need
    ``example_input`` (one batch is enough).

    Args:
        model: a converted model.
        example_input: one batch, for the MAC counts (None: no MAC figures).

    Returns:
        The :class:`ModelSummary`.
    """
    macs = _count_macs(model, example_input) if example_input is not None else None
    layers, abc_params, converted_weights = [], set(), set()
    for name, layer in model.named_modules():
        if not isinstance(layer, ABCLayer):
            continue
        alphas = layer.weight_binarizer.alphas
        bits = layer.M * layer.weight.numel() + BITS_FP * alphas.numel()
        layer_macs = None if macs is None else macs.get(name, 0)
        layers.append(LayerSummary(
            name=name, kind=type(layer).__name__, weight_shape=list(layer.weight.shape), M=layer.M, N=layer.N,
            weight_error=layer.weight_error(), activation_error=layer.activation_error(),
            binary_weights=layer.weight.numel(), bits=bits, macs=layer_macs,
            binary_macs=None if layer_macs is None else layer.M * layer.N * layer_macs,
        ))
        converted_weights.add(id(layer.weight))
        abc_params.update(id(p) for p in layer.weight_binarizer.parameters())
        if layer.bias_from_calibration:
            abc_params.add(id(layer.bias))
        abc_params.update(id(p) for p in layer.activation_binarizer.parameters())
    original = [p for p in model.parameters() if id(p) not in abc_params]
    fp_bits = BITS_FP * sum(p.numel() for p in original)
    abc_bits = BITS_FP * sum(p.numel() for p in model.parameters() if id(p) not in converted_weights)
    abc_bits += sum(s.bits for s in layers)
    total_macs = None if macs is None else sum(macs.values())
    share = None
    if total_macs:
        share = sum(s.macs for s in layers if s.N > 0) / total_macs
    weights = sum(s.binary_weights for s in layers)
    mean_m = sum(s.M * s.binary_weights for s in layers) / weights if weights else None
    converted_macs = None if macs is None else sum(s.macs for s in layers)
    mean_n = sum(s.N * s.macs for s in layers) / converted_macs if converted_macs else None
    binary_macs = None if macs is None else sum(s.binary_macs for s in layers)
    return ModelSummary(layers=layers, fp_kb=fp_bits / 8000, abc_kb=abc_bits / 8000,
                        compression=fp_bits / abc_bits if abc_bits else 1.0,
                        total_macs=total_macs, binary_mac_share=share, mean_M=mean_m, mean_N=mean_n,
                        binary_macs=binary_macs)
