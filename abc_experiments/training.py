"""Training and evaluation for one stage (pretraining or fine-tuning), resumable mid-epoch.

A stage checkpoints at every epoch end and when interrupted (Ctrl-C / SIGTERM): the model,
optimizer, scheduler, RNG state, the position in the epoch and the running metrics. Because the
batch order and augmentation are functions of (seed, epoch, sample) (see ``data.loaders``), a
resumed stage ends with exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .checkpoints import CheckpointError, ResumeRefusedError, atomic_save, load_checkpoint, load_model_state
from .distributed import DistributedContext
from .nn.calibrate import batchnorms, recalibrate_batchnorm
from .progress import INTERVAL_S, Progress
from .settings import setting_differences
from .tb import STEP_LOSS, log_epoch

log = logging.getLogger(__name__)


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "none")
# Lightning's names: full float32, or torch.autocast to bfloat16 / float16 (the latter with a
# gradient scaler).
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class TrainingDiverged(RuntimeError):
    """The training loss became NaN, infinite, or exploded (see ``divergence_factor``)."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM arrived; the stage saved a checkpoint to resume from."""

    def __init__(self, stage: str, epoch: int, step: int, checkpoint: Path):  # noqa: D107
        super().__init__(f"{stage} interrupted at epoch {epoch + 1}, step {step}; checkpoint {checkpoint}")
        self.stage, self.epoch, self.step, self.checkpoint = stage, epoch, step, checkpoint


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the training loop checks between steps; a second
    Ctrl-C interrupts at once. Handlers are installed only in the main thread."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@dataclass
class Metrics:
    loss: float
    acc: float  # %
    count: int = 0  # images the figures rest on

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}loss": self.loss, f"{prefix}acc": self.acc}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "32",
             channels_last: bool = False, description: str = "evaluating") -> Metrics:
    """Mean cross-entropy and accuracy (%) over ``loader`` in eval mode.

    Args:
        model: the model (its train/eval mode is restored afterwards).
        loader: batches of (images, labels).
        device: where the model lives.
        precision: ``"32"`` or a mixed precision (autocast).
        channels_last: NHWC images.
        description: names the loop in the progress lines the log gets every 30 s while it runs.

    Returns:
        :class:`Metrics` with the loss, the accuracy in % and the number of images.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    progress = Progress(_length(loader), description, bar=False, unit="batches",
                        items_per_step=getattr(loader, "batch_size", None))
    for images, labels in loader:
        images, labels = _to_device(images, device, channels_last), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += labels.numel()
        progress.update(1)
    progress.close()
    model.train(was_training)
    return Metrics(loss=loss_sum.item() / max(count, 1), acc=100.0 * correct.item() / max(count, 1), count=count)


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images


def make_optimizer(parameters, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":  # Nesterov momentum whenever momentum > 0
        return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    if cfg.schedule == "step":
        if cfg.step_size < 1 or not cfg.gamma > 0:
            raise ValueError(f"schedule=step needs step_size >= 1 and gamma > 0 (got {cfg.step_size}, {cfg.gamma})")
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for a mixed precision, a no-op context for ``"32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dtype = _AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def divergence_limit(num_classes: int, factor: float) -> float:
    """The largest training loss taken as still learning: ``factor`` × ln(classes), the
    cross-entropy of a uniform guess (infinite when ``factor`` is 0)."""
    return factor * math.log(max(num_classes, 2)) if factor > 0 else math.inf


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class StageEnvironment:
    """How and where every stage of one run trains: the same for pretraining and fine-tuning.

    Args:
        device: where the model and batches live.
        checkpoint_dir: ``<stage>_last.pt`` and ``<stage>_best.pt`` go there.
        stop: the run's Ctrl-C / SIGTERM flag, checked between steps.
        ctx: the distributed context (a single-process one by default).
        fingerprint: the flat settings a resume must match.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"``.
        channels_last: NHWC images.
        progress: tqdm bars on a terminal (progress lines go to the log either way).
    """

    device: torch.device
    checkpoint_dir: Path
    stop: StopRequest = field(default_factory=lambda: StopRequest())
    ctx: DistributedContext = field(default_factory=lambda: DistributedContext())
    fingerprint: dict = field(default_factory=dict)
    precision: str = "32"
    channels_last: bool = False
    progress: bool = True


@dataclass
class FitResult:
    """What one stage's training produced.

    Attributes:
        history: one record per epoch (``epoch``, ``lr``, ``train_*``, ``val_*``, ``images_per_s``...).
        resumed_from: where a resume picked the stage up (``{"stage", "epoch", "step"}``), or None.
    """

    history: list[dict]
    resumed_from: dict | None = None

    @property
    def best(self) -> dict | None:
        """The record of the epoch with the best validation accuracy (the model kept)."""
        return max(self.history, key=lambda record: record["val_acc"]) if self.history else None

    @property
    def images_per_s(self) -> float | None:
        """Mean training throughput over the epochs (None without a measured epoch)."""
        rates = [record["images_per_s"] for record in self.history if "images_per_s" in record]
        return round(sum(rates) / len(rates), 1) if rates else None


Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels, images)


def seed_stage(seed: int, stage: str) -> None:
    """Every stage starts from its own seed, so its numbers do not depend on what ran before it
    (e.g. whether the FP model was trained in this job or taken from the cache)."""
    torch.manual_seed(seed * 1000 + {"init": 0, "pretrain": 1, "convert": 2, "finetune": 3}[stage])


def train_stage(stage: str, model: nn.Module, loaders: dict, cfg, env: StageEnvironment, writer, *,
                seed: int, resume: bool = False, criterion: Criterion | None = None,
                on_epoch_end: Callable[[int], None] | None = None) -> FitResult:
    """Train ``model`` for one stage and leave it at its best validation epoch.

    Args:
        stage: ``"pretrain"`` or ``"finetune"`` (names the checkpoints, the seed and the log lines).
        model: the model, trained in place.
        loaders: ``train`` and ``val`` loaders.
        cfg: the stage's config group (epochs, optimizer, lr, schedule...).
        env: how and where it trains (:class:`StageEnvironment`).
        writer: a TensorBoard SummaryWriter for the per-epoch tags.
        seed: the run's seed; the stage seeds from it unless it resumes.
        resume: continue from ``<stage>_last.pt`` if there is one.
        criterion: the loss ``(logits, labels, images) -> scalar`` (cross-entropy by default).
        on_epoch_end: called with the finished epoch's number.

    Returns:
        The :class:`FitResult` (history, where it resumed).
    """
    trainer = StageTrainer(stage, model, loaders, cfg, env, writer, criterion=criterion, on_epoch_end=on_epoch_end)
    resumed = trainer.resume() if resume else None
    if not resumed:
        seed_stage(seed, stage)
    history = trainer.fit()  # raises TrainingDiverged before a diverged model is kept
    trainer.load_best()
    return FitResult(history=history, resumed_from=resumed)


class StageTrainer:
    """Trains ``model`` for one stage; ``fit()`` returns the per-epoch history.

    Each epoch logs :data:`abc_experiments.tb.EPOCH_TAGS` to ``writer`` (the same tags for every
    stage, on one x axis: see :mod:`abc_experiments.tb`), keeps
    ``<stage>_last.pt`` and ``<stage>_best.pt`` (best validation accuracy) in ``env.checkpoint_dir``.
    """

    def __init__(self, stage: str, model: nn.Module, loaders: dict, cfg, env: StageEnvironment, writer, *,
                 criterion: Criterion | None = None, on_epoch_end: Callable[[int], None] | None = None):
        self.stage, self.model, self.loaders, self.cfg, self.env, self.writer = stage, model, loaders, cfg, env, writer
        self.device, self.ctx = env.device, env.ctx
        self.net = self.ctx.wrap(model) or model  # what training steps run (DDP-wrapped under torchrun)
        self.criterion = criterion or _cross_entropy
        self.on_epoch_end = on_epoch_end
        # float16 gradients underflow without loss scaling; a disabled scaler is a no-op.
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "16-mixed")
        self.is_writer = self.ctx.is_main  # only rank 0 writes checkpoints and logs
        self.last_path = env.checkpoint_dir / f"{stage}_last.pt"
        self.best_path = env.checkpoint_dir / f"{stage}_best.pt"
        self.optimizer = make_optimizer(model.parameters(), cfg)
        self.precise_bn = int(getattr(cfg, "precise_bn", 0) or 0)  # fine-tuning only (pretraining has no such key)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.history: list[dict] = []
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.running = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        self.best_val_acc = -math.inf

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "stage": self.stage, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "global_step": self.global_step, "running": self.running,
            "history": self.history, "best_val_acc": self.best_val_acc, "config": self.env.fingerprint,
            "scaler": self.scaler.state_dict(),
        }

    def save(self) -> None:
        if self.is_writer:
            atomic_save(self.state_dict(), self.last_path)

    def resume(self) -> dict | None:
        """Continue from ``<stage>_last.pt`` if it exists; returns where it resumed (or None)."""
        if not self.last_path.is_file():
            return None
        state = load_checkpoint(self.last_path, f"{self.stage} checkpoint")
        if state.get("stage") != self.stage:
            raise CheckpointError(f"{self.last_path} is not a {self.stage} checkpoint")
        changed = setting_differences(state.get("config", {}), self.env.fingerprint)
        if changed:
            raise ResumeRefusedError(
                f"resume=true, but {self.last_path} was saved with other settings ({'; '.join(changed)}): "
                "resume with the same overrides as the interrupted run, or start a new run dir")
        load_model_state(self.model, state, self.last_path, f"{self.stage} checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.running = state["global_step"], state["running"]
        self.history, self.best_val_acc = state["history"], state["best_val_acc"]
        log.info("%s: resuming at epoch %d, step %d from %s", self.stage, self.epoch + 1, self.step_in_epoch,
                 self.last_path)
        return {"stage": self.stage, "epoch": self.epoch + 1, "step": self.step_in_epoch}

    def load_best(self) -> None:
        """Continue with the epoch of best validation accuracy (model selection on val)."""
        self.ctx.barrier()
        if self.best_path.is_file():
            state = load_checkpoint(self.best_path, f"{self.stage} best checkpoint")
            load_model_state(self.model, state, self.best_path, f"{self.stage} best checkpoint")

    # ---- training ----------------------------------------------------------------------------
    def _steps_this_epoch(self, loader: DataLoader) -> int:
        steps = len(loader) + self.step_in_epoch  # len() counts the batches left after a mid-epoch start
        return steps if self.cfg.steps_per_epoch is None else min(self.cfg.steps_per_epoch, steps)

    def _train_epoch(self) -> Metrics:
        """One epoch (or what is left of it); returns the training loss, accuracy and image count."""
        loader = self.loaders["train"]
        batch_size = loader.batch_size
        loader.sampler.set_epoch(self.epoch, start=self.step_in_epoch * batch_size)
        total = self._steps_this_epoch(loader)
        self.model.train()
        progress = Progress(total, f"{self.stage} epoch {self.epoch + 1}/{self.cfg.epochs}", initial=self.step_in_epoch,
                            bar=self.env.progress and self.is_writer, items_per_step=batch_size * self.ctx.world_size,
                            interval_s=INTERVAL_S if self.is_writer else math.inf)  # rank 0 speaks for all
        batches = iter(loader)
        limit = None
        try:
            while self.step_in_epoch < total:
                if self.ctx.any(self.env.stop.requested):  # every rank stops at the same step
                    self.save()
                    raise TrainingInterrupted(self.stage, self.epoch, self.step_in_epoch, self.last_path)
                images, labels = next(batches)
                images = _to_device(images, self.device, self.env.channels_last)
                labels = labels.to(self.device, non_blocking=True)
                with autocast(self.device, self.env.precision):
                    logits = self.net(images)
                loss = self.criterion(logits, labels, images)
                hits = (logits.argmax(1) == labels).sum()
                loss_value, correct = torch.stack([loss.detach().float(), hits.float()]).tolist()  # one device sync
                if limit is None:
                    limit = divergence_limit(logits.shape[1], self.cfg.divergence_factor)
                if self.ctx.any(not math.isfinite(loss_value) or loss_value > limit):  # every rank stops, none hangs
                    raise TrainingDiverged(self._divergence_message(loss_value, limit))
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.running += torch.tensor([loss_value * labels.numel(), correct, labels.numel()],
                                             dtype=torch.float64)
                self.step_in_epoch += 1
                self.global_step += 1
                if self.is_writer:
                    self.writer.add_scalar(STEP_LOSS, loss_value, self.global_step)
                progress.update(1, loss=f"{self.running[0] / self.running[2]:.4f}",
                                acc=f"{100 * self.running[1] / self.running[2]:.2f}%")
        finally:
            progress.close()
        running = self.ctx.sum(self.running)
        return Metrics(loss=(running[0] / running[2]).item(), acc=(100 * running[1] / running[2]).item(),
                       count=int(running[2].item()))

    def _divergence_message(self, loss_value: float, limit: float) -> str:
        lr = self.optimizer.param_groups[0]["lr"]
        what = f"became {loss_value}" if not math.isfinite(loss_value) else \
            f"exploded to {loss_value:.3g} (above {limit:.3g}, {self.cfg.divergence_factor:g} × ln(classes))"
        saved = f"; the checkpoint of the last finished epoch is {self.last_path}" if self.last_path.is_file() else ""
        return (f"the {self.stage} loss {what} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} "
                f"(lr {lr:g}): the training diverged. Lower {self.stage}.lr or check the data{saved}")

    def _precise_batchnorm(self) -> None:
        """With ``precise_bn`` = K > 0 (fine-tuning): every BatchNorm's running statistics re-estimated
        on the first K batches of the epoch just trained (the same images and augmentation: both are
        functions of (seed, epoch, sample)), with the model as validation runs it (eval mode, frozen
        alphas), so validation, model selection and the kept checkpoints see statistics of the
        weights as they are, not running averages of weights that moved. Under DDP each rank uses its
        own shard's batches and the statistics are averaged over the ranks."""
        batches = self.precise_bn
        if batches <= 0:
            return
        loader = self.loaders["train"]
        loader.sampler.set_epoch(self.epoch)  # from the epoch's start (the next epoch sets its own)

        def inputs():
            for _, (images, _labels) in zip(range(batches), loader):
                yield _to_device(images, self.device, self.env.channels_last)

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.env.precision):
                recalibrate_batchnorm(self.model, inputs())
        finally:
            self.model.train(was_training)
        if self.ctx.world_size > 1:
            for module in batchnorms(self.model):
                if module.running_mean is not None:
                    for buffer in (module.running_mean, module.running_var):
                        buffer.copy_(self.ctx.sum(buffer.detach().float()).to(buffer) / self.ctx.world_size)

    def fit(self) -> list[dict]:
        """Train the remaining epochs; returns the history (one record per epoch)."""
        if self.precise_bn > 0 and self.epoch < self.cfg.epochs:
            log.info("%s: BatchNorm statistics re-estimated on %d training batches before each validation "
                     "(%s.precise_bn)", self.stage, self.precise_bn, self.stage)
        while self.epoch < self.cfg.epochs:
            lr = self.optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            train = self._train_epoch()
            seconds = time.perf_counter() - started
            self._precise_batchnorm()
            val = evaluate(self.model, self.loaders["val"], self.device, self.env.precision, self.env.channels_last,
                           description=f"{self.stage} epoch {self.epoch + 1} validation")
            record = {"epoch": self.epoch + 1, "lr": lr, "train_samples": train.count,
                      "images_per_s": train.count / max(seconds, 1e-9),
                      **train.as_dict("train_"), **val.as_dict("val_")}
            self.history.append(record)
            if self.is_writer:
                log_epoch(self.writer, record, record["epoch"])
            log.info("%s epoch %d/%d: train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | lr %.3g | %.0f img/s",
                     self.stage, self.epoch + 1, self.cfg.epochs, train.loss, train.acc, val.loss, val.acc, lr,
                     record["images_per_s"])
            if val.acc > self.best_val_acc:
                self.best_val_acc = val.acc
                if self.is_writer:
                    atomic_save({"stage": self.stage, "epoch": self.epoch + 1, "model": self.model.state_dict(),
                                 "val_acc": val.acc}, self.best_path)
            self.scheduler.step()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.running = torch.zeros(3, dtype=torch.float64)
            self.save()
            if self.on_epoch_end is not None:
                self.on_epoch_end(self.epoch)
        return self.history


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)
