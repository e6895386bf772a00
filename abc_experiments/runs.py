"""Reopen a finished run: :func:`load_run` rebuilds its fine-tuned ABC model from the run dir alone
(its ``summary.json`` and checkpoint), and ``abc-eval RUN_DIR`` evaluates it again.

    model = abc_experiments.load_run("outputs/runs/<run>")        # eval mode, on the CPU
    abc-eval outputs/runs/<run>                                   # the run's own test split
    abc-eval outputs/runs/<run> data.root=../shared/datasets      # the same dataset elsewhere
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from .checkpoints import FINAL_CHECKPOINT, CheckpointError, load_checkpoint
from .data import DatasetUnavailableError, build_datasets, build_loaders
from .models import build_model
from .nn import abc_layers
from .results import FINISHED, SUMMARY_FILE, RunSummary

PROG = "abc-eval"
CHECKPOINTS = {"best": FINAL_CHECKPOINT, "last": "finetune_last.pt"}


class RunError(ValueError):
    """A run dir that cannot be reopened: missing, unfinished or corrupt; the message says which."""


def read_run(run_dir: str | Path) -> RunSummary:
    """The summary of a finished run in ``run_dir``; :class:`RunError` otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a directory: give the run dir of a finished abc-run "
                       "(outputs/runs/<run>, or a job dir of a sweep)")
    path = run_dir / SUMMARY_FILE
    try:
        summary = RunSummary.read(path)
    except FileNotFoundError:
        raise RunError(f"{run_dir} holds no {SUMMARY_FILE}: it is not an abc-run run dir, or the run never "
                       "started") from None
    except (OSError, ValueError, TypeError) as error:
        raise RunError(f"{path} is corrupt ({type(error).__name__}: {error}): the run cannot be reopened") from None
    status = summary.effective_status()
    if status != FINISHED:
        hint = "resume it with resume=true first" if status in ("interrupted", "running") else "see its error"
        error = f": {summary.error}" if summary.error else ""
        raise RunError(f"the run in {run_dir} is {status}, not finished ({hint}{error})")
    if not summary.config or summary.input_shape is None or summary.num_classes is None:
        raise RunError(f"{path} lacks the config or the input shape (written by an older abc-run): "
                       "run the experiment again to reopen it")
    return summary


def _add_calibration_biases(model: nn.Module, state: dict) -> None:
    """Calibration gives an ABC layer without a bias one (it folds the input offset there): make
    room for it before loading the state."""
    for name, layer in abc_layers(model):
        if layer.bias is None and f"{name}.bias" in state:
            layer.add_calibration_bias()


def model_from_summary(summary: RunSummary) -> nn.Module:
    """The run's architecture, converted to ABC layers as the run converted it (untrained)."""
    from .pipeline import convert_from_config  # the same conversion as the run's

    config = summary.config
    channels, size, _ = summary.input_shape
    model = build_model(summary.model, channels, size, summary.num_classes, **config["model"].get("options", {}))
    convert_from_config(model, config["abc"])
    return model.eval()  # before loading: eval() fits alphas, which the state then overwrites


def load_run(run_dir: str | Path, which: str = "best", map_location: str | torch.device = "cpu") -> nn.Module:
    """The fine-tuned ABC model of the finished run in ``run_dir``, in eval mode.

    ``which="best"`` is the model the run's ``finetuned`` results were measured on (the epoch of
    best validation accuracy); ``"last"`` the last fine-tuning epoch. Raises :class:`RunError` for
    a missing, unfinished or corrupt run (and a checkpoint that does not fit).
    """
    if which not in CHECKPOINTS:
        raise ValueError(f"which={which!r}: choose one of {', '.join(CHECKPOINTS)}")
    run_dir = Path(run_dir)
    summary = read_run(run_dir)
    path = run_dir / "checkpoints" / CHECKPOINTS[which]
    try:
        state = load_checkpoint(path, f"{which} checkpoint")["model"]
    except (CheckpointError, KeyError) as error:
        raise RunError(f"{run_dir}: {error}") from None
    model = model_from_summary(summary)
    _add_calibration_biases(model, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RunError(f"{path} does not fit the model its summary describes ({str(error).splitlines()[0]})") from None
    return model.to(map_location).eval()


def test_loader(summary: RunSummary, overrides: Sequence[str] = (), device: str = "cpu"):
    """(loader of the test split, config) for a run: its own dataset and split, or the one that
    ``overrides`` (``data.root=...``, ``dataset.name=...``) describe."""
    config = OmegaConf.create(summary.config)
    try:
        config.merge_with_dotlist(list(overrides))
    except Exception as error:  # omegaconf's errors for a malformed or unknown key
        raise RunError(f"bad override ({error})") from None
    verify = config.data.get("verify", True)  # runs from before data.verify read only the official files
    if not isinstance(verify, bool):
        raise RunError(f"data.verify={verify} is not a boolean: give data.verify=true or data.verify=false")
    splits = build_datasets(str(config.dataset.name), root=str(Path(config.data.root).expanduser()),
                            download=config.data.download, val_fraction=config.data.val_fraction, seed=config.seed,
                            verify=verify)
    if [splits.in_channels, splits.image_size, splits.image_size] != summary.input_shape:
        raise RunError(f"dataset {config.dataset.name} has {splits.in_channels}x{splits.image_size}x"
                       f"{splits.image_size} images; the model takes {'x'.join(map(str, summary.input_shape))}")
    loader = build_loaders(splits, batch_size=1, eval_batch_size=config.finetune.eval_batch_size,
                           num_workers=config.data.num_workers, device=device, seed=config.seed)["test"]
    return loader, config


def evaluate_model(model: nn.Module, loader, device: str = "cpu", precision: str = "32",
                   channels_last: bool = False) -> dict:
    """Accuracy (%), loss, image count and images/s of ``model`` over ``loader``."""
    from .training import evaluate  # torch-heavy imports only when evaluating

    started = time.perf_counter()
    metrics = evaluate(model, loader, torch.device(device), precision, channels_last)
    seconds = time.perf_counter() - started
    return {"acc": metrics.acc, "loss": metrics.loss, "images": metrics.count,
            "images_per_s": metrics.count / max(seconds, 1e-9)}


def evaluate_run(run_dir: str | Path, overrides: Sequence[str] = (), which: str = "best",
                 device: str = "cpu") -> dict:
    """Accuracy (%), loss and images/s of a run's model on its own test split, or on the dataset
    that ``overrides`` describe; also the accuracy the run itself reported."""
    summary = read_run(run_dir)
    loader, config = test_loader(summary, overrides, device)
    model = load_run(run_dir, which, device)
    result = evaluate_model(model, loader, device, str(config.get("precision", "32")),
                            bool(config.get("channels_last", False)))
    return {**result, "run_finetuned_acc": summary.finetuned.acc}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Evaluate a finished abc-run's fine-tuned ABC model on its test split "
                               "(or on the dataset the overrides describe).")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dataset overrides, e.g. data.root=../shared/datasets")
    parser.add_argument("--which", choices=tuple(CHECKPOINTS), default="best")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(args.run_dir, args.overrides, args.which, args.device)
    except (RunError, DatasetUnavailableError, ValueError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    same = "" if args.overrides else f" (the run reported {result['run_finetuned_acc']:.2f})"
    print(f"test accuracy {result['acc']:.2f}%{same}, loss {result['loss']:.4f}, "
          f"{result['images']} images, {result['images_per_s']:.0f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
