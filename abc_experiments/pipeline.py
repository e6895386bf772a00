"""The experiment: pretrain (or load) the FP model, convert to ABC, calibrate, fine-tune, report.

:func:`run` takes the composed config and returns the fine-tuned validation accuracy (the value a
sweeper maximises); ``abc_experiments.cli`` only wraps it. Everything goes to ``cfg.run_dir``
(checkpoints, TensorBoard events, ``summary.json``) and the pretrain cache in ``cfg.cache_dir``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from . import distributed
from .checkpoints import PretrainCache, atomic_write_text, load_checkpoint, load_model_state
from .config import ConfigError, to_container, validate
from .data import build_datasets, build_loaders
from .models import build_model
from .nn import calibrate, convert, summary
from .settings import flat_settings
from .training import Metrics, StageTrainer, StopRequest, TrainingInterrupted, evaluate, log_epoch
from .tb import Boards

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when training code changes what a cached model would be
PRETRAIN_GROUPS = ("dataset", "model", "pretrain", "seed")  # config groups the FP model depends on


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


class Experiment:
    """One run of the pipeline; :meth:`run` returns the summary dict."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).absolute()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.ctx = distributed.context(cfg.device)
        self.resume = cfg.resume or requeued()
        self.stop = StopRequest()
        previous = self.run_dir / "summary.json"
        try:
            earlier = json.loads(previous.read_text()) if self.resume and previous.is_file() else {}
        except ValueError:  # a summary cut short: the stages will fill it in again
            earlier = {}
        self.summary: dict = {
            **{k: v for k, v in earlier.items() if k in ("fp", "converted", "finetuned", "fp_source")},
            "status": "running", "dataset": cfg.dataset.name, "model": cfg.model.name, "seed": cfg.seed,
            "experiment": cfg.experiment, "abc": {"M": cfg.abc.M, "N": cfg.abc.N or 0, "scope": cfg.abc.scope},
            "run_dir": str(self.run_dir), "world_size": self.ctx.world_size, "wall_time_s": {},
            "config": to_container(cfg),
        }
        self.boards = None

    # ---- helpers -------------------------------------------------------------------------------
    def _loaders(self, splits, stage_cfg) -> dict:
        return build_loaders(splits, batch_size=stage_cfg.batch_size, eval_batch_size=stage_cfg.eval_batch_size,
                             num_workers=self.cfg.data.num_workers, device=str(self.device), seed=self.cfg.seed,
                             sampler_rank=self.ctx.rank, sampler_world_size=self.ctx.world_size)

    def _build_model(self, splits) -> nn.Module:
        options = {"pretrained": self.cfg.model.pretrained, "stem": self.cfg.model.stem} \
            if self.cfg.model.name == "resnet18" else {}
        return build_model(self.cfg.model.name, splits.in_channels, splits.image_size, splits.num_classes,
                           **options).to(self.device)

    def _evaluate(self, model: nn.Module, loaders: dict, val: Metrics | None = None) -> dict:
        """Test and validation metrics; ``val`` when they are already known (no second pass)."""
        val = val or evaluate(model, loaders["val"], self.device)
        test = evaluate(model, loaders["test"], self.device)
        return {"acc": test.acc, "loss": test.loss, "val_acc": val.acc, "val_loss": val.loss}

    def _trainer(self, stage: str, model: nn.Module, loaders: dict, stage_cfg, board, on_epoch_end=None):
        trainer = StageTrainer(stage, model, loaders, stage_cfg, device=self.device, checkpoint_dir=self.ckpt_dir,
                               writer=board, stop=self.stop, ctx=self.ctx, progress=self.cfg.progress,
                               on_epoch_end=on_epoch_end, fingerprint=self.fingerprint())
        resumed = trainer.resume() if self.resume else None
        if resumed:
            self.summary.setdefault("resumed_from", []).append(resumed)
        else:
            _seed(self.cfg.seed, stage)
        return trainer

    def fingerprint(self) -> dict:
        """The settings that determine the results: what a resume must match."""
        return flat_settings(self.summary["config"])

    def _timed(self, stage: str, started: float) -> None:
        self.summary["wall_time_s"][stage] = round(time.perf_counter() - started, 3)

    def write_summary(self) -> None:
        if self.ctx.is_main:
            atomic_write_text(json.dumps(self.summary, indent=2, default=str) + "\n", self.run_dir / "summary.json")

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
        self.summary["pretrain_cache"] = str(cache.path)

        def from_cache() -> str:
            state = cache.load()
            load_model_state(model, state, cache.path, "cached pretrained model")
            for record in state.get("history", []):
                log_epoch(self.boards.fp, record, record["epoch"])
            self.summary["fp_history"] = state.get("history", [])
            return f"cache {cache.path}"

        if self.ctx.agree(cfg.reuse and cache.exists()):
            return from_cache()
        with self.ctx.lock_on_main(cache.lock):  # one job trains it; concurrent jobs wait, then reuse it
            if self.ctx.agree(cfg.reuse and cache.exists()):
                return from_cache()
            trainer = self._trainer("pretrain", model, self._loaders(splits, cfg), cfg, self.boards.fp)
            history = trainer.fit()
            self._load_best(model, trainer)
            if self.ctx.is_main:
                cache.store(model, history)
            self.summary["fp_history"] = history
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
        try:
            report = convert(model, cfg.M, cfg.N, scope=cfg.scope, linear=cfg.linear, keep_first=cfg.keep_first,
                             keep_last=cfg.keep_last, exclude=list(cfg.exclude), impl=cfg.impl, bases=cfg.bases,
                             learn_u=cfg.learn_u, alpha_fit=cfg.alpha_fit, kernel=cfg.kernel)
        except ValueError as error:
            raise ConfigError(f"abc: {error}") from None
        log.info("%s", report)
        errors = {}
        if cfg.calibration.batches > 0:
            batches = [batch for _, batch in zip(range(cfg.calibration.batches), loaders["calib"])]
            errors = calibrate(model, batches, max_samples=cfg.calibration.max_samples,
                               batchnorm=cfg.calibration.batchnorm, seed=self.cfg.seed)
        return {"report": report.to_dict(), "activation_errors": errors}

    # ---- the whole run -------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        validate(cfg)
        self.device = self.ctx.device or resolve_device(cfg.device)
        self.summary["device"] = str(self.device)
        self.boards = Boards(self.run_dir / "tb", enabled=self.ctx.is_main)
        if self.resume and not self.ckpt_dir.is_dir():
            log.warning("resume=true, but %s holds no checkpoints: starting from the beginning", self.run_dir)
        log.info("run dir: %s (device %s%s)", self.run_dir, self.device, ", resuming" if self.resume else "")
        with self.stop:
            t = time.perf_counter()
            try:
                splits = build_datasets(cfg.dataset.name, root=str(Path(cfg.data.root).expanduser().absolute()),
                                        download=cfg.data.download, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
            except ValueError as error:
                raise ConfigError(f"data: {error}") from None
            loaders = self._loaders(splits, cfg.finetune)
            _seed(cfg.seed, "init")
            fp_model = self._build_model(splits)
            self.summary["fp_source"] = self.pretrain(splits, fp_model)
            self.summary["fp"] = self._evaluate(fp_model, loaders)
            self._timed("pretrain", t)
            log.info("FP model (%s): test acc %.2f%%", self.summary["fp_source"], self.summary["fp"]["acc"])
            self.write_summary()

            t = time.perf_counter()
            abc_model = copy.deepcopy(fp_model)
            self.summary["conversion"] = self.convert_and_calibrate(abc_model, loaders)
            self.summary["converted"] = self._evaluate(abc_model, loaders)
            self._timed("convert", t)
            log.info("converted ABC(%d, %s): test acc %.2f%%", cfg.abc.M, cfg.abc.N, self.summary["converted"]["acc"])
            self.boards.log_converted(self.summary["converted"], abc_model)
            self.write_summary()

            t = time.perf_counter()
            self.summary["finetuned"] = self.finetune(abc_model, loaders)
            self._timed("finetune", t)

        example = next(iter(loaders["val"]))[0][:1].to(self.device)
        layer_summary = summary(abc_model, example)
        self.summary["layers"] = [vars(layer) for layer in layer_summary.layers]
        self.summary["size"] = {"fp_kb": layer_summary.fp_kb, "abc_kb": layer_summary.abc_kb,
                                "compression": layer_summary.compression,
                                "binary_mac_share": layer_summary.binary_mac_share,
                                "total_macs": layer_summary.total_macs}
        fp_acc = self.summary["fp"]["acc"]
        self.summary["gaps"] = {stage: fp_acc - self.summary[stage]["acc"] for stage in ("converted", "finetuned")}
        self._timed("total", started)
        self.summary["status"] = "finished"
        self.write_summary()
        self.boards.log_final(self.summary, str(layer_summary))
        log.info("\n%s\n%s", layer_summary, results_table(self.summary))
        return self.summary

    def finetune(self, model: nn.Module, loaders: dict) -> dict:
        cfg = self.cfg.finetune
        if cfg.epochs == 0:
            return dict(self.summary["converted"], best_epoch=0)
        trainer = self._trainer("finetune", model, loaders, cfg, self.boards.abc,
                                on_epoch_end=lambda t: self.boards.log_abc_parameters(model, t.epoch))
        trainer.fit()
        self._load_best(model, trainer)
        last = trainer.history[-1]
        best = max(trainer.history, key=lambda record: record["val_acc"])
        result = self._evaluate(model, loaders, val=Metrics(loss=best["val_loss"], acc=best["val_acc"]))
        result.update(best_epoch=best["epoch"], last_val_acc=last["val_acc"], last_val_loss=last["val_loss"],
                      history=trainer.history)
        return result


def results_table(summary: dict) -> str:
    rows = [f"{'stage':<10} {'val acc':>8} {'test acc':>9} {'test loss':>10} {'gap to FP':>10}"]
    for stage in ("fp", "converted", "finetuned"):
        r = summary[stage]
        gap = "" if stage == "fp" else f"{summary['gaps'][stage]:>10.2f}"
        rows.append(f"{stage:<10} {r['val_acc']:>8.2f} {r['acc']:>9.2f} {r['loss']:>10.4f} {gap}")
    abc = summary["abc"]
    rows.append(f"ABC(M={abc['M']}, N={abc['N']}) on {summary['model']}/{summary['dataset']}: "
                f"{summary['size']['fp_kb']:.1f} kB -> {summary['size']['abc_kb']:.1f} kB; "
                f"summary: {Path(summary['run_dir']) / 'summary.json'}")
    return "\n".join(rows)


def run(cfg: DictConfig) -> float:
    """Run the experiment of ``cfg``; return the fine-tuned validation accuracy (%).

    On failure or interruption ``summary.json`` records the status, the error and every result
    obtained so far, and the exception propagates.
    """
    experiment = Experiment(cfg)
    try:
        result = experiment.run()
    except BaseException as error:
        experiment.summary["status"] = "interrupted" if _is_interrupt(error) else "failed"
        experiment.summary["error"] = f"{type(error).__name__}: {error}"
        experiment.write_summary()
        raise
    finally:
        if experiment.boards is not None:
            experiment.boards.close()
        experiment.ctx.close()
    value = result["finetuned"]["val_acc"]
    return value if math.isfinite(value) else float("nan")


def requeued() -> bool:
    """A SLURM job that was preempted or timed out and requeued (e.g. by submitit) resumes from its
    own last checkpoint in its job dir, without being told."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def _is_interrupt(error: BaseException) -> bool:
    return isinstance(error, (TrainingInterrupted, KeyboardInterrupt))
