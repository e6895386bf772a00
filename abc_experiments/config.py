"""The typed configuration schema of ``abc-run``, registered in Hydra's ConfigStore.

One mechanism checks choices: every field with a fixed set of values is an Enum built from the
tuple its constructor reads (``SCOPES``, ``KERNELS``, the model and dataset registries...), so
OmegaConf rejects ``abc.scope=typo`` while composing, naming the key and the valid values.
:func:`validate` checks the ranges the types cannot express (``abc.M=0``), before anything trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .data import DATASETS
from .models import MODELS
from .nn.activations import KERNELS
from .nn.layers import IMPLS
from .nn.weights import ALPHA_FITS, BASES, MAX_ALTERNATING_M, SCOPES
from .rundirs import register_resolvers
from .settings import unknown_key_message
from .training import OPTIMIZERS, PRECISIONS, SCHEDULES

DEVICES = ("auto", "cpu", "cuda", "mps")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


class Choice(str, Enum):
    """A config choice: compares, formats and serialises as its plain string value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _choice(name: str, values) -> type[Choice]:
    return Choice(name, [(value, value) for value in values])


DatasetName = _choice("DatasetName", DATASETS)
ModelName = _choice("ModelName", MODELS)
Device = _choice("Device", DEVICES)
Scope = _choice("Scope", SCOPES)
Impl = _choice("Impl", IMPLS)
Bases = _choice("Bases", BASES)
AlphaFit = _choice("AlphaFit", ALPHA_FITS)
Kernel = _choice("Kernel", KERNELS)
Optimizer = _choice("Optimizer", OPTIMIZERS)
Schedule = _choice("Schedule", SCHEDULES)
Precision = _choice("Precision", PRECISIONS)


@dataclass
class DatasetConfig:
    name: DatasetName = DatasetName.digits


@dataclass
class DataConfig:
    root: str = "data"
    download: bool = True
    # Accept only the official files (MD5). false: read any files in the official format (a subset,
    # a relabelled copy) as they are; their format is still checked, and nothing is downloaded.
    verify: bool = True
    val_fraction: float = 0.1
    num_workers: Optional[int] = None  # None: a default that suits the dataset and the machine


@dataclass
class ModelConfig:
    name: ModelName = ModelName.seed_cnn
    # Model-specific options (conf/model/<name>.yaml), checked by the model's own builder.
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CalibrationConfig:
    batches: int = 8  # training batches used to fit shifts and betas (0 disables calibration)
    batchnorm: bool = True  # re-estimate BatchNorm statistics after conversion
    # ... as a correction of the FP model's training-time statistics by the shift conversion causes
    # on the calibration batches (False: replace them by the calibration batches' statistics)
    batchnorm_relative: bool = True
    max_samples: int = 262144  # input values sampled per layer


@dataclass
class LayerPrecision:
    """One ``abc.layers`` entry: the M and N of the layers its pattern matches (None: the global
    ``abc.M`` / ``abc.N``; N = 0 is full-precision activations)."""

    M: Optional[int] = None
    N: Optional[int] = None


@dataclass
class ABCConfig:
    M: int = 3
    N: Optional[int] = 3  # 0 or null: full-precision activations (weight-only ABC)
    scope: Scope = Scope.per_layer
    keep_first: bool = True  # first conv stays full precision
    keep_last: bool = True  # final classifier stays full precision
    linear: bool = False  # also convert hidden fully connected layers
    exclude: List[str] = field(default_factory=list)  # fnmatch patterns of module names to keep
    # Per-layer precision: fnmatch globs on module names ('layer1.*', 'layer3.2.conv2'; '*' matches
    # dots too) -> {M, N} overriding abc.M / abc.N; the first matching pattern wins; a pattern that
    # sets no converted layer is refused before training (abc_experiments.nn.convert).
    layers: Dict[str, LayerPrecision] = field(default_factory=dict)
    impl: Impl = Impl.fused
    bases: Bases = Bases.shifted
    learn_u: bool = False
    alpha_fit: AlphaFit = AlphaFit.lstsq
    kernel: Kernel = Kernel.auto
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class StageConfig:
    """Training settings for one stage (pretraining the FP model, fine-tuning the ABC model)."""

    epochs: int = 1
    steps_per_epoch: Optional[int] = None  # cap on optimizer steps per epoch (the notebook: 200)
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: Optimizer = Optimizer.adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Schedule = Schedule.cosine
    step_size: int = 30  # epochs between lr drops, schedule=step
    gamma: float = 0.1  # lr factor at each drop, schedule=step
    # Stop as diverged when a training loss exceeds this multiple of ln(classes), the loss of a
    # uniform guess (NaN and inf always stop); 0 checks only for NaN/inf.
    divergence_factor: float = 100.0


@dataclass
class DistillConfig:
    """Distillation from the FP model while fine-tuning (abc_experiments.distillation)."""

    weight: float = 0.0  # w in CE + w·T²·KL(teacher_T || student_T); 0 turns it off
    temperature: float = 4.0  # T, the softmax temperature of both models' outputs


@dataclass
class FinetuneConfig(StageConfig):
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Before each validation, re-estimate every BatchNorm's statistics on this many training batches
    # (the epoch's first, as trained: same images and augmentation) with the weights as they are
    # (0: off, the running averages of training). Binarized weights move the layer outputs faster
    # than the running averages follow: a fine-tuned ResNet-20 ABC(3,3) trained 9 more Adam steps
    # validated at 64.4 % on its running statistics and 67.3 % re-estimated (39.8 % vs 64.2 % at lr
    # 1e-3). The final test accuracy moved within noise on the CIFAR subset (README).
    precise_bn: int = 0


@dataclass
class PretrainConfig(StageConfig):
    checkpoint: Optional[str] = None  # load FP weights from this file instead of training
    reuse: bool = True  # reuse a cached pretrained model with the same settings


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    abc: ABCConfig = field(default_factory=ABCConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    device: Device = Device.auto
    precision: Precision = Precision("32")  # 32 | bf16-mixed | 16-mixed (torch.autocast)
    channels_last: bool = False  # NHWC memory format for images and conv weights
    resume: bool = False
    progress: bool = True  # progress bars (only shown on a terminal)
    run_dir: str = "${hydra:runtime.output_dir}"
    cache_dir: str = "outputs/cache"
    experiment: Optional[str] = None  # name of the preset, set by conf/experiment/*.yaml


# Free dicts in the closed schema: any key below them is checked by their owner (the model's builder; for
# abc.layers, validate() and nn.convert.check_layer_precision).
OPEN_KEYS = ("model.options", "abc.layers")
# Config groups (folders of conf/): ``dataset=mnist`` picks a file, Hydra checks the choice.
CONFIG_GROUPS = ("abc", "dataset", "experiment", "finetune", "hparams_search", "hydra", "model", "pretrain")


def schema_keys(node: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (``abc.M``, ``abc.calibration.batches``...), in order.

    Args:
        node: the dataclass to walk (the whole :class:`Config` by default).
        prefix: prepended to each key (``"abc."`` for the ABC node's keys).

    Returns:
        The keys; an :data:`OPEN_KEYS` dict counts as one leaf.
    """
    keys = []
    for item in fields(node):
        name = f"{prefix}{item.name}"
        default = item.default_factory() if callable(item.default_factory) else item.default
        if is_dataclass(default) and name not in OPEN_KEYS:
            keys += schema_keys(type(default), name + ".")
        else:
            keys.append(name)
    return keys


def is_config_key(key: str) -> bool:
    """Whether ``key`` names a leaf or a node of the schema, or a key below an open dict."""
    keys = schema_keys()
    return (key in keys or any(k.startswith(key + ".") for k in keys)
            or any(key.startswith(open_key + ".") for open_key in OPEN_KEYS))


def unknown_keys(cfg: DictConfig) -> list[str]:
    """The dotted keys of a composed config that the schema lacks (added with ``+key=value`` or by a
    preset), in order."""
    valid = set(schema_keys())
    found: list[str] = []

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in OPEN_KEYS:
                continue
            if isinstance(value, dict):
                walk(value, name + ".")
            elif name not in valid:
                found.append(name)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def unknown_key_error(key: str) -> str:
    """One line for a key the schema lacks: ``abc.m is not a config key of abc-run (did you mean abc.M?)...``"""
    return (unknown_key_message(key, schema_keys(), "a config key of abc-run")
            + "; the config is closed (a leading + adds no key): abc-run --cfg job lists every key")


def register_configs() -> None:
    schema = OmegaConf.structured(Config)
    # Hydra puts the whole config in struct mode (no new keys); abc.layers's keys are the user's
    # patterns, so it accepts new ones (each still typed as LayerPrecision: M, N only).
    OmegaConf.set_struct(schema.abc.layers, False)
    ConfigStore.instance().store(name="base_config", node=schema)


def _check_min(key: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key}={value} is out of range: it must be ≥ {minimum}")


def _check_positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{key}={value} is out of range: it must be > 0")


def validate(cfg: DictConfig) -> None:
    """Range checks that the types cannot express, and settings that contradict each other; run
    before anything trains. Raises :class:`ConfigError` naming the key and the fix."""
    from .models import check_model_options

    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(unknown_key_error(unknown[0]))
    try:
        check_model_options(str(cfg.model.name), dict(cfg.model.options))
    except ValueError as error:
        raise ConfigError(f"model.options: {error}") from None
    _check_min("abc.M", cfg.abc.M, 1)
    _check_min("abc.N", cfg.abc.N, 0)
    alternating = cfg.abc.bases == "alternating"
    if alternating and cfg.abc.M > MAX_ALTERNATING_M:
        raise ConfigError(f"abc.M={cfg.abc.M} with abc.bases=alternating: the alternating bases enumerate the 2^M "
                          f"codes, so M must be <= {MAX_ALTERNATING_M}; use abc.bases=residual for more bases")
    for pattern, precision in (cfg.abc.get("layers") or {}).items():
        if not str(pattern).strip():
            raise ConfigError("abc.layers: an empty pattern; give module-name globs such as layer1.* or layer3.2.conv2")
        _check_min(f"abc.layers.{pattern}.M", precision.M, 1)
        _check_min(f"abc.layers.{pattern}.N", precision.N, 0)
        if alternating and precision.M > MAX_ALTERNATING_M:
            raise ConfigError(f"abc.layers.{pattern}.M={precision.M} with abc.bases=alternating: M must be <= "
                              f"{MAX_ALTERNATING_M} (2^M codes); use abc.bases=residual for more bases")
    if cfg.abc.learn_u and cfg.abc.bases != "shifted":
        raise ConfigError(f"abc.learn_u=true needs abc.bases=shifted ({cfg.abc.bases} bases have no shifts to learn)")
    _check_min("abc.calibration.batches", cfg.abc.calibration.batches, 0)
    _check_min("abc.calibration.max_samples", cfg.abc.calibration.max_samples, 1)
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} is out of range: it must be in (0, 1)")
    _check_min("data.num_workers", cfg.data.num_workers, 0)
    if cfg.pretrain.epochs == 0 and not (cfg.model.options.get("pretrained") or cfg.pretrain.checkpoint):
        raise ConfigError("pretrain.epochs=0 skips FP training, so the weights must come from somewhere: "
                          "set pretrain.checkpoint=PATH (or model.options.pretrained=true for resnet18), "
                          "or pretrain.epochs >= 1")
    for stage in ("pretrain", "finetune"):
        s = cfg[stage]
        _check_min(f"{stage}.epochs", s.epochs, 0)
        _check_min(f"{stage}.steps_per_epoch", s.steps_per_epoch, 1)
        _check_min(f"{stage}.batch_size", s.batch_size, 1)
        _check_min(f"{stage}.eval_batch_size", s.eval_batch_size, 1)
        _check_positive(f"{stage}.lr", s.lr)
        _check_min(f"{stage}.weight_decay", s.weight_decay, 0)
        _check_min(f"{stage}.momentum", s.momentum, 0)
        _check_min(f"{stage}.divergence_factor", s.divergence_factor, 0)
        if s.schedule == "step":
            _check_min(f"{stage}.step_size", s.step_size, 1)
            _check_positive(f"{stage}.gamma", s.gamma)
    _check_min("finetune.distill.weight", cfg.finetune.distill.weight, 0)
    _check_min("finetune.precise_bn", cfg.finetune.precise_bn, 0)
    _check_positive("finetune.distill.temperature", cfg.finetune.distill.temperature)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain data, choices as strings (for summary.json, checkpoints and
    the cache key)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False, enum_to_str=True)


register_configs()
register_resolvers()
