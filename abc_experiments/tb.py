"""TensorBoard output laid out for comparing the FP model with its ABC version at a glance.

Runs: ``<run>/tb/fp`` holds the full-precision model's training, ``<run>/tb/abc`` the converted
model and its fine-tuning. In a sweep the FP model is shared through the pretrain cache, so its
curves are written once per pretraining, under ``<sweep>/tb_fp/<model>-<dataset>-<key>`` (the first
job of the sweep that needs that FP model claims the folder), instead of once per job.

x axis: **epochs of training since initialisation**, the same for both stages: FP epochs
1..E, then the ABC run continues at E (the model right after conversion and calibration) and
E+1..E+F (fine-tuning epochs). The FP curve ends where the ABC curve starts, so the drop at
conversion and what fine-tuning wins back read off one card. (With an FP model from
``pretrain.checkpoint`` or pretrained weights, E = 0.)

Tags sort so that the comparison comes first in the Time Series and Scalars dashboards:

* ``1_accuracy/{test,train,val}``: per epoch; ``test`` is one point per evaluated model (FP at E;
  ABC converted at E and fine-tuned at E+F);
* ``2_vs_fp/{gap_to_fp,fp_test_acc}`` (ABC run, at E and E+F): FP minus ABC test accuracy, and
  the FP model's test accuracy itself (for the HParams table);
* ``3_loss/{test,train,val}``; ``4_schedule/{lr,images_per_s}``;
* ``alphas/<layer>/<i>``, ``betas/...``, ``shifts/...`` (ABC run, per epoch);
* ``steps/train_loss``: per optimizer step of the stage (its own x axis: steps within the stage).

The ABC run also holds the per-layer error table as text and the run's hyper-parameters for the
HParams dashboard, whose metrics are the fine-tuned test accuracy, the FP test accuracy, the gap
and the per-epoch tags (their last values).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from .nn import abc_layers
from .results import RunSummary, StageResult
from .settings import format_layer_precision

log = logging.getLogger(__name__)

# Per-epoch tags of every stage, by the key of the epoch record they show.
EPOCH_TAGS = {
    "train_acc": "1_accuracy/train", "val_acc": "1_accuracy/val",
    "train_loss": "3_loss/train", "val_loss": "3_loss/val",
    "lr": "4_schedule/lr", "images_per_s": "4_schedule/images_per_s",
}
TEST_ACC, TEST_LOSS = "1_accuracy/test", "3_loss/test"
FP_TEST_ACC, GAP_TO_FP = "2_vs_fp/fp_test_acc", "2_vs_fp/gap_to_fp"
STEP_LOSS = "steps/train_loss"
# The HParams dashboard's metrics (each run's last value of these tags).
HPARAM_METRICS = (TEST_ACC, FP_TEST_ACC, GAP_TO_FP, EPOCH_TAGS["val_acc"], EPOCH_TAGS["val_loss"],
                  EPOCH_TAGS["train_acc"], EPOCH_TAGS["train_loss"])
SHARED_FP_DIR = "tb_fp"  # the sweep's folder of FP runs, one per pretraining
CLAIM_FILE = "claimed_by"


def log_epoch(writer, record: dict, step: int) -> None:
    """The per-epoch tags shared by every stage (see the module docstring for ``step``)."""
    for key, tag in EPOCH_TAGS.items():
        if key in record:  # older cached histories lack images_per_s
            writer.add_scalar(tag, record[key], step)
    writer.flush()


class _NullWriter:
    """Stands in for a SummaryWriter on ranks that do not write, and for the FP run of a sweep job
    whose FP curves another job writes."""

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


class _EpochOffset:
    """A writer whose per-epoch steps continue after ``offset`` FP epochs (``steps/`` tags keep
    the stage's own optimizer steps)."""

    def __init__(self, writer, offset: int):
        self.writer, self.offset = writer, offset

    def add_scalar(self, tag: str, value, step: int) -> None:
        self.writer.add_scalar(tag, value, step if tag.startswith("steps/") else step + self.offset)

    def __getattr__(self, name):
        return getattr(self.writer, name)


def claim_shared_fp_dir(root: Path, name: str, run_dir: Path) -> Path | None:
    """``root/name`` if this run may write the FP curves there: the first run to ask creates it
    (atomic mkdir), the same run asking again (a resume) gets it back; any other gets None."""
    folder = root / name
    root.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        claimant = folder / CLAIM_FILE
        owner = claimant.read_text().strip() if claimant.is_file() else None
        return folder if owner == str(run_dir) else None
    (folder / CLAIM_FILE).write_text(f"{run_dir}\n")
    return folder


class Boards:
    """The FP and ABC writers of one run.

    Arguments:
        root: the run's ``tb`` folder.
        enabled: False on ranks that do not write.
        shared_fp_root: in a sweep, the sweep's :data:`SHARED_FP_DIR`; the FP run then goes there,
            once per pretraining (see :meth:`open_fp`). None: ``root/fp``.
    """

    def __init__(self, root: Path, enabled: bool = True, shared_fp_root: Path | None = None):
        self.root, self.enabled, self.shared_fp_root = Path(root), enabled, shared_fp_root
        self.fp = _NullWriter()
        self._abc = SummaryWriter(str(self.root / "abc")) if enabled else _NullWriter()
        self.abc = _EpochOffset(self._abc, 0)
        self.fp_dir: Path | None = None  # where this run's FP curves are (also when another job writes them)

    def open_fp(self, name: str | None, run_dir: Path) -> None:
        """Open the FP writer; ``name`` identifies the pretraining (``<model>-<dataset>-<key>``,
        None when there is no cached pretraining to share)."""
        if not self.enabled:
            return
        if self.shared_fp_root is None or name is None:
            self.fp_dir = self.root / "fp"
            self.fp = SummaryWriter(str(self.fp_dir))
            return
        self.fp_dir = self.shared_fp_root / name
        claimed = claim_shared_fp_dir(self.shared_fp_root, name, Path(run_dir))
        if claimed is None:
            log.info("TensorBoard: this pretraining's FP curves are written once per sweep, in %s", self.fp_dir)
            return
        self.fp = SummaryWriter(str(claimed))

    def start_abc(self, fp_epochs: int) -> None:
        """The ABC run's epochs continue after the FP model's ``fp_epochs`` training epochs."""
        self.abc = _EpochOffset(self._abc, fp_epochs)

    def log_fp_test(self, result: StageResult, fp_epochs: int) -> None:
        self.fp.add_scalar(TEST_ACC, result.acc, fp_epochs)
        self.fp.add_scalar(TEST_LOSS, result.loss, fp_epochs)
        self.fp.flush()

    def log_test(self, result: StageResult, fp: StageResult, epoch: int) -> None:
        """A test evaluation of the ABC model at its ``epoch`` (0: converted), beside the FP one."""
        self.abc.add_scalar(TEST_ACC, result.acc, epoch)
        self.abc.add_scalar(TEST_LOSS, result.loss, epoch)
        self.abc.add_scalar(FP_TEST_ACC, fp.acc, epoch)
        self.abc.add_scalar(GAP_TO_FP, fp.acc - result.acc, epoch)
        self.abc.flush()

    def log_converted(self, result: StageResult, fp: StageResult, model) -> None:
        """Epoch 0 of the ABC curves: the model right after conversion and calibration."""
        self.abc.add_scalar(EPOCH_TAGS["val_acc"], result.val_acc, 0)
        self.abc.add_scalar(EPOCH_TAGS["val_loss"], result.val_loss, 0)
        self.log_test(result, fp, 0)
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

    def log_final(self, summary: RunSummary, layer_table: str, finetune_epochs: int) -> None:
        """The fine-tuned model's test result at the last epoch, the layer table as text, and the
        run's settings for the HParams dashboard, whose metrics point at tags already written."""
        if summary.finetuned is not None and summary.fp is not None and finetune_epochs > 0:
            self.log_test(summary.finetuned, summary.fp, finetune_epochs)
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
            "precise_bn": cfg["finetune"].get("precise_bn", 0),
            # Per-layer precision: abc.layers as one string ("" = uniform), and the averages over
            # the converted layers (M per binary weight, N per MAC; the global values when uniform).
            "layers": format_layer_precision(summary.abc.layers),
            "mean_M": _mean(summary, "mean_M", summary.abc.M),
            "mean_N": _mean(summary, "mean_N", summary.abc.N),
        }
        metrics = dict.fromkeys(HPARAM_METRICS, 0.0)  # the values come from the tags themselves
        writer = self._abc._get_file_writer() if hasattr(self._abc, "_get_file_writer") else None
        if writer is not None:
            for event in hparams_summary(hparams, metrics):
                writer.add_summary(event)
        self.abc.flush()

    def close(self) -> None:
        self.fp.close()
        self._abc.close()


def _mean(summary: RunSummary, key: str, default) -> float:
    value = getattr(summary.size, key, None) if summary.size is not None else None
    return float(default if value is None else value)


def shared_fp_root(sweep_dir: str | os.PathLike) -> Path:
    """The folder of a sweep's shared FP runs."""
    return Path(sweep_dir).absolute() / SHARED_FP_DIR
