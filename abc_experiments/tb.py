"""TensorBoard output: one event dir per stage with the same tags, so curves overlay.

``tb/fp`` holds the full-precision baseline, ``tb/abc`` the converted model (epoch 0: right after
conversion and calibration) and its fine-tuning. Both use ``train/loss``, ``train/acc``,
``val/loss``, ``val/acc`` and ``lr`` with the epoch as step. ``tb/abc`` also holds histograms of
every layer's alphas, betas and shifts, the per-layer error table as text, and the run's
hyper-parameters with its final metrics for the HParams dashboard.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from .nn import abc_layers


class _NullWriter:
    """Stands in for a SummaryWriter on ranks that do not write."""

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


class Boards:
    def __init__(self, root: Path, enabled: bool = True):
        make = (lambda name: SummaryWriter(str(root / name))) if enabled else (lambda name: _NullWriter())
        self.fp, self.abc = make("fp"), make("abc")

    def log_converted(self, metrics: dict, model) -> None:
        """Epoch 0 of the ABC curves: the model right after conversion and calibration."""
        self.abc.add_scalar("val/acc", metrics["val_acc"], 0)
        self.abc.add_scalar("val/loss", metrics["val_loss"], 0)
        self.log_abc_parameters(model, 0)

    def log_abc_parameters(self, model, step: int) -> None:
        for name, layer in abc_layers(model):
            self.abc.add_histogram(f"alphas/{name}", layer.weight_binarizer.alphas, step)
            if layer.N > 0:
                self.abc.add_histogram(f"betas/{name}", layer.activation_binarizer.betas.detach(), step)
                self.abc.add_histogram(f"shifts/{name}", layer.activation_binarizer.shifts.detach(), step)
        self.abc.flush()

    def log_final(self, summary: dict, layer_table: str) -> None:
        self.abc.add_text("abc/layers", "<pre>" + layer_table + "</pre>", 0)
        cfg = summary["config"]
        hparams = {
            "M": summary["abc"]["M"], "N": summary["abc"]["N"], "scope": summary["abc"]["scope"],
            "dataset": summary["dataset"], "model": summary["model"], "seed": summary["seed"],
            "pretrain_lr": cfg["pretrain"]["lr"], "finetune_lr": cfg["finetune"]["lr"],
            "finetune_epochs": cfg["finetune"]["epochs"], "calibration_batches": cfg["abc"]["calibration"]["batches"],
        }
        metrics = {f"hparam/{stage}_acc": summary[stage]["acc"] for stage in ("fp", "converted", "finetuned")}
        metrics["hparam/gap_finetuned"] = summary["gaps"]["finetuned"]
        metrics["hparam/compression"] = summary["size"]["compression"]
        self.abc.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        self.fp.close()
        self.abc.close()
