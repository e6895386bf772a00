"""The typed configuration schema of ``abc-run``, registered in Hydra's ConfigStore.

OmegaConf checks types when the YAML configs and command-line overrides are merged into this
schema (``abc.M=five`` fails there); :func:`validate` checks ranges and choices before anything
trains (``abc.M=0``). Both give one readable message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .data import DATASETS
from .models import MODELS
from .nn.activations import KERNELS
from .nn.layers import IMPLS
from .nn.weights import ALPHA_FITS, BASES, SCOPES

DEVICES = ("auto", "cpu", "cuda", "mps")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "cosine", "step")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclass
class DatasetConfig:
    name: str = "digits"


@dataclass
class DataConfig:
    root: str = "data"
    download: bool = True
    val_fraction: float = 0.1
    num_workers: Optional[int] = None  # None: a default that suits the dataset and the machine


@dataclass
class ModelConfig:
    name: str = "seed_cnn"
    pretrained: bool = False  # resnet18 only: torchvision's ImageNet weights
    stem: str = "auto"  # resnet18 only: auto | imagenet | cifar


@dataclass
class CalibrationConfig:
    batches: int = 8  # training batches used to fit shifts and betas (0 disables calibration)
    batchnorm: bool = True  # re-estimate BatchNorm statistics after conversion
    max_samples: int = 262144  # input values sampled per layer


@dataclass
class ABCConfig:
    M: int = 3
    N: Optional[int] = 3  # 0 or null: full-precision activations (weight-only ABC)
    scope: str = "per_layer"
    keep_first: bool = True  # first conv stays full precision
    keep_last: bool = True  # final classifier stays full precision
    linear: bool = False  # also convert hidden fully connected layers
    exclude: List[str] = field(default_factory=list)  # fnmatch patterns of module names to keep
    impl: str = "fused"
    bases: str = "shifted"
    learn_u: bool = False
    alpha_fit: str = "lstsq"
    kernel: str = "eager"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class StageConfig:
    """Training settings for one stage (pretraining the FP model, fine-tuning the ABC model)."""

    epochs: int = 1
    steps_per_epoch: Optional[int] = None  # cap on optimizer steps per epoch (the notebook: 200)
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    step_size: int = 30  # epochs between lr drops, schedule=step
    gamma: float = 0.1


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
    finetune: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    progress: bool = True  # progress bars (only shown on a terminal)
    run_dir: str = "${hydra:runtime.output_dir}"
    cache_dir: str = "outputs/cache"
    experiment: Optional[str] = None  # name of the preset, set by conf/experiment/*.yaml


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def _check_choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not a valid choice: use one of {', '.join(map(str, choices))}")


def _check_min(key: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{key}={value} is out of range: it must be ≥ {minimum}")


def validate(cfg: DictConfig) -> None:
    """Range and choice checks that the type schema cannot express. Raises :class:`ConfigError`."""
    _check_choice("dataset", cfg.dataset.name, DATASETS)
    _check_choice("model", cfg.model.name, MODELS)
    _check_choice("device", cfg.device, DEVICES)
    _check_min("abc.M", cfg.abc.M, 1)
    _check_min("abc.N", cfg.abc.N, 0)
    _check_choice("abc.scope", cfg.abc.scope, SCOPES)
    _check_choice("abc.impl", cfg.abc.impl, IMPLS)
    _check_choice("abc.bases", cfg.abc.bases, BASES)
    _check_choice("abc.alpha_fit", cfg.abc.alpha_fit, ALPHA_FITS)
    _check_choice("abc.kernel", cfg.abc.kernel, KERNELS)
    _check_choice("model.stem", cfg.model.stem, ("auto", "imagenet", "cifar"))
    if cfg.model.name != "resnet18" and (cfg.model.pretrained or cfg.model.stem != "auto"):
        raise ConfigError(f"model.pretrained and model.stem apply to resnet18 only, not model={cfg.model.name}")
    if cfg.abc.learn_u and cfg.abc.bases != "shifted":
        raise ConfigError("abc.learn_u=true needs abc.bases=shifted (residual bases have no shifts to learn)")
    _check_min("abc.calibration.batches", cfg.abc.calibration.batches, 0)
    _check_min("abc.calibration.max_samples", cfg.abc.calibration.max_samples, 1)
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} is out of range: it must be in (0, 1)")
    _check_min("data.num_workers", cfg.data.num_workers, 0)
    if cfg.pretrain.epochs == 0 and not (cfg.model.pretrained or cfg.pretrain.checkpoint):
        raise ConfigError("pretrain.epochs=0 skips FP training, so the weights must come from somewhere: "
                          "set model.pretrained=true or pretrain.checkpoint=PATH, or pretrain.epochs >= 1")
    for stage in ("pretrain", "finetune"):
        s = cfg[stage]
        _check_min(f"{stage}.epochs", s.epochs, 0)
        _check_min(f"{stage}.steps_per_epoch", s.steps_per_epoch, 1)
        _check_min(f"{stage}.batch_size", s.batch_size, 1)
        _check_min(f"{stage}.eval_batch_size", s.eval_batch_size, 1)
        _check_choice(f"{stage}.optimizer", s.optimizer, OPTIMIZERS)
        _check_choice(f"{stage}.schedule", s.schedule, SCHEDULES)
        if not s.lr > 0:
            raise ConfigError(f"{stage}.lr={s.lr} is out of range: it must be > 0")
        _check_min(f"{stage}.weight_decay", s.weight_decay, 0)
        _check_min(f"{stage}.momentum", s.momentum, 0)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain data (for summary.json, checkpoints and the cache key)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


# ---- run-directory names ---------------------------------------------------------------------
_LAUNCH_ID: list[str] = []


def launch_id() -> str:
    """A timestamp plus a random suffix, fixed for this process (and shared by torchrun's ranks,
    which all derive it from their common parent), so launches in the same second never collide."""
    if not _LAUNCH_ID:
        import datetime
        import secrets

        if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
            run_id = os.environ["TORCHELASTIC_RUN_ID"]
            if run_id in ("", "none"):  # torchrun without a rendezvous id: the agent's pid and start time
                stat = Path(f"/proc/{os.getppid()}/stat")
                started = stat.read_text().rsplit(")", 1)[1].split()[19] if stat.exists() else "0"
                run_id = f"{os.getppid()}-{started}"
            _LAUNCH_ID.append("ddp_" + run_id)
        else:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            _LAUNCH_ID.append(f"{stamp}_{secrets.token_hex(3)}")
    return _LAUNCH_ID[0]


def _readable(overrides: str, limit: int = 120) -> str:
    """The overrides as a directory name; a long one is cut and given a hash of the whole, so
    jobs that differ only at the end still get different dirs."""
    name = overrides.replace("/", "-").replace(" ", "")
    if len(name) <= limit:
        return name
    import hashlib
    return f"{name[:limit - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    # use_cache: Hydra copies the launcher's resolver cache into every job's config, so jobs that
    # joblib or submitit run in other processes resolve the same sweep dir.
    OmegaConf.register_new_resolver("abc_launch_id", launch_id, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("abc_suffix", lambda o: f"_{_readable(o)}" if o else "", replace=True)
    OmegaConf.register_new_resolver(
        "abc_job_subdir", lambda num, o: _readable(o) if o else f"job{num}", replace=True)


register_configs()
register_resolvers()
