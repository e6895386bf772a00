"""The experiment: pretrain (or load) the FP model, convert to ABC, calibrate, fine-tune, report.

:func:`run` takes the composed config and returns the fine-tuned validation accuracy (the value a
sweeper maximises); ``abc_experiments.cli`` only wraps it. Everything goes to ``cfg.run_dir``
(checkpoints, TensorBoard events, ``summary.json``) and the pretrain cache in ``cfg.cache_dir``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from . import distributed
from .checkpoints import (
    FINAL_CHECKPOINT,
    CheckpointError,
    PretrainCache,
    ResumeRefusedError,
    atomic_save,
    load_checkpoint,
    load_model_state,
)
from .config import ConfigError, to_container, validate
from .data import build_datasets, build_loaders
from .devices import DeviceUnavailableError, resolve_device
from .distillation import DistillationCriterion
from .models import build_model
from .nn import (
    ConversionReport,
    LayerPrecisionError,
    NothingToConvertError,
    abc_layers,
    calibrate,
    check_layer_precision,
    convert,
    plan_conversion,
)
from .nn import summary as model_summary
from .progress import Progress
from .results import FAILED, FINISHED, INTERRUPTED, RUNNING, STAGES, SUMMARY_FILE, ABCSetting, RunSummary, StageResult
from .resume import read_earlier_summary, refuse_resume_message, resume_conflicts, resume_requested
from .settings import flat_settings, format_layer_precision
from .tb import Boards, log_epoch
from .training import (
    FitResult,
    Metrics,
    StageEnvironment,
    StopRequest,
    TrainingInterrupted,
    autocast,
    evaluate,
    seed_stage,
    train_stage,
)

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when training code changes what a cached model would be
PRETRAIN_GROUPS = ("dataset", "model", "pretrain", "seed", "precision", "channels_last")  # what the FP model depends on


@dataclass
class PretrainResult:
    """Where the FP model came from, and what training it (if it was trained here) recorded.

    Attributes:
        source: ``"trained"``, ``"cache <path>"``, ``"checkpoint <path>"`` or ``"pretrained weights ..."``.
        history: the per-epoch records of its training (also when taken from the cache).
        cache_path: the cache entry it was read from or stored to (None when no cache applies).
        fit: the training's :class:`FitResult` when it was trained in this run.
    """

    source: str
    history: list[dict] = dataclasses.field(default_factory=list)
    cache_path: str | None = None
    fit: FitResult | None = None


class Experiment:
    """One run of the pipeline: :meth:`run` returns the :class:`RunSummary`.

    Each stage is a method that takes what it needs and returns its result; :meth:`run` alone
    writes them into the summary (and ``summary.json`` after each stage, so a failure keeps every
    result obtained so far).
    """

    def __init__(self, cfg: DictConfig, shared_fp_root: Path | None = None):
        self.cfg = cfg
        self.shared_fp_root = shared_fp_root  # a sweep's folder of FP TensorBoard runs (see Boards)
        self.run_dir = Path(cfg.run_dir).absolute()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ctx = distributed.context(cfg.device)
        self.resume = resume_requested(cfg.resume)
        self.summary = RunSummary(
            dataset=str(cfg.dataset.name), model=str(cfg.model.name), seed=cfg.seed,
            abc=ABCSetting(M=cfg.abc.M, N=cfg.abc.N or 0, scope=str(cfg.abc.scope), layers=_layer_overrides(cfg.abc)),
            run_dir=str(self.run_dir),
            experiment=cfg.experiment, world_size=self.ctx.world_size, precision=str(cfg.precision),
            config=to_container(cfg),
        )
        self.boards: Boards | None = None
        self.writing = False  # set once the run dir is written to (a refused start leaves it alone)

    # ---- helpers -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """The settings that determine the results: what a resume must match."""
        return flat_settings(self.summary.config)

    def write_summary(self) -> None:
        if self.ctx.is_main:
            self.summary.write(self.run_dir / SUMMARY_FILE)

    def loaders(self, splits, stage_cfg, device: torch.device) -> dict:
        return build_loaders(splits, batch_size=stage_cfg.batch_size, eval_batch_size=stage_cfg.eval_batch_size,
                             num_workers=self.cfg.data.num_workers, device=str(device), seed=self.cfg.seed,
                             sampler_rank=self.ctx.rank, sampler_world_size=self.ctx.world_size)

    def build_model(self, splits, device: torch.device) -> nn.Module:
        try:
            model = build_model(str(self.cfg.model.name), splits.in_channels, splits.image_size, splits.num_classes,
                                **self.cfg.model.options)
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def evaluate(self, model: nn.Module, loaders: dict, device: torch.device, val: Metrics | None = None,
                 what: str = "model") -> StageResult:
        """Test and validation metrics; ``val`` when they are already known (no second pass)."""
        options = dict(precision=str(self.cfg.precision), channels_last=self.cfg.channels_last)
        val = val or evaluate(model, loaders["val"], device, description=f"{what}: validation", **options)
        test = evaluate(model, loaders["test"], device, description=f"{what}: test", **options)
        return StageResult(acc=test.acc, loss=test.loss, val_acc=val.acc, val_loss=val.loss, test_size=test.count,
                           val_size=val.count or len(loaders["val"].dataset))

    def earlier_results(self) -> RunSummary | None:
        """Before anything is written: a resume must have the settings of the run it continues
        (its summary.json, returned so the run keeps that run's finished stage results); None
        when not resuming or there is nothing to continue."""
        if not self.resume:
            return None
        earlier = read_earlier_summary(self.run_dir)
        changed = resume_conflicts(earlier, self.fingerprint())
        if changed:
            raise ResumeRefusedError(refuse_resume_message(self.run_dir, changed))
        if earlier is not None and earlier.effective_status() == INTERRUPTED and earlier.status == RUNNING:
            log.warning("%s was interrupted without saving its status (killed?): resuming from its checkpoints",
                        self.run_dir)
        return earlier

    def plan(self, model: nn.Module) -> None:
        """Refuse a conversion that cannot work before anything trains (right after the model is
        built, before pretraining), with the config keys to change: nothing to convert, or an
        ``abc.layers`` pattern that sets no converted layer."""
        cfg = self.cfg.abc
        try:
            plan_conversion(model, cfg.M, cfg.N, linear=cfg.linear, keep_first=cfg.keep_first,
                            keep_last=cfg.keep_last, exclude=list(cfg.exclude), layers=cfg.get("layers"))
        except LayerPrecisionError as error:
            raise ConfigError(f"abc.{error} (model={self.cfg.model.name})") from None
        except NothingToConvertError as error:
            fixes = [key for key, taken in (("abc.keep_first=false", not cfg.keep_first),
                                            ("abc.keep_last=false", not cfg.keep_last),
                                            ("abc.linear=true", cfg.linear or not error.has_linear)) if not taken]
            if cfg.exclude:
                fixes.append(f"fewer abc.exclude patterns (now {list(cfg.exclude)})")
            kept = "; ".join(f"{name}: {why}" for name, why in error.report.kept.items()) or "no conv or linear layers"
            raise ConfigError(f"abc: nothing to convert in model={self.cfg.model.name}: every layer stays full "
                              "precision "
                              f"({kept}). Set {' or '.join(fixes) or 'another model'}.") from None

    # ---- stages --------------------------------------------------------------------------------
    def pretrain(self, splits, model: nn.Module, env: StageEnvironment) -> PretrainResult:
        """Train, load or take from the cache the FP model (in place); returns where it came from.
        Its curves go to the FP board, which this opens (shared by a sweep's jobs, see :class:`Boards`)."""
        cfg = self.cfg.pretrain
        if cfg.checkpoint or cfg.epochs == 0:
            self.boards.open_fp(None, self.run_dir)
        if cfg.checkpoint:
            path = Path(cfg.checkpoint).expanduser().absolute()
            load_model_state(model, load_checkpoint(path, "pretrain.checkpoint"), path, "pretrain.checkpoint")
            return PretrainResult(f"checkpoint {path}")
        if cfg.epochs == 0:
            return PretrainResult("pretrained weights (pretrain.epochs=0)")
        # Everything that determines the pretrained weights: the settings of these groups (run-only
        # keys such as pretrain.reuse excluded), the split sizes, and the number of processes.
        settings = {key: value for key, value in self.fingerprint().items()
                    if key.split(".")[0] in PRETRAIN_GROUPS or key == "data.val_fraction"}
        settings.update(version=CACHE_VERSION, world_size=self.ctx.world_size,
                        split_sizes=[len(splits.train), len(splits.val), len(splits.test), splits.num_classes])
        cache = PretrainCache(Path(self.cfg.cache_dir).absolute(), f"{self.cfg.model.name}-{self.cfg.dataset.name}",
                              settings)
        self.boards.open_fp(cache.path.stem, self.run_dir)
        board = self.boards.fp

        def from_cache() -> PretrainResult | None:
            try:
                state = cache.load()
                load_model_state(model, state, cache.path, "cached pretrained model")
            except CheckpointError as error:
                log.warning("%s; retraining the FP model and replacing the cache entry", error)
                return None
            history = state.get("history", [])
            for record in history:
                log_epoch(board, record, record["epoch"])
            return PretrainResult(f"cache {cache.path}", history, str(cache.path))

        if self.ctx.agree(cfg.reuse and cache.exists()):
            cached = from_cache()
            if cached:
                return cached
        with self.ctx.lock_on_main(cache.lock):  # one job trains it; concurrent jobs wait, then reuse it
            if self.ctx.agree(cfg.reuse and cache.exists()):
                cached = from_cache()
                if cached:
                    return cached
            fit = train_stage("pretrain", model, self.loaders(splits, cfg, env.device), cfg, env, board,
                              seed=self.cfg.seed, resume=self.resume)
            if self.ctx.is_main:
                cache.store(model, fit.history)
            return PretrainResult("trained", fit.history, str(cache.path), fit)

    def convert_and_calibrate(self, model: nn.Module, loaders: dict, reference: nn.Module) -> dict:
        """Convert ``model`` to ABC in place and calibrate it (``reference``: the FP model it is a
        copy of); returns the conversion report and the per-layer activation errors (the summary's
        ``conversion``)."""
        cfg = self.cfg.abc
        seed_stage(self.cfg.seed, "convert")
        overrides = format_layer_precision(_layer_overrides(cfg))
        log.info("converting to ABC(M=%d, N=%s)%s%s...", cfg.M, cfg.N,
                 f" with abc.layers={overrides}" if overrides else "",
                 f" and calibrating on {cfg.calibration.batches} batches" if cfg.calibration.batches else "")
        report = convert_from_config(model, cfg)
        log.info("%s", report)
        errors = {}
        if cfg.calibration.batches > 0:
            batches = [batch for _, batch in zip(range(cfg.calibration.batches), loaders["calib"])]
            calibrated = sum(1 for _, layer in abc_layers(model) if layer.N > 0)
            progress = Progress(calibrated, "calibrating", bar=self.cfg.progress and self.ctx.is_main, unit="layers")

            def layer_done(name: str) -> None:
                progress.update(1, layer=name)
                if self.ctx.is_main:
                    log.info("calibrated %s (%d/%d layers, %.1f s)", name, progress.done, calibrated,
                             time.perf_counter() - progress.started)

            errors = calibrate(model, batches, max_samples=cfg.calibration.max_samples,
                               batchnorm=cfg.calibration.batchnorm, seed=self.cfg.seed, progress=layer_done,
                               reference=reference if cfg.calibration.batchnorm_relative else None)
            progress.close()
        return {"report": report.to_dict(), "activation_errors": errors}

    def finetune(self, model: nn.Module, loaders: dict, env: StageEnvironment, converted: StageResult,
                 teacher: nn.Module | None = None) -> tuple[StageResult, FitResult | None]:
        """Fine-tune the converted ``model`` (in place, left at its best validation epoch, or at the
        calibrated state when no epoch validates better: best_epoch 0); returns its test/validation
        result and the training's :class:`FitResult` (None with 0 epochs).
        ``teacher``, the FP model, is distilled from when ``finetune.distill.weight`` > 0."""
        cfg = self.cfg.finetune
        if cfg.epochs == 0:
            return dataclasses.replace(converted, best_epoch=0), None
        calibrated = {key: value.detach().clone() for key, value in model.state_dict().items()}
        fit = train_stage("finetune", model, loaders, cfg, env, self.boards.abc, seed=self.cfg.seed,
                          resume=self.resume, criterion=self.criterion(teacher, env),
                          on_epoch_end=lambda epoch: self.boards.log_abc_parameters(model, epoch))
        last, best = fit.history[-1], fit.best
        if converted.val_acc > best["val_acc"]:
            # model selection on val includes the starting point: calibration alone validated better
            # than every fine-tuned epoch, so the calibrated model is the result (best_epoch 0)
            model.load_state_dict(calibrated)
            log.info("fine-tuning: no epoch beat the calibrated model's validation accuracy (%.2f%% > %.2f%% at "
                     "epoch %d): keeping the calibrated model (best_epoch 0)", converted.val_acc, best["val_acc"],
                     best["epoch"])
            return dataclasses.replace(converted, best_epoch=0, last_val_acc=last["val_acc"],
                                       last_val_loss=last["val_loss"], history=fit.history), fit
        result = self.evaluate(model, loaders, env.device, val=Metrics(loss=best["val_loss"], acc=best["val_acc"]),
                               what="fine-tuned model")
        return dataclasses.replace(result, best_epoch=best["epoch"], last_val_acc=last["val_acc"],
                                   last_val_loss=last["val_loss"], history=fit.history), fit

    def criterion(self, teacher: nn.Module | None, env: StageEnvironment):
        """The fine-tuning loss: cross-entropy, plus distillation from ``teacher`` when asked."""
        distill = self.cfg.finetune.distill
        if teacher is None or distill.weight == 0:
            return None
        return DistillationCriterion(teacher, distill.weight, distill.temperature,
                                     autocast=lambda: autocast(env.device, env.precision))

    # ---- the whole run -------------------------------------------------------------------------
    def run(self) -> RunSummary:
        cfg, summary = self.cfg, self.summary
        started = time.perf_counter()
        validate(cfg)
        earlier = self.earlier_results()
        try:
            device = self.ctx.device or resolve_device(str(cfg.device))
        except DeviceUnavailableError as error:
            raise ConfigError(str(error)) from None
        try:
            splits = build_datasets(str(cfg.dataset.name), root=str(Path(cfg.data.root).expanduser().absolute()),
                                    download=cfg.data.download, val_fraction=cfg.data.val_fraction, seed=cfg.seed,
                                    verify=cfg.data.verify)
        except ValueError as error:
            raise ConfigError(f"data: {error}") from None
        seed_stage(cfg.seed, "init")
        fp_model = self.build_model(splits, device)
        self.plan(fp_model)
        # Every setting checked: from here on the run dir is written to.
        self.writing = True
        summary.device = str(device)
        summary.input_shape = [splits.in_channels, splits.image_size, splits.image_size]
        summary.num_classes = splits.num_classes
        if earlier is not None:  # a resume keeps the finished stages' results
            summary.fp_source = earlier.fp_source
            for stage in STAGES:
                if earlier.stage(stage) is not None:
                    summary.set_stage(stage, earlier.stage(stage))
        summary.mark_running()
        self.boards = Boards(self.run_dir / "tb", enabled=self.ctx.is_main, shared_fp_root=self.shared_fp_root)
        if self.resume and not self.ckpt_dir.is_dir():
            log.warning("resume=true, but %s holds no checkpoints: starting from the beginning", self.run_dir)
        log.info("run dir: %s (device %s%s)", self.run_dir, device, ", resuming" if self.resume else "")
        env = StageEnvironment(device=device, checkpoint_dir=self.ckpt_dir, stop=StopRequest(), ctx=self.ctx,
                               fingerprint=self.fingerprint(), precision=str(cfg.precision),
                               channels_last=cfg.channels_last, progress=cfg.progress)
        loaders = self.loaders(splits, cfg.finetune, device)
        with env.stop:
            with summary.timed("pretrain"):
                pretrained = self.pretrain(splits, fp_model, env)
                summary.fp_source, summary.fp_history = pretrained.source, pretrained.history
                summary.pretrain_cache = pretrained.cache_path
                if pretrained.fit is not None:
                    summary.images_per_s["pretrain"] = pretrained.fit.images_per_s
                    if pretrained.fit.resumed_from:
                        summary.resumed_from.append(pretrained.fit.resumed_from)
                summary.set_stage("fp", self.evaluate(fp_model, loaders, device, what="FP model"))
            log.info("FP model (%s): test acc %.2f%%", summary.fp_source, summary.fp.acc)
            fp_epochs = len(pretrained.history)  # the ABC curves continue from there
            self.boards.log_fp_test(summary.fp, fp_epochs)
            self.boards.start_abc(fp_epochs)
            self.write_summary()

            with summary.timed("convert"):
                abc_model = copy.deepcopy(fp_model)
                summary.conversion = self.convert_and_calibrate(abc_model, loaders, reference=fp_model)
                summary.set_stage("converted", self.evaluate(abc_model, loaders, device, what="converted model"))
            log.info("converted ABC(%d, %s): test acc %.2f%%", cfg.abc.M, cfg.abc.N, summary.converted.acc)
            self.boards.log_converted(summary.converted, summary.fp, abc_model)
            self.write_summary()

            with summary.timed("finetune"):
                finetuned, fit = self.finetune(abc_model, loaders, env, summary.converted, teacher=fp_model)
                summary.set_stage("finetuned", finetuned)
                if fit is not None:
                    summary.images_per_s["finetune"] = fit.images_per_s
                    if fit.resumed_from:
                        summary.resumed_from.append(fit.resumed_from)

        if self.ctx.is_main:  # the model finetuned.acc was measured on, for load_run and abc-export
            atomic_save({"stage": "finetuned", "model": abc_model.state_dict()}, self.ckpt_dir / FINAL_CHECKPOINT)
        example = next(iter(loaders["val"]))[0][:1].to(device)
        layer_summary = model_summary(abc_model, example)
        summary.set_model_summary(layer_summary.to_dict())
        summary.wall_time_s["total"] = round(time.perf_counter() - started, 3)
        summary.status = FINISHED
        self.write_summary()
        self.boards.log_final(summary, str(layer_summary), len(summary.finetuned.history))
        log.info("\n%s\n%s", layer_summary, results_table(summary))
        hint = compression_hint(abc_model, (summary.conversion or {}).get("report", {}).get("kept", {}),
                                summary.size.compression if summary.size else None)
        if hint:
            log.info("%s", hint)
        return summary


FIXES = {"linear layer (linear=False)": "abc.linear=true converts it",
         "first conv (keep_first)": "abc.keep_first=false converts it",
         "final classifier (keep_last)": "abc.keep_last=false converts it",
         "excluded by pattern": "drop its abc.exclude pattern to convert it"}


def compression_hint(model: nn.Module, kept: Mapping[str, str], compression: float | None) -> str | None:
    """One line that says why a run barely compresses (below 2x) when one full-precision layer holds
    most of the weights, and which override converts it; None otherwise.

    Args:
        model: the converted model.
        kept: the conversion report's layers kept at full precision, name -> reason.
        compression: the run's compression ratio (fp size / ABC size).

    Returns:
        The line, or None.
    """
    if compression is None or compression >= 2 or not kept:
        return None
    weights = {name: m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "weight", None) is not None}
    total = sum(weights.values())
    name = max((n for n in kept if n in weights), key=weights.get, default=None)
    if name is None or total == 0 or weights[name] < total / 2:
        return None
    fix = FIXES.get(kept[name], "")
    return (f"compression is only {compression:.2f}x: {name} ({weights[name]:,} weights, "
            f"{weights[name] / total:.0%} of the model's) stays full precision ({kept[name]})"
            + (f"; {fix}" if fix else ""))


def _layer_overrides(abc: Mapping) -> dict[str, dict[str, int]]:
    """``abc.layers`` as plain data with only the keys set (absent in configs from before it)."""
    try:
        return check_layer_precision(abc.get("layers"))
    except LayerPrecisionError as error:
        raise ConfigError(f"abc.{error}") from None


def convert_from_config(model: nn.Module, abc: Mapping) -> ConversionReport:
    """:func:`abc_experiments.nn.convert` with the ``abc`` config group's settings (a DictConfig or
    the plain dict a summary.json holds), per-layer precision (``abc.layers``) included.

    Args:
        model: the full-precision model, converted in place.
        abc: the ``abc`` config group.

    Returns:
        The :class:`ConversionReport`.
    """
    return convert(model, abc["M"], abc["N"], scope=str(abc["scope"]), linear=abc["linear"],
                   keep_first=abc["keep_first"], keep_last=abc["keep_last"], exclude=list(abc["exclude"]),
                   impl=str(abc["impl"]), bases=str(abc["bases"]), learn_u=abc["learn_u"],
                   alpha_fit=str(abc["alpha_fit"]), kernel=str(abc["kernel"]), layers=_layer_overrides(abc))


def results_table(summary: RunSummary) -> str:
    rows = [f"{'stage':<10} {'val acc':>8} {'test acc':>9} {'test loss':>10} {'gap to FP':>10}"]
    for stage in STAGES:
        r = summary.stage(stage)
        gap = "" if stage == "fp" else f"{summary.gaps[stage]:>10.2f}"
        rows.append(f"{stage:<10} {r.val_acc:>8.2f} {r.acc:>9.2f} {r.loss:>10.4f} {gap}")
    se = summary.finetuned.standard_error()
    rows.append(f"test set: {summary.finetuned.test_size} images (standard error of an accuracy there: "
                f"{se:.2f} points)" if se is not None else "")
    overrides = format_layer_precision(summary.abc.layers)
    rows.append(f"ABC(M={summary.abc.M}, N={summary.abc.N}"
                f"{f', abc.layers={overrides}' if overrides else ''}) on {summary.model}/{summary.dataset}: "
                f"{summary.size.fp_kb:.1f} kB -> {summary.size.abc_kb:.1f} kB; "
                f"summary: {Path(summary.run_dir) / SUMMARY_FILE}")
    return "\n".join(row for row in rows if row)


def run(cfg: DictConfig, shared_fp_root: Path | None = None) -> float:
    """Run the experiment of ``cfg``; return the fine-tuned validation accuracy (%).

    ``shared_fp_root``: in a sweep, the folder where the FP model's TensorBoard curves are written
    once per pretraining (:func:`abc_experiments.tb.shared_fp_root` of the sweep dir); None: in the
    run's own ``tb/fp``.

    Settings are checked before anything is written: a config error or a refused resume leaves the
    run dir as it was. Past that, on failure or interruption ``summary.json`` records the status,
    the error and every result obtained so far, and the exception propagates.
    """
    experiment = Experiment(cfg, shared_fp_root)
    try:
        summary = experiment.run()
    except BaseException as error:
        if experiment.writing:
            experiment.summary.status = INTERRUPTED if _is_interrupt(error) else FAILED
            experiment.summary.error = f"{type(error).__name__}: {error}"
            experiment.write_summary()
        raise
    finally:
        if experiment.boards is not None:
            experiment.boards.close()
        experiment.ctx.close()
    value = summary.finetuned.val_acc
    return value if math.isfinite(value) else float("nan")


def _is_interrupt(error: BaseException) -> bool:
    return isinstance(error, (TrainingInterrupted, KeyboardInterrupt))
