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
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from . import distributed
from .checkpoints import (FINAL_CHECKPOINT, CheckpointError, PretrainCache, ResumeRefusedError, atomic_save,
                          load_checkpoint, load_model_state)
from .config import ConfigError, to_container, validate
from .data import build_datasets, build_loaders
from .models import build_model
from .nn import ConversionReport, NothingToConvertError, abc_layers, calibrate, convert, plan_conversion
from .nn import summary as model_summary
from .results import (FAILED, FINISHED, INTERRUPTED, RUNNING, STAGES, SUMMARY_FILE, ABCSetting, RunSummary,
                      StageResult)
from .settings import flat_settings, setting_differences
from .tb import Boards
from .training import (Metrics, StageTrainer, StopRequest, TrainingInterrupted, evaluate, log_epoch,
                       progress_bar)

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when training code changes what a cached model would be
PRETRAIN_GROUPS = ("dataset", "model", "pretrain", "seed", "precision", "channels_last")  # what the FP model depends on


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available: use device=cpu or device=auto")
    return torch.device(name)


def _seed(seed: int, stage: str) -> None:
    """Every stage starts from its own seed, so its numbers do not depend on what ran before it
    (e.g. whether the FP model was trained in this job or taken from the cache)."""
    torch.manual_seed(seed * 1000 + {"init": 0, "pretrain": 1, "convert": 2, "finetune": 3}[stage])


def read_earlier_summary(run_dir: Path) -> RunSummary | None:
    """The summary a run dir already holds; None if there is none or it was cut short."""
    try:
        return RunSummary.read(Path(run_dir) / SUMMARY_FILE)
    except (OSError, ValueError):
        return None


def resume_conflicts(earlier: RunSummary | None, settings: dict) -> list[str]:
    """``key: saved -> current`` for every setting in which ``settings`` (flat, as
    :func:`abc_experiments.settings.flat_settings` gives) differ from the ``earlier`` run's;
    empty without an earlier summary to compare with."""
    if earlier is None or not earlier.config:
        return []
    return setting_differences(flat_settings(earlier.config), settings)


def refuse_resume_message(run_dir: Path, changed: list[str]) -> str:
    return (f"resume=true, but {run_dir} was run with other settings ({'; '.join(changed)}): resume with "
            "the same overrides as the interrupted run, or start a new run dir. Nothing was changed.")


class Experiment:
    """One run of the pipeline; :meth:`run` returns the :class:`RunSummary`."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).absolute()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ctx = distributed.context(cfg.device)
        self.resume = cfg.resume or requeued()
        self.stop = StopRequest()
        self.summary = RunSummary(
            dataset=str(cfg.dataset.name), model=str(cfg.model.name), seed=cfg.seed,
            abc=ABCSetting(M=cfg.abc.M, N=cfg.abc.N or 0, scope=str(cfg.abc.scope)), run_dir=str(self.run_dir),
            experiment=cfg.experiment, world_size=self.ctx.world_size, precision=str(cfg.precision),
            config=to_container(cfg),
        )
        self.boards = None
        self.writing = False  # set once the run dir is written to (a refused start leaves it alone)

    # ---- helpers -------------------------------------------------------------------------------
    def _loaders(self, splits, stage_cfg) -> dict:
        return build_loaders(splits, batch_size=stage_cfg.batch_size, eval_batch_size=stage_cfg.eval_batch_size,
                             num_workers=self.cfg.data.num_workers, device=str(self.device), seed=self.cfg.seed,
                             sampler_rank=self.ctx.rank, sampler_world_size=self.ctx.world_size)

    def _build_model(self, splits) -> nn.Module:
        try:
            model = build_model(str(self.cfg.model.name), splits.in_channels, splits.image_size, splits.num_classes,
                                **self.cfg.model.options)
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def _evaluate(self, model: nn.Module, loaders: dict, val: Metrics | None = None) -> StageResult:
        """Test and validation metrics; ``val`` when they are already known (no second pass)."""
        options = dict(precision=str(self.cfg.precision), channels_last=self.cfg.channels_last)
        val = val or evaluate(model, loaders["val"], self.device, **options)
        test = evaluate(model, loaders["test"], self.device, **options)
        return StageResult(acc=test.acc, loss=test.loss, val_acc=val.acc, val_loss=val.loss, test_size=test.count,
                           val_size=val.count or len(loaders["val"].dataset))

    def _trainer(self, stage: str, model: nn.Module, loaders: dict, stage_cfg, board, on_epoch_end=None):
        trainer = StageTrainer(stage, model, loaders, stage_cfg, device=self.device, checkpoint_dir=self.ckpt_dir,
                               writer=board, stop=self.stop, ctx=self.ctx, progress=self.cfg.progress,
                               on_epoch_end=on_epoch_end, fingerprint=self.fingerprint(),
                               precision=str(self.cfg.precision), channels_last=self.cfg.channels_last)
        resumed = trainer.resume() if self.resume else None
        if resumed:
            self.summary.resumed_from.append(resumed)
        else:
            _seed(self.cfg.seed, stage)
        return trainer

    def fingerprint(self) -> dict:
        """The settings that determine the results: what a resume must match."""
        return flat_settings(self.summary.config)

    def write_summary(self) -> None:
        if self.ctx.is_main:
            self.summary.write(self.run_dir / SUMMARY_FILE)

    def check_resume(self) -> None:
        """Before anything is written: a resume must have the settings of the run it continues
        (its summary.json), and keeps that run's finished stage results."""
        if not self.resume:
            return
        earlier = read_earlier_summary(self.run_dir)
        changed = resume_conflicts(earlier, self.fingerprint())
        if changed:
            raise ResumeRefusedError(refuse_resume_message(self.run_dir, changed))
        if earlier is None:  # none, or cut short: the stages will fill it in again
            return
        if earlier.effective_status() == INTERRUPTED and earlier.status == RUNNING:
            log.warning("%s was interrupted without saving its status (killed?): resuming from its checkpoints",
                        self.run_dir)
        self.summary.fp_source = earlier.fp_source
        for stage in STAGES:
            if earlier.stage(stage) is not None:
                self.summary.set_stage(stage, earlier.stage(stage))

    def plan(self, model: nn.Module) -> None:
        """Refuse a conversion that cannot work before anything trains, with the config keys to change."""
        cfg = self.cfg.abc
        try:
            plan_conversion(model, cfg.M, cfg.N, linear=cfg.linear, keep_first=cfg.keep_first,
                            keep_last=cfg.keep_last, exclude=list(cfg.exclude))
        except NothingToConvertError as error:
            fixes = [key for key, taken in (("abc.keep_first=false", not cfg.keep_first),
                                            ("abc.keep_last=false", not cfg.keep_last),
                                            ("abc.linear=true", cfg.linear or not error.has_linear)) if not taken]
            if cfg.exclude:
                fixes.append(f"fewer abc.exclude patterns (now {list(cfg.exclude)})")
            kept = "; ".join(f"{name}: {why}" for name, why in error.report.kept.items()) or "no conv or linear layers"
            raise ConfigError(f"abc: nothing to convert in model={self.cfg.model.name}: every layer stays full precision "
                              f"({kept}). Set {' or '.join(fixes) or 'another model'}.") from None

    # ---- stages --------------------------------------------------------------------------------
    def pretrain(self, splits, model: nn.Module) -> str:
        """Train, load or take from the cache the FP model; returns where it came from."""
        cfg = self.cfg.pretrain
        if cfg.checkpoint:
            path = Path(cfg.checkpoint).expanduser().absolute()
            load_model_state(model, load_checkpoint(path, "pretrain.checkpoint"), path, "pretrain.checkpoint")
            return f"checkpoint {path}"
        if cfg.epochs == 0:
            return "pretrained weights (pretrain.epochs=0)"
        # Everything that determines the pretrained weights: the settings of these groups (run-only
        # keys such as pretrain.reuse excluded), the split sizes, and the number of processes.
        settings = {key: value for key, value in self.fingerprint().items()
                    if key.split(".")[0] in PRETRAIN_GROUPS or key == "data.val_fraction"}
        settings.update(version=CACHE_VERSION, world_size=self.ctx.world_size,
                        split_sizes=[len(splits.train), len(splits.val), len(splits.test), splits.num_classes])
        cache = PretrainCache(Path(self.cfg.cache_dir).absolute(), f"{self.cfg.model.name}-{self.cfg.dataset.name}",
                              settings)
        self.summary.pretrain_cache = str(cache.path)

        def from_cache() -> str | None:
            try:
                state = cache.load()
                load_model_state(model, state, cache.path, "cached pretrained model")
            except CheckpointError as error:
                log.warning("%s; retraining the FP model and replacing the cache entry", error)
                return None
            for record in state.get("history", []):
                log_epoch(self.boards.fp, record, record["epoch"])
            self.summary.fp_history = state.get("history", [])
            return f"cache {cache.path}"

        if self.ctx.agree(cfg.reuse and cache.exists()):
            source = from_cache()
            if source:
                return source
        with self.ctx.lock_on_main(cache.lock):  # one job trains it; concurrent jobs wait, then reuse it
            if self.ctx.agree(cfg.reuse and cache.exists()):
                source = from_cache()
                if source:
                    return source
            trainer = self._trainer("pretrain", model, self._loaders(splits, cfg), cfg, self.boards.fp)
            history = trainer.fit()  # raises TrainingDiverged before a diverged model reaches the cache
            self._load_best(model, trainer)
            if self.ctx.is_main:
                cache.store(model, history)
            self.summary.fp_history = history
            self.summary.images_per_s["pretrain"] = _mean_throughput(history)
            return "trained"

    def _load_best(self, model: nn.Module, trainer: StageTrainer) -> None:
        """Continue with the epoch of best validation accuracy (model selection on val)."""
        self.ctx.barrier()
        if trainer.best_path.is_file():
            state = load_checkpoint(trainer.best_path, f"{trainer.stage} best checkpoint")
            load_model_state(model, state, trainer.best_path, f"{trainer.stage} best checkpoint")

    def convert_and_calibrate(self, model: nn.Module, loaders: dict) -> dict:
        cfg = self.cfg.abc
        _seed(self.cfg.seed, "convert")
        log.info("converting to ABC(M=%d, N=%s)%s...", cfg.M, cfg.N,
                 f" and calibrating on {cfg.calibration.batches} batches" if cfg.calibration.batches else "")
        report = convert_from_config(model, cfg)
        log.info("%s", report)
        errors = {}
        if cfg.calibration.batches > 0:
            batches = [batch for _, batch in zip(range(cfg.calibration.batches), loaders["calib"])]
            calibrated = sum(1 for _, layer in abc_layers(model) if layer.N > 0)
            bar = progress_bar(calibrated, 0, "calibrating", enabled=self.cfg.progress and self.ctx.is_main)
            errors = calibrate(model, batches, max_samples=cfg.calibration.max_samples,
                               batchnorm=cfg.calibration.batchnorm, seed=self.cfg.seed,
                               progress=lambda name: (bar.set_postfix(layer=name), bar.update(1)))
            bar.close()
        return {"report": report.to_dict(), "activation_errors": errors}

    # ---- the whole run -------------------------------------------------------------------------
    def run(self) -> RunSummary:
        cfg, summary = self.cfg, self.summary
        started = time.perf_counter()
        validate(cfg)
        self.check_resume()
        self.device = self.ctx.device or resolve_device(str(cfg.device))
        summary.device = str(self.device)
        try:
            splits = build_datasets(str(cfg.dataset.name), root=str(Path(cfg.data.root).expanduser().absolute()),
                                    download=cfg.data.download, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
        except ValueError as error:
            raise ConfigError(f"data: {error}") from None
        _seed(cfg.seed, "init")
        fp_model = self._build_model(splits)
        self.plan(fp_model)
        summary.input_shape = [splits.in_channels, splits.image_size, splits.image_size]
        summary.num_classes = splits.num_classes
        # Every setting checked: from here on the run dir is written to.
        self.writing = True
        summary.mark_running()
        self.boards = Boards(self.run_dir / "tb", enabled=self.ctx.is_main)
        if self.resume and not self.ckpt_dir.is_dir():
            log.warning("resume=true, but %s holds no checkpoints: starting from the beginning", self.run_dir)
        log.info("run dir: %s (device %s%s)", self.run_dir, self.device, ", resuming" if self.resume else "")
        loaders = self._loaders(splits, cfg.finetune)
        with self.stop:
            with summary.timed("pretrain"):
                summary.fp_source = self.pretrain(splits, fp_model)
                summary.set_stage("fp", self._evaluate(fp_model, loaders))
            log.info("FP model (%s): test acc %.2f%%", summary.fp_source, summary.fp.acc)
            self.write_summary()

            with summary.timed("convert"):
                abc_model = copy.deepcopy(fp_model)
                summary.conversion = self.convert_and_calibrate(abc_model, loaders)
                summary.set_stage("converted", self._evaluate(abc_model, loaders))
            log.info("converted ABC(%d, %s): test acc %.2f%%", cfg.abc.M, cfg.abc.N, summary.converted.acc)
            self.boards.log_converted(summary.converted, abc_model)
            self.write_summary()

            with summary.timed("finetune"):
                summary.set_stage("finetuned", self.finetune(abc_model, loaders))

        if self.ctx.is_main:  # the model finetuned.acc was measured on, for load_run and abc-export
            atomic_save({"stage": "finetuned", "model": abc_model.state_dict()}, self.ckpt_dir / FINAL_CHECKPOINT)
        example = next(iter(loaders["val"]))[0][:1].to(self.device)
        layer_summary = model_summary(abc_model, example)
        summary.set_model_summary(layer_summary.to_dict())
        summary.wall_time_s["total"] = round(time.perf_counter() - started, 3)
        summary.status = FINISHED
        self.write_summary()
        self.boards.log_final(summary, str(layer_summary))
        log.info("\n%s\n%s", layer_summary, results_table(summary))
        return summary

    def finetune(self, model: nn.Module, loaders: dict) -> StageResult:
        cfg = self.cfg.finetune
        if cfg.epochs == 0:
            return dataclasses.replace(self.summary.converted, best_epoch=0)
        trainer = self._trainer("finetune", model, loaders, cfg, self.boards.abc,
                                on_epoch_end=lambda t: self.boards.log_abc_parameters(model, t.epoch))
        trainer.fit()
        self._load_best(model, trainer)
        last = trainer.history[-1]
        best = max(trainer.history, key=lambda record: record["val_acc"])
        result = self._evaluate(model, loaders, val=Metrics(loss=best["val_loss"], acc=best["val_acc"]))
        self.summary.images_per_s["finetune"] = _mean_throughput(trainer.history)
        return dataclasses.replace(result, best_epoch=best["epoch"], last_val_acc=last["val_acc"],
                                   last_val_loss=last["val_loss"], history=trainer.history)


def convert_from_config(model: nn.Module, abc: Mapping) -> ConversionReport:
    """:func:`abc_experiments.nn.convert` with the ``abc`` config group's settings (a DictConfig or
    the plain dict a summary.json holds)."""
    return convert(model, abc["M"], abc["N"], scope=str(abc["scope"]), linear=abc["linear"],
                   keep_first=abc["keep_first"], keep_last=abc["keep_last"], exclude=list(abc["exclude"]),
                   impl=str(abc["impl"]), bases=str(abc["bases"]), learn_u=abc["learn_u"],
                   alpha_fit=str(abc["alpha_fit"]), kernel=str(abc["kernel"]))


def _mean_throughput(history: list[dict]) -> float | None:
    rates = [record["images_per_s"] for record in history if "images_per_s" in record]
    return round(sum(rates) / len(rates), 1) if rates else None


def results_table(summary: RunSummary) -> str:
    rows = [f"{'stage':<10} {'val acc':>8} {'test acc':>9} {'test loss':>10} {'gap to FP':>10}"]
    for stage in STAGES:
        r = summary.stage(stage)
        gap = "" if stage == "fp" else f"{summary.gaps[stage]:>10.2f}"
        rows.append(f"{stage:<10} {r.val_acc:>8.2f} {r.acc:>9.2f} {r.loss:>10.4f} {gap}")
    se = summary.finetuned.standard_error()
    rows.append(f"test set: {summary.finetuned.test_size} images (standard error of an accuracy there: "
                f"{se:.2f} points)" if se is not None else "")
    rows.append(f"ABC(M={summary.abc.M}, N={summary.abc.N}) on {summary.model}/{summary.dataset}: "
                f"{summary.size.fp_kb:.1f} kB -> {summary.size.abc_kb:.1f} kB; "
                f"summary: {Path(summary.run_dir) / SUMMARY_FILE}")
    return "\n".join(row for row in rows if row)


def run(cfg: DictConfig) -> float:
    """Run the experiment of ``cfg``; return the fine-tuned validation accuracy (%).

    Settings are checked before anything is written: a config error or a refused resume leaves the
    run dir as it was. Past that, on failure or interruption ``summary.json`` records the status,
    the error and every result obtained so far, and the exception propagates.
    """
    experiment = Experiment(cfg)
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


def requeued() -> bool:
    """A SLURM job that was preempted or timed out and requeued (e.g. by submitit) resumes from its
    own last checkpoint in its job dir, without being told."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def _is_interrupt(error: BaseException) -> bool:
    return isinstance(error, (TrainingInterrupted, KeyboardInterrupt))
