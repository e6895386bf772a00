"""The typed record of one ``abc-run``: what ``summary.json`` holds, in dataclasses.

The pipeline fills a :class:`RunSummary`; TensorBoard logging, ``abc-report``, ``load_run`` and
``abc-export`` read it back with :meth:`RunSummary.read`. No torch or Hydra import, so readers of
results stay light. Unknown keys in an older file are ignored and missing ones take defaults, so a
summary written by an interrupted or older run still reads.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
# The fine-tuned ABC model of a finished run (under checkpoints/): the one its finetuned results were measured on.
FINAL_CHECKPOINT = "finetuned.pt"

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
STAGES = ("fp", "converted", "finetuned")


def _from_mapping(cls, data: Any):
    """``cls(**data)`` keeping only the dataclass's own fields (None for a non-mapping)."""
    if not isinstance(data, dict):
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class StageResult:
    """A model's accuracy (%) and loss on the test split, and on the validation split.

    ``test_size`` / ``val_size`` are the image counts the accuracies rest on (their binomial
    standard error is √(p(1−p)/n)). Fine-tuning adds the epoch chosen on validation accuracy, the
    last epoch's validation figures and the per-epoch history.
    """

    acc: float
    loss: float
    val_acc: float
    val_loss: float
    test_size: int | None = None
    val_size: int | None = None
    best_epoch: int | None = None
    last_val_acc: float | None = None
    last_val_loss: float | None = None
    history: list[dict] = field(default_factory=list)

    def standard_error(self) -> float | None:
        """Binomial standard error of ``acc`` in percentage points, from ``test_size``."""
        if not self.test_size:
            return None
        p = min(max(self.acc / 100.0, 0.0), 1.0)
        return 100.0 * (p * (1 - p) / self.test_size) ** 0.5


@dataclass
class ABCSetting:
    M: int
    N: int  # 0: full-precision activations (weight-only ABC)
    scope: str = "per_layer"
    # abc.layers: module-name pattern -> {M, N} overriding M and N (only the keys set); each
    # converted layer's own M and N are in RunSummary.layers and conversion["layer_precision"].
    layers: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class SizeSummary:
    """Model size and compute, filled from ``abc_experiments.nn.ModelSummary``."""

    fp_kb: float
    abc_kb: float
    compression: float
    total_macs: int | None = None
    binary_mac_share: float | None = None
    mean_M: float | None = None  # weight bases per binary weight, over the converted layers
    mean_N: float | None = None  # activation bases per MAC of the converted layers (needs MACs)
    binary_macs: int | None = None  # Σ M·N·MACs per example: the binary operations


@dataclass
class RunSummary:
    """Everything one run reports; written to ``<run_dir>/summary.json`` after every stage."""

    dataset: str
    model: str
    seed: int
    abc: ABCSetting
    run_dir: str
    status: str = RUNNING
    experiment: str | None = None
    world_size: int = 1
    device: str | None = None
    precision: str = "32"
    config: dict = field(default_factory=dict)  # the resolved config
    input_shape: list[int] | None = None  # (channels, height, width) of one image
    num_classes: int | None = None
    fp_source: str | None = None  # "trained", "cache <path>", "checkpoint <path>", ...
    pretrain_cache: str | None = None
    fp_history: list[dict] = field(default_factory=list)
    fp: StageResult | None = None
    converted: StageResult | None = None
    finetuned: StageResult | None = None
    conversion: dict | None = None  # converted/kept layers and calibration errors
    layers: list[dict] = field(default_factory=list)  # per-layer ModelSummary rows
    size: SizeSummary | None = None
    gaps: dict[str, float] = field(default_factory=dict)  # FP test acc minus the stage's
    wall_time_s: dict[str, float] = field(default_factory=dict)  # per stage, and "total"
    images_per_s: dict[str, float] = field(default_factory=dict)  # training throughput per stage
    resumed_from: list[dict] = field(default_factory=list)
    error: str | None = None
    pid: int | None = None  # the process writing a running summary (see effective_status)
    host: str | None = None

    # ---- filling ------------------------------------------------------------------------------
    def set_stage(self, stage: str, result: StageResult) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
        setattr(self, stage, result)
        if stage != "fp" and self.fp is not None:
            self.gaps[stage] = self.fp.acc - result.acc

    def set_model_summary(self, summary: dict) -> None:
        """The ``{"layers": [...], "size": {...}}`` of ``ModelSummary.to_dict()``."""
        self.layers = list(summary["layers"])
        self.size = SizeSummary(**summary["size"])

    @contextmanager
    def timed(self, stage: str):
        """Record the wall time of the ``with`` block under ``wall_time_s[stage]`` (also on error)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.wall_time_s[stage] = round(time.perf_counter() - started, 3)

    def mark_running(self) -> None:
        self.status, self.error = RUNNING, None
        self.pid, self.host = os.getpid(), socket.gethostname()

    def stage(self, stage: str) -> StageResult | None:
        return getattr(self, stage)

    # ---- reading and writing ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunSummary:
        if not isinstance(data, dict):
            raise ValueError(f"a run summary is a JSON object, not {type(data).__name__}")
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        abc = data.get("abc") if isinstance(data.get("abc"), dict) else {}
        values["abc"] = ABCSetting(M=abc.get("M"), N=abc.get("N") or 0, scope=abc.get("scope", "per_layer"),
                                   layers=dict(abc["layers"]) if isinstance(abc.get("layers"), dict) else {})
        for stage in STAGES:
            values[stage] = _from_mapping(StageResult, data.get(stage))
        values["size"] = _from_mapping(SizeSummary, data.get("size"))
        for key in ("dataset", "model", "seed", "run_dir"):
            values.setdefault(key, None)
        return cls(**values)

    def write(self, path: Path) -> None:
        """Atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        """Raises ``OSError`` (unreadable), ``ValueError`` (not JSON, or not a summary)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def effective_status(self) -> str:
        """``status``, except that a ``running`` summary whose process is gone (killed, e.g. by
        SIGKILL or a crashed node) is ``interrupted``. A process on another host is assumed alive."""
        if self.status != RUNNING or self.pid is None or self.host != socket.gethostname():
            return self.status
        return RUNNING if _process_alive(self.pid) else INTERRUPTED


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
