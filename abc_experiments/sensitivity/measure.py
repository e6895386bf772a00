"""Where a finished run loses its accuracy, layer by layer: :func:`layer_sensitivity`.

For every layer the run converted, on the run's validation split:

* ``only_acc``: the accuracy with only that layer converted (and calibrated as the run calibrates);
* ``all_but_acc``: the accuracy with every other layer converted and that one kept full precision;
* ``only_loss`` / ``all_but_loss``: the same two models' mean validation cross-entropy (a paired,
  continuous measure: far less noisy than an accuracy on a few hundred images, which is why
  ``--budget`` ranks the layers by it);
* ``weight_error`` / ``activation_error``: its reconstruction errors ‖W − ΣαB‖/‖W‖ and
  ‖R − c − ΣβA‖/‖R‖ in the all-converted model (the run's calibration);
* ``output_error``: ‖y − y_FP‖/‖y_FP‖ of its output in the all-converted model (everything before
  it and itself converted) against the FP model's, the error's growth through depth;
  ``inherited_error`` is the same for the FP layer fed the converted model's input, i.e. the part
  the layers before it pass on.

Calibration reuse (what is fitted where):

* the all-converted model is converted and calibrated exactly as the run did (the same calibration
  batches, seed and settings), so its accuracy is the run's ``converted`` validation accuracy;
* each "only this layer" model is calibrated afresh, exactly as the run would calibrate that model
  (one layer fit on full-precision inputs, then the BatchNorm statistics): it is cheap;
* each "all but this layer" model reuses the fits of the all-converted model (``exact=False``, the
  default). The layers before the kept one get exactly the fits a fresh calibration would give
  (their inputs do not depend on it); the layers after it keep fits made with it converted. The
  BatchNorm statistics are re-estimated for every variant. ``exact=True`` recalibrates every
  variant from scratch instead (L − 1 layer fits per variant, so about L/2 times the run's
  calibration in all).

A model with nothing converted is the FP model itself (no calibration, no BatchNorm re-estimate),
so "all but" of a run with one converted layer is exactly the FP accuracy.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..checkpoints import CheckpointError, load_checkpoint, load_model_state
from ..data import build_datasets, build_loaders
from ..devices import resolve_device
from ..models import build_model
from ..nn import (
    abc_layers,
    calibrate,
    correct_batchnorm_to_reference,
    recalibrate_batchnorm,
    reference_statistics,
    running_stats,
)
from ..progress import Progress
from ..results import RunSummary
from ..runs import RunError, read_run
from ..training import evaluate, seed_stage

log = logging.getLogger(__name__)


@dataclass
class LayerSensitivity:
    """One converted layer's measurements (accuracies in %, on the validation images used)."""

    name: str
    kind: str  # ABCConv2d or ABCLinear
    M: int
    N: int
    macs: int  # multiply-accumulates of the layer per image
    weight_error: float
    activation_error: float | None  # None with N = 0 or without calibration
    output_error: float  # of the layer's output in the all-converted model vs the FP model
    inherited_error: float  # of the FP layer's output on the all-converted model's input
    only_acc: float  # only this layer converted
    all_but_acc: float  # every layer converted except this one
    # the same two models' mean validation cross-entropy (None in measurements from before it was kept)
    only_loss: float | None = None
    all_but_loss: float | None = None

    def only_drop(self, fp_acc: float) -> float:
        """Accuracy points lost by converting this layer alone."""
        return fp_acc - self.only_acc

    def all_but_gain(self, all_acc: float) -> float:
        """Accuracy points won back by keeping this layer full precision."""
        return self.all_but_acc - all_acc


@dataclass
class Sensitivity:
    """The result of :func:`layer_sensitivity` (``to_dict()`` is ``sensitivity.json``)."""

    run_dir: str
    model: str
    dataset: str
    M: int
    N: int
    fp_acc: float  # validation accuracy of the FP model
    all_acc: float  # validation accuracy of the all-converted, calibrated model
    val_images: int
    calibration_batches: int
    calibration: str  # "reuse" or "exact" (see the module docstring)
    fp_source: str
    fp_loss: float | None = None  # mean validation cross-entropy of the FP and the all-converted model
    all_loss: float | None = None
    run_fp_val_acc: float | None = None  # what the run itself measured, for comparison
    run_converted_val_acc: float | None = None
    layers: list[LayerSensitivity] = field(default_factory=list)  # in forward order
    kept: dict[str, str] = field(default_factory=dict)  # layers the run kept full precision, and why
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        for row, layer in zip(data["layers"], self.layers):
            row["only_drop"] = layer.only_drop(self.fp_acc)
            row["all_but_gain"] = layer.all_but_gain(self.all_acc)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Sensitivity:
        values = dict(data)
        names = {f for f in LayerSensitivity.__dataclass_fields__}
        values["layers"] = [LayerSensitivity(**{k: v for k, v in row.items() if k in names})
                            for row in data.get("layers", [])]
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


# ---- reopening the run's pieces ------------------------------------------------------------------
def run_config(summary: RunSummary, overrides: Sequence[str] = ()):
    """The run's config with ``overrides`` (``data.root=...``) merged in; :class:`RunError` for a bad one."""
    config = OmegaConf.create(summary.config)
    try:
        config.merge_with_dotlist(list(overrides))
    except Exception as error:  # omegaconf's errors for a malformed or unknown key
        raise RunError(f"bad override ({error})") from None
    return config


def load_fp_model(run_dir: str | Path, summary: RunSummary) -> tuple[nn.Module, str]:
    """The FP model the run converted (train mode, as the pipeline holds it) and the file it came from.

    Args:
        run_dir: the finished run's directory.
        summary: its summary (:func:`abc_experiments.runs.read_run`).

    Returns:
        (model on the CPU, where its weights came from).

    Raises:
        RunError: none of the places the run's FP weights live still holds them.
    """
    run_dir = Path(run_dir)
    config = summary.config
    channels, size, _ = summary.input_shape
    seed_stage(summary.seed, "init")  # a model with pretrain.epochs=0 starts from this initialisation
    model = build_model(summary.model, channels, size, summary.num_classes, **config["model"].get("options", {}))
    source = summary.fp_source or ""
    candidates = []
    if source == "trained":
        candidates.append(run_dir / "checkpoints" / "pretrain_best.pt")
    if summary.pretrain_cache:
        candidates.append(Path(summary.pretrain_cache))
    if source.startswith("checkpoint "):
        candidates.append(Path(source.removeprefix("checkpoint ")))
    for path in candidates:
        if path.is_file():
            try:
                load_model_state(model, load_checkpoint(path, "FP model"), path, "FP model")
            except CheckpointError as error:
                raise RunError(str(error)) from None
            return model, str(path)
    if source.startswith("pretrained weights"):
        return model, source
    looked = ", ".join(map(str, candidates)) or "nowhere (the summary names no FP source)"
    raise RunError(f"the FP model of the run in {run_dir} is gone (looked in {looked}): the sensitivity "
                   "needs the FP weights the run converted; rerun the experiment to get them back")


def _loaders(config, device: str, max_val_images: int | None):
    splits = build_datasets(str(config.dataset.name), root=str(Path(config.data.root).expanduser()),
                            download=config.data.download, val_fraction=config.data.val_fraction, seed=config.seed,
                            verify=bool(config.data.get("verify", True)))  # runs from before data.verify: true
    loaders = build_loaders(splits, batch_size=config.finetune.batch_size,
                            eval_batch_size=config.finetune.eval_batch_size, num_workers=config.data.num_workers,
                            device=device, seed=config.seed)
    val = loaders["val"]
    if max_val_images is not None and max_val_images < len(splits.val):
        val = DataLoader(Subset(splits.val, range(max_val_images)), batch_size=config.finetune.eval_batch_size,
                         shuffle=False, num_workers=val.num_workers)
    return splits, val, loaders["calib"]


def _forward_order(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> list[str]:
    """``names`` sorted by the order in which a forward pass reaches those modules (unreached last)."""
    seen: list[str] = []
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: seen.append(name))
             for name in names]
    try:
        with _eval(model), torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    order = list(dict.fromkeys(seen))
    return order + [name for name in names if name not in order]


def _percent(result) -> str:
    return "-" if result is None else f"{result.val_acc:.2f}%"


@contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _count_macs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, int]:
    macs: dict[str, int] = {}

    def hook(name):
        def record(module, _inputs, output):
            macs[name] = output[0].numel() * module.weight[0].numel()
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with _eval(model), torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return macs


@torch.no_grad()
def output_errors(fp_model: nn.Module, abc_model: nn.Module, names: Sequence[str], loader,
                  device: torch.device, channels_last: bool = False) -> dict[str, tuple[float, float]]:
    """Per layer name: (output error, inherited error) of ``abc_model`` against ``fp_model`` over ``loader``.

    Args:
        fp_model: the FP model.
        abc_model: the converted model (same module names).
        names: the converted layers.
        loader: batches of (images, labels).
        device: where both models live.
        channels_last: NHWC images.

    Returns:
        ``{name: (‖y − y_FP‖/‖y_FP‖, ‖FP layer(x) − y_FP‖/‖y_FP‖)}``, where y is the layer's output
        in ``abc_model``, x its input there and y_FP the FP model's output of that layer, summed
        over every image.
    """
    sums = {name: torch.zeros(3, dtype=torch.float64) for name in names}  # ‖y−y_FP‖², ‖inherited−y_FP‖², ‖y_FP‖²
    fp_outputs: dict[str, torch.Tensor] = {}
    fp_layers = {name: fp_model.get_submodule(name) for name in names}

    def keep(name):
        def hook(_module, _inputs, output):
            fp_outputs[name] = output.detach().float()
        return hook

    def compare(name):
        def hook(_module, inputs, output):
            reference = fp_outputs[name]
            inherited = fp_layers[name](inputs[0]).float()
            sums[name] += torch.stack([(output.float() - reference).square().sum(),
                                       (inherited - reference).square().sum(),
                                       reference.square().sum()]).double().cpu()
        return hook

    handles = [fp_layers[name].register_forward_hook(keep(name)) for name in names]
    handles += [abc_model.get_submodule(name).register_forward_hook(compare(name)) for name in names]
    try:
        with _eval(fp_model), _eval(abc_model):
            for images, _labels in loader:
                images = images.to(device)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                fp_outputs.clear()
                fp_model(images)
                abc_model(images)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, (error, inherited, norm) in ((name, s.tolist()) for name, s in sums.items()):
        scale = math.sqrt(norm) if norm > 0 else float("nan")
        result[name] = (math.sqrt(error) / scale, math.sqrt(inherited) / scale)
    return result


# ---- the measurement -----------------------------------------------------------------------------
def layer_sensitivity(run_dir: str | Path, *, batches: int | None = None, device: str = "cpu",
                      max_val_images: int | None = None, overrides: Sequence[str] = (), exact: bool = False,
                      progress: bool = True, on_layer: Callable[[LayerSensitivity, int, int], None] | None = None,
                      ) -> Sensitivity:
    """Measure, for every layer a finished run converted, what converting it costs (see the module docstring).

    Args:
        run_dir: a finished ``abc-run`` run dir (its ``summary.json``, and the FP model in its
            ``checkpoints/pretrain_best.pt`` or the pretrain cache it names).
        batches: calibration batches (default: the run's ``abc.calibration.batches``; the same
            batches as the run's, so the all-converted model is the run's converted model).
        device: ``cpu``, ``cuda``, ``auto``...
        max_val_images: evaluate on the first this many validation images only (faster, noisier).
        overrides: config overrides for the data, e.g. ``["data.root=../shared/datasets"]``.
        exact: recalibrate every "all but this layer" model from scratch instead of reusing the
            all-converted model's fits.
        progress: a tqdm bar on a terminal (log lines every 30 s otherwise, and one per layer).
        on_layer: called with each layer's result, its index and the layer count as it is done.

    Returns:
        :class:`Sensitivity`, one :class:`LayerSensitivity` per converted layer in forward order.

    Raises:
        RunError: the run dir is not a finished run, its FP model is gone, or an override is bad.
        DatasetUnavailableError: the run's dataset cannot be read here (give ``data.root=...``).
        DeviceUnavailableError: ``device`` does not exist here.
    """
    from ..pipeline import convert_from_config  # the run's own conversion

    started = time.perf_counter()
    run_dir = Path(run_dir)
    summary = read_run(run_dir)
    config = run_config(summary, overrides)
    abc = config.abc
    batches = int(abc.calibration.batches) if batches is None else batches
    if batches < 0:
        raise ValueError(f"batches={batches}: give 0 (no calibration) or more calibration batches")
    if max_val_images is not None and max_val_images < 1:
        raise ValueError(f"max_val_images={max_val_images}: give a positive number of images")
    torch_device = resolve_device(device)
    precision, channels_last = str(config.get("precision", "32")), bool(config.get("channels_last", False))
    splits, val_loader, calib_loader = _loaders(config, torch_device.type, max_val_images)
    if [splits.in_channels, splits.image_size, splits.image_size] != summary.input_shape:
        raise RunError(f"dataset {config.dataset.name} has {splits.in_channels}x{splits.image_size}x"
                       f"{splits.image_size} images; the model takes {'x'.join(map(str, summary.input_shape))}")

    fp_model, fp_source = load_fp_model(run_dir, summary)
    fp_model = fp_model.to(torch_device)
    if channels_last:
        fp_model = fp_model.to(memory_format=torch.channels_last)
    inputs = [images.to(torch_device) for _, (images, _labels) in zip(range(batches), calib_loader)]
    # runs from before batchnorm_relative re-estimated the statistics from scratch
    relative = bool(abc.calibration.get("batchnorm_relative", False))
    calibration = dict(max_samples=int(abc.calibration.max_samples), batchnorm=bool(abc.calibration.batchnorm),
                       seed=int(config.seed), reference=fp_model if relative else None)

    # the FP model's own statistics and those it re-estimates batch by batch: the same for every
    # "all but this layer" model, so measured once
    fp_statistics = (running_stats(fp_model), reference_statistics(fp_model, inputs, one_batch=False)) \
        if relative and inputs and calibration["batchnorm"] else None

    def calibrated(model: nn.Module) -> tuple[nn.Module, dict]:
        """``model`` calibrated as the run calibrates (nothing when no layer is converted)."""
        if not inputs or not abc_layers(model):
            return model, {}
        seed_stage(int(config.seed), "convert")
        return model, calibrate(model, inputs, **calibration)

    def metrics(model: nn.Module, what: str):
        """Validation loss and accuracy."""
        return evaluate(model, val_loader, torch_device, precision, channels_last, description=what)

    # The conversion as the run did it, before calibration: the template every variant takes its layers from.
    template = copy.deepcopy(fp_model)
    seed_stage(int(config.seed), "convert")
    report = convert_from_config(template, abc)
    example = next(iter(val_loader))[0].to(torch_device)
    names = _forward_order(fp_model, report.converted, example[:1])
    macs = _count_macs(fp_model, names, example)

    count = len(names)
    bar = Progress(2 * count + 2, "sensitivity", bar=progress, unit="models")
    log.info("sensitivity of %d converted layer(s) of %s: %d calibration batches, %d validation images, "
             "'all but' calibration %s", count, run_dir, len(inputs), len(val_loader.dataset),
             "exact" if exact else "reused from the all-converted model")
    fp = metrics(fp_model, "sensitivity: FP model")
    fp_acc = fp.acc
    bar.update(1, model="FP")
    full, _ = calibrated(copy.deepcopy(template))
    every = metrics(full, "sensitivity: all converted")
    all_acc = every.acc
    bar.update(1, model="all converted")
    log.info("FP model: %.2f%%, all %d converted: %.2f%% (the run measured %s and %s)", fp_acc, count, all_acc,
             _percent(summary.fp), _percent(summary.converted))
    errors = output_errors(fp_model, full, names, val_loader, torch_device, channels_last)

    layers = []
    for index, name in enumerate(names):
        abc_layer = full.get_submodule(name)
        only = copy.deepcopy(fp_model)
        _swap(only, name, copy.deepcopy(template.get_submodule(name)))
        only_result = metrics(calibrated(only)[0], f"sensitivity: only {name}")
        bar.update(1, model=f"only {name}")
        if count == 1:
            all_but_result = fp  # nothing converted: the FP model itself
        else:
            all_but = copy.deepcopy(template if exact else full)
            _swap(all_but, name, copy.deepcopy(fp_model.get_submodule(name)))
            if exact:
                calibrated(all_but)
            elif inputs and calibration["batchnorm"]:
                with _eval(all_but), torch.no_grad():
                    recalibrate_batchnorm(all_but, inputs)
                    if fp_statistics is not None:  # as the run: relative to the FP statistics
                        correct_batchnorm_to_reference(all_but, *fp_statistics)
            all_but_result = metrics(all_but, f"sensitivity: all but {name}")
        bar.update(1, model=f"all but {name}")
        layer = LayerSensitivity(
            name=name, kind=type(abc_layer).__name__, M=abc_layer.M, N=abc_layer.N, macs=macs.get(name, 0),
            weight_error=abc_layer.weight_error(), activation_error=abc_layer.activation_error(),
            output_error=errors[name][0], inherited_error=errors[name][1], only_acc=only_result.acc,
            all_but_acc=all_but_result.acc, only_loss=only_result.loss, all_but_loss=all_but_result.loss)
        layers.append(layer)
        log.info("%s (%d/%d): only this layer %.2f%% (%+.2f), all but this layer %.2f%% (%+.2f), "
                 "output error %.3f (inherited %.3f)", name, index + 1, count, layer.only_acc,
                 -layer.only_drop(fp_acc), layer.all_but_acc, layer.all_but_gain(all_acc), layer.output_error,
                 layer.inherited_error)
        if on_layer is not None:
            on_layer(layer, index, count)
    bar.close()
    return Sensitivity(
        run_dir=str(run_dir), model=summary.model, dataset=summary.dataset, M=int(abc.M), N=int(abc.N or 0),
        fp_acc=fp_acc, all_acc=all_acc, fp_loss=fp.loss, all_loss=every.loss, val_images=len(val_loader.dataset),
        calibration_batches=len(inputs),
        calibration="exact" if exact else "reuse", fp_source=fp_source,
        run_fp_val_acc=summary.fp.val_acc if summary.fp else None,
        run_converted_val_acc=summary.converted.val_acc if summary.converted else None,
        layers=layers, kept=dict(report.kept), seconds=round(time.perf_counter() - started, 3))
