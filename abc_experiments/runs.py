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
from typing import TYPE_CHECKING, Any

from .results import FINAL_CHECKPOINT, FINISHED, SUMMARY_FILE, RunSummary
from .settings import unknown_key_message

if TYPE_CHECKING:  # torch is imported only once the arguments are checked: a refusal is instant
    import torch
    from torch import nn

PROG = "abc-eval"
CHECKPOINTS = {"best": FINAL_CHECKPOINT, "last": "finetune_last.pt"}
# The settings an evaluation can change: which data it reads and how it computes; every other key
# (abc.*, model.*, training settings) describes the trained model and is fixed by the run. Keys
# under ``data.`` that the run's own config holds are accepted as well.
EVAL_KEYS = ("dataset.name", "data.root", "data.download", "data.val_fraction", "data.num_workers", "data.verify",
             "finetune.eval_batch_size", "precision", "channels_last")


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
    _check_abc_setting(path, summary)
    return summary


def _check_abc_setting(path: Path, summary: RunSummary) -> None:
    """The M and N that rebuild the model (the run's ``config.abc``) and the ones it reports
    (``abc``) must be integers in range: an edited summary gets a message, not a traceback."""
    config_abc = summary.config.get("abc") if isinstance(summary.config.get("abc"), dict) else {}
    checks = (("config.abc.M", config_abc.get("M"), 1, False), ("config.abc.N", config_abc.get("N"), 0, True),
              ("abc.M", summary.abc.M, 1, False), ("abc.N", summary.abc.N, 0, True))
    for key, value, minimum, may_be_null in checks:
        if value is None and may_be_null:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise RunError(f"{path}: {key} is {value!r}, not an integer ≥ {minimum}: the summary was edited or is "
                           "corrupt, so the run cannot be reopened (restore its summary.json or run it again)")


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def eval_keys(summary: RunSummary) -> list[str]:
    """The keys ``abc-eval`` accepts for this run: :data:`EVAL_KEYS` and the ``data.*`` keys of the
    run's config."""
    data = summary.config.get("data") if isinstance(summary.config.get("data"), dict) else {}
    return list(dict.fromkeys([*EVAL_KEYS, *(f"data.{key}" for key in data)]))


_MINIMUMS = {"finetune.eval_batch_size": 1, "data.num_workers": 0}


# keys added after some runs were made: what those runs used, so an override is checked against its type
DEFAULTS_OF_OLD_RUNS = {"data.verify": True}


def _checked_value(key: str, value: Any, like: Any) -> Any:
    """``value`` if it has the type of the run's value ``like`` (and is in range), else RunError."""
    if isinstance(like, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(like, int) or key in _MINIMUMS:
        whole = isinstance(value, int) and not isinstance(value, bool)
        ok, kind = whole or (value is None and like is None), "an integer"
    elif isinstance(like, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, kind, value = value is not None, "a value", value if value is None else str(value)
    if not ok:
        raise RunError(f"{key}={value!r} is not {kind}")
    if key in _MINIMUMS and value is not None and value < _MINIMUMS[key]:
        raise RunError(f"{key}={value} is out of range: it must be ≥ {_MINIMUMS[key]}")
    if key == "data.val_fraction" and not 0 < value < 1:
        raise RunError(f"{key}={value} is out of range: it must be in (0, 1)")
    return value


def check_overrides(summary: RunSummary, overrides: Sequence[str]) -> dict[str, Any]:
    """The ``KEY=VALUE`` overrides of an evaluation, checked without importing torch.

    Args:
        summary: the run's summary (:func:`read_run`).
        overrides: e.g. ``["data.root=../shared/datasets", "finetune.eval_batch_size=512"]``.

    Returns:
        ``{key: value}`` with each value parsed as YAML (as Hydra parses it) and of the run's type.

    Raises:
        RunError: a malformed override, a key abc-eval does not accept (naming the closest one
            that it does, or saying that the key describes the trained model), or a value of the
            wrong type or out of range.
    """
    from omegaconf import OmegaConf  # light: no torch

    accepted = eval_keys(summary)
    run_settings = _flat(summary.config)
    values: dict[str, Any] = {}
    for override in overrides:
        key, equals, text = override.partition("=")
        if not equals or not key or key[0] in "+~":
            raise RunError(f"{override!r} is not KEY=VALUE (e.g. data.root=../shared/datasets)")
        if key not in accepted:
            if key in run_settings:
                raise RunError(f"{key} describes how the model was trained, which abc-eval cannot change: "
                               f"it accepts {', '.join(accepted)}")
            raise RunError(f"{unknown_key_message(key, accepted, 'a key abc-eval accepts')}; "
                           f"it accepts {', '.join(accepted)}")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
        except Exception as error:  # omegaconf's grammar errors
            raise RunError(f"{override!r} does not parse ({str(error).splitlines()[0]})") from None
        values[key] = _checked_value(key, value, run_settings.get(key, DEFAULTS_OF_OLD_RUNS.get(key)))
    return values


def _add_calibration_biases(model: nn.Module, state: dict) -> None:
    """Calibration gives an ABC layer without a bias one (it folds the input offset there): make
    room for it before loading the state."""

    from .nn import abc_layers

    for name, layer in abc_layers(model):
        if layer.bias is None and f"{name}.bias" in state:
            layer.add_calibration_bias()


def model_from_summary(summary: RunSummary) -> nn.Module:
    """The run's architecture, converted to ABC layers as the run converted it (untrained)."""
    from .models import build_model
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
    from .checkpoints import CheckpointError, load_checkpoint

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
    ``overrides`` (``data.root=...``, ``dataset.name=...``; checked by :func:`check_overrides`)
    describe."""
    from omegaconf import OmegaConf

    from .data import build_datasets, build_loaders
    from .training import PRECISIONS

    config = OmegaConf.create(summary.config)
    for key, value in check_overrides(summary, overrides).items():
        OmegaConf.update(config, key, value, force_add=True)
    if str(config.get("precision", "32")) not in PRECISIONS:
        raise RunError(f"precision={config.precision} is not a precision: use one of {', '.join(PRECISIONS)}")
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
    import torch

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
                        help=f"what the evaluation may change: {', '.join(EVAL_KEYS)} "
                             "(e.g. data.root=../shared/datasets)")
    parser.add_argument("--which", choices=tuple(CHECKPOINTS), default="best")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:K, mps or auto")
    args = parser.parse_args(argv)
    from .devices import DeviceUnavailableError, check_device_name, resolve_device  # light: torch comes later

    try:  # every check that needs no torch first: a wrong argument is refused at once
        check_overrides(read_run(args.run_dir), args.overrides)
        check_device_name(args.device, "--device ")
    except (RunError, DeviceUnavailableError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    from .checkpoints import CheckpointError
    from .data import DatasetUnavailableError

    try:
        device = str(resolve_device(args.device, "--device "))
        result = evaluate_run(args.run_dir, args.overrides, args.which, device)
    except (RunError, DeviceUnavailableError, DatasetUnavailableError, CheckpointError, ValueError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    same = "" if args.overrides else f" (the run reported {result['run_finetuned_acc']:.2f})"
    print(f"test accuracy {result['acc']:.2f}%{same}, loss {result['loss']:.4f}, "
          f"{result['images']} images, {result['images_per_s']:.0f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
