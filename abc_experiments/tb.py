"""TensorBoard output: one event dir per stage with the same tags, so curves overlay.

``tb/fp`` holds the full-precision baseline, ``tb/abc`` the converted model (epoch 0: right after
conversion and calibration) and its fine-tuning. Both use ``train/loss``, ``train/acc``,
``val/loss``, ``val/acc``, ``lr`` and ``train/images_per_s`` with the epoch as step. ``tb/abc``
also holds one scalar per alpha, beta and shift of every layer (``alphas/conv2/0``...), the
per-layer error table as text, and the run's hyper-parameters for the HParams dashboard, whose
metrics are the per-epoch tags (so Scalars shows no single-point charts).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from .nn import abc_layers
from .results import RunSummary, StageResult
from .settings import format_layer_precision

# Per-epoch tags the HParams dashboard shows as each run's metrics (their last value).
HPARAM_METRICS = ("val/acc", "val/loss", "train/acc", "train/loss")


class _NullWriter:
    """Stands in for a SummaryWriter on ranks that do not write."""

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


class Boards:
    def __init__(self, root: Path, enabled: bool = True):
        make = (lambda name: SummaryWriter(str(root / name))) if enabled else (lambda name: _NullWriter())
        self.fp, self.abc = make("fp"), make("abc")

    def log_converted(self, result: StageResult, model) -> None:
        """Epoch 0 of the ABC curves: the model right after conversion and calibration."""
        self.abc.add_scalar("val/acc", result.val_acc, 0)
        self.abc.add_scalar("val/loss", result.val_loss, 0)
        self.log_abc_parameters(model, 0)

    def log_abc_parameters(self, model, step: int) -> None:
        """One scalar per alpha, beta and shift (``alphas/conv2/0``...), so each one's path over the
        epochs shows; per-channel alphas are logged as their mean over the output channels."""
        for name, layer in abc_layers(model):
            alphas = layer.weight_binarizer.alphas.detach()
            values = {"alphas": alphas if alphas.dim() == 1 else alphas.mean(dim=1)}
            if layer.N > 0:
                values["betas"] = layer.activation_binarizer.betas.detach()
                values["shifts"] = layer.activation_binarizer.shifts.detach()
            for kind, tensor in values.items():
                for index, value in enumerate(tensor.float().cpu().tolist()):
                    self.abc.add_scalar(f"{kind}/{name}/{index}", value, step)
        self.abc.flush()

    def log_final(self, summary: RunSummary, layer_table: str) -> None:
        """The layer table as text, and the run's settings for the HParams dashboard, whose metrics
        point at the per-epoch tags already written (no single-point charts in Scalars)."""
        self.abc.add_text("abc/layers", "<pre>" + layer_table + "</pre>", 0)
        cfg = summary.config
        hparams = {
            "M": summary.abc.M, "N": summary.abc.N, "scope": summary.abc.scope,
            "dataset": summary.dataset, "model": summary.model, "seed": summary.seed,
            "precision": summary.precision,
            "pretrain_lr": cfg["pretrain"]["lr"], "finetune_lr": cfg["finetune"]["lr"],
            "finetune_epochs": cfg["finetune"]["epochs"], "calibration_batches": cfg["abc"]["calibration"]["batches"],
            "distill_weight": cfg["finetune"].get("distill", {}).get("weight", 0.0),
            "distill_temperature": cfg["finetune"].get("distill", {}).get("temperature", 0.0),
            # Per-layer precision: abc.layers as one string ("" = uniform), and the averages over
            # the converted layers (M per binary weight, N per MAC; the global values when uniform).
            "layers": format_layer_precision(summary.abc.layers),
            "mean_M": _mean(summary, "mean_M", summary.abc.M),
            "mean_N": _mean(summary, "mean_N", summary.abc.N),
        }
        metrics = dict.fromkeys(HPARAM_METRICS, 0.0)  # the values come from the tags themselves
        writer = self.abc._get_file_writer() if hasattr(self.abc, "_get_file_writer") else None
        if writer is not None:
            for event in hparams_summary(hparams, metrics):
                writer.add_summary(event)
        self.abc.flush()

    def close(self) -> None:
        self.fp.close()
        self.abc.close()


def _mean(summary: RunSummary, key: str, default) -> float:
    value = getattr(summary.size, key, None) if summary.size is not None else None
    return float(default if value is None else value)
