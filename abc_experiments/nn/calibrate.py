"""Fit the activation bases of a converted model to real data, before any fine-tuning."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

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
    norms = batchnorms(model)
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


def running_stats(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Each BatchNorm's running mean and variance (copies), by module name."""
    return {name: (module.running_mean.detach().clone(), module.running_var.detach().clone())
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None}


@torch.no_grad()
def reference_statistics(reference: nn.Module, inputs: list[Tensor],
                         one_batch: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """The BatchNorm statistics the FP ``reference`` re-estimates on ``inputs`` (on an untouched
    copy of it), as one batch (the one-pass calibration) or batch by batch; by module name."""
    twin = copy.deepcopy(reference).eval()
    if one_batch and len(inputs) > 1:
        inputs = [torch.cat(inputs)]
    recalibrate_batchnorm(twin, inputs)
    return running_stats(twin)


@torch.no_grad()
def correct_batchnorm_to_reference(model: nn.Module, original: Mapping[str, tuple[Tensor, Tensor]],
                                   reference: Mapping[str, tuple[Tensor, Tensor]]) -> int:
    """Replace ``model``'s re-estimated BatchNorm statistics by a correction of its ``original``
    (training-time) ones: mean = original + (μ − μ_ref), var = original_var · σ² / σ²_ref, where
    (μ, σ²) are what ``model`` re-estimated on the calibration inputs and (μ_ref, σ²_ref) what the
    FP model re-estimates on the same inputs, the same way (:func:`reference_statistics`).

    Re-estimating the statistics from scratch on a few calibration batches replaces the running
    statistics the weights were trained with by those of a small, differently distributed sample
    (training images without augmentation): on ResNet-20 / CIFAR-10 that alone costs the FP model
    3 points. The correction keeps the training-time statistics and moves them only by the shift
    that conversion causes, measured on identical images (the idea of post-training quantization's
    bias correction, Nagel et al. 2019, applied to BatchNorm statistics).

    Args:
        model: the converted, calibrated model (its BatchNorms hold the re-estimated statistics).
        original: :func:`running_stats` of ``model`` before calibration (the FP model's).
        reference: :func:`reference_statistics` of the FP model it was converted from.

    Returns:
        The number of BatchNorms corrected.

    Raises:
        ValueError: the three do not name the same BatchNorms (a reference of another model).
    """
    current = running_stats(model)
    if not current.keys() == original.keys() == reference.keys():
        differ = sorted(set(current) ^ set(reference) | set(current) ^ set(original))
        raise ValueError(f"correct_batchnorm_to_reference: the reference model's BatchNorms are not the converted "
                         f"model's (differing: {', '.join(differ[:5])}): pass the FP model it was converted from")
    for name, module in model.named_modules():
        if name in current:
            (mean0, var0), (mean_ref, var_ref) = original[name], reference[name]
            module.running_mean.copy_(mean0 + (module.running_mean - mean_ref))
            module.running_var.copy_(var0 * module.running_var / var_ref.clamp_min(torch.finfo(var_ref.dtype).tiny))
    return len(current)


ONE_PASS_INPUT_BYTES = 256 << 20
"""The largest calibration input (all batches together, in bytes) that ``method="auto"`` runs as
one pass; larger inputs run layer by layer, one batch at a time."""

METHODS = ("auto", "one_pass", "layerwise")


def _calibrate_layer(layer: ABCLayer, values: Tensor, max_samples: int, iterations: int,
                     generator: torch.Generator) -> float | None:
    """Fit ``layer``'s shifts and betas to a random sample of ``values`` (its inputs) and set the
    fitted input offset; returns its relative activation error."""
    values = values.detach().flatten()
    if values.numel() > max_samples:
        values = values[torch.randint(values.numel(), (max_samples,), generator=generator).to(values.device)]
    layer.set_input_offset(layer.activation_binarizer.calibrate(values.float().cpu(), iterations))
    return layer.activation_error()


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model``, in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _one_pass(model: nn.Module, layers: list[tuple[str, ABCLayer]], inputs: list[Tensor], *, max_samples: int,
              iterations: int, batchnorm: bool, batchnorm_in_pass: bool, generator: torch.Generator,
              progress: Callable[[str], None] | None) -> dict[str, float]:
    """Calibrate every layer in ONE forward pass over all calibration inputs at once: a pre-hook fits
    each ABC layer when its input arrives, so it is fitted on what the already calibrated layers
    before it produce. With ``batchnorm`` and ``batchnorm_in_pass`` every BatchNorm runs in training
    mode with a cumulative average (momentum None) after a reset, so it normalises with, and keeps as
    running statistics, the statistics of its input in the converted network, and each layer after
    it is fitted on them; with ``batchnorm`` alone they are re-estimated after the pass."""
    names = {id(layer): name for name, layer in layers}
    errors: dict[str, float] = {}

    def fit_on_arrival(module: nn.Module, args: tuple) -> None:
        name = names[id(module)]
        if name not in errors:  # a module called twice is fitted on its first input
            errors[name] = _calibrate_layer(module, args[0], max_samples, iterations, generator)
            if progress is not None:
                progress(name)

    norms = batchnorms(model) if batchnorm and batchnorm_in_pass else []
    momenta = [norm.momentum for norm in norms]
    hooks = [layer.register_forward_pre_hook(fit_on_arrival) for _, layer in layers]
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        model(torch.cat(inputs) if len(inputs) > 1 else inputs[0])
    finally:
        for hook in hooks:
            hook.remove()
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            norm.eval()
    if batchnorm and not batchnorm_in_pass:
        recalibrate_batchnorm(model, inputs)
    return errors


def _layerwise(model: nn.Module, layers: list[tuple[str, ABCLayer]], inputs: list[Tensor], *, max_samples: int,
               iterations: int, batchnorm: bool, batchnorm_in_pass: bool, generator: torch.Generator,
               progress: Callable[[str], None] | None) -> dict[str, float]:
    """Calibrate the layers one at a time in forward order, each on a sample of its inputs collected
    batch by batch through the network up to it (memory of one batch; time grows with the square of
    the depth); BatchNorm statistics are re-estimated once at the end (``batchnorm_in_pass`` does not
    apply)."""
    errors = {}
    per_batch = max(1, max_samples // len(inputs))
    for name, layer in _forward_order(model, layers, inputs[0]):
        samples = _collect_inputs(model, layer, inputs, per_batch, generator)
        errors[name] = _calibrate_layer(layer, samples, max_samples, iterations, generator)
        if progress is not None:
            progress(name)
    if batchnorm:
        recalibrate_batchnorm(model, inputs)
    return errors


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
    method: str = "auto",
    batchnorm_in_pass: bool = True,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    """Initialise each ABC layer's shifts vₙ and betas βₙ from the distribution of its real inputs.

    Layers are calibrated in forward order, each on inputs that flow through the already calibrated
    layers before it (so later layers see the quantized network they will run in). Each layer fits a
    sample of at most ``max_samples`` input values with
    :func:`~abc_experiments.nn.activations.fit_activation_bases` (Lloyd–Max thresholds, betas and an
    input offset by least squares) and takes the offset (:meth:`.ABCLayer.set_input_offset`). With
    ``batchnorm``, BatchNorm
    running statistics are re-estimated on the same inputs.

    Args:
        model: a converted model (its ABC layers are changed in place).
        batches: input tensors or (input, target) pairs, e.g. a few batches of a training DataLoader.
        max_samples: input values sampled per layer for the fit.
        iterations: Lloyd–Max iterations per layer.
        batchnorm: re-estimate BatchNorm statistics.
        seed: seed of the sampling.
        progress: called with a layer's name after it is calibrated.
        method: ``"one_pass"``: one forward pass over all batches at once, each layer fitted as its
            input arrives (time of one forward pass; memory of all batches at once);
            ``"layerwise"``: batch by batch, re-running the network up to each layer (memory of one
            batch; time grows with depth squared); ``"auto"``: one pass when all inputs together
            take at most :data:`ONE_PASS_INPUT_BYTES`. Both fit the same bases.
        batchnorm_in_pass: with ``"one_pass"``, re-estimate each BatchNorm during the pass, so the
            layers after it are fitted on the statistics the calibrated model will use (the
            default: on ResNet-20 / CIFAR-10 it kept 1-3 points more than fitting every layer behind
            the FP statistics); False, and always with ``"layerwise"``: the BatchNorms are
            re-estimated after every layer is fitted.
        reference: the FP model ``model`` was converted from. With ``batchnorm``, the statistics
            then end as the training-time ones corrected by the shift conversion causes (see
            :func:`correct_batchnorm_to_reference`) instead of being replaced by the calibration
            sample's; without it they are replaced.

    Returns:
        The relative activation error ‖R − c − ΣβA‖/‖R‖ per calibrated layer, in forward order.
    """
    if method not in METHODS:
        raise ValueError(f"calibrate: method must be one of {', '.join(METHODS)} (got {method!r})")
    device = next(model.parameters()).device
    inputs = _inputs(batches, device)
    if method == "auto":
        size = sum(x.numel() * x.element_size() for x in inputs)
        method = "one_pass" if size <= ONE_PASS_INPUT_BYTES else "layerwise"
    was_training = model.training
    original = running_stats(model) if batchnorm and reference is not None else None
    model.eval()
    try:
        layers = [(name, layer) for name, layer in abc_layers(model) if layer.N > 0]
        options = dict(max_samples=max_samples, iterations=iterations, batchnorm=batchnorm,
                       batchnorm_in_pass=batchnorm_in_pass, generator=torch.Generator().manual_seed(seed),
                       progress=progress)
        if method == "one_pass":
            errors = _one_pass(model, layers, inputs, **options)
        elif not layers:
            errors = {}
            if batchnorm:
                recalibrate_batchnorm(model, inputs)
        else:
            errors = _layerwise(model, layers, inputs, **options)
        if original is not None:
            one_batch = method == "one_pass" and batchnorm_in_pass
            correct_batchnorm_to_reference(model, original, reference_statistics(reference, inputs, one_batch))
        return errors
    finally:
        model.train(was_training)
