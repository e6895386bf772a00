"""Fit the activation bases of a converted model to real data, before any fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .convert import abc_layers
from .layers import ABCLayer


class _Collected(Exception):
    """Raised by the collecting hook to stop the forward pass once the layer's input is seen."""


def _inputs(batches: Iterable, device: torch.device) -> list[Tensor]:
    """Model inputs from batches of tensors or (input, target) pairs, on ``device``."""
    inputs = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in batches]
    if not inputs:
        raise ValueError("calibrate needs at least one batch of inputs")
    return [x.to(device) for x in inputs]


def _forward_order(model: nn.Module, layers: list[tuple[str, ABCLayer]], x: Tensor) -> list[tuple[str, ABCLayer]]:
    """The layers sorted by the order in which a forward pass reaches them."""
    seen: list[str] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, _i, name=name: seen.append(name)) for name, layer in layers]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    by_name = dict(layers)
    return [(name, by_name[name]) for name in dict.fromkeys(seen)]


def _collect_inputs(model: nn.Module, layer: nn.Module, inputs: list[Tensor], per_batch: int,
                    generator: torch.Generator) -> Tensor:
    """A random sample (at most ``per_batch`` values per batch) of what ``layer`` receives."""
    samples = []

    def hook(_module, args):
        values = args[0].detach().flatten()
        if values.numel() > per_batch:
            index = torch.randint(values.numel(), (per_batch,), generator=generator).to(values.device)
            values = values[index]
        samples.append(values.float().cpu())
        raise _Collected

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            try:
                model(x)
            except _Collected:
                pass
    finally:
        handle.remove()
    return torch.cat(samples)


def recalibrate_batchnorm(model: nn.Module, inputs: list[Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics (cumulative average) on ``inputs``, so the
    normalisation matches the converted layers' outputs.

    Args:
        model: the model (left in its BatchNorms' eval mode).
        inputs: model input batches, on the model's device.

    Returns:
        The number of BatchNorm layers re-estimated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        for x in inputs:
            model(x)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            norm.eval()
    return len(norms)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    max_samples: int = 1 << 18,
    iterations: int = 25,
    batchnorm: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Initialise each ABC layer's shifts vₙ and betas βₙ from the distribution of its real inputs.

    Layers are calibrated one at a time in forward order, each on inputs that flow through the
    already calibrated layers before it (so later layers see the quantized network they will run
    in). Each layer fits a sample of at most ``max_samples`` input values with
    :func:`~abc_experiments.nn.activations.fit_activation_bases` (Lloyd–Max thresholds, betas and an
    input offset by least squares) and folds the offset into its bias. With ``batchnorm``,
    BatchNorm running statistics are then re-estimated on the same batches. ``batches`` yields input tensors or
    (input, target) pairs, e.g. a few batches of a training DataLoader.

    Args:
        model: a converted model (its train/eval mode is restored afterwards).
        batches: input tensors or (input, target) pairs.
        max_samples: the most input values fitted per layer.
        iterations: the most Lloyd–Max alternations per layer.
        batchnorm: re-estimate the BatchNorm statistics afterwards.
        seed: seeds the choice of sampled values.
        progress: called with each layer's name once it is calibrated.

    Returns:
        The relative activation error ‖R − c − ΣβA‖/‖R‖ per calibrated layer name.
    """
    device = next(model.parameters()).device
    inputs = _inputs(batches, device)
    was_training = model.training
    model.eval()
    try:
        layers = [(name, layer) for name, layer in abc_layers(model) if layer.N > 0]
        errors = {}
        if layers:
            generator = torch.Generator().manual_seed(seed)
            per_batch = max(1, max_samples // len(inputs))
            for name, layer in _forward_order(model, layers, inputs[0]):
                samples = _collect_inputs(model, layer, inputs, per_batch, generator)
                layer.absorb_input_offset(layer.activation_binarizer.calibrate(samples, iterations))
                errors[name] = layer.activation_error()
                if progress is not None:
                    progress(name)
        if batchnorm:
            recalibrate_batchnorm(model, inputs)
    finally:
        model.train(was_training)
    return errors
