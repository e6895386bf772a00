"""Finding the jobs of a sweep and reading each one's ``summary.json`` as a typed RunSummary.

A job is a directory holding a ``summary.json`` or a Hydra ``.hydra/config.yaml``. Its identity
(dataset, model, M, N, seed) comes from the summary, else from the config embedded in it, else from
``.hydra/config.yaml``, so a job that died before writing a summary is still listed. ``N = 0`` and
``N = null`` are the same configuration (full-precision activations) and both read as ``0``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from ..results import FINISHED, INTERRUPTED, RUNNING, STAGES, SUMMARY_FILE, RunSummary, StageResult
from ..settings import RUN_ONLY_KEYS, flat_settings

HYDRA_CONFIG = Path(".hydra") / "config.yaml"
SKIPPED_DIRS = frozenset({".hydra", "tb", "checkpoints"})
SKIPPED_TOP_LEVEL_DIRS = frozenset({"cache", "tb_fp"})  # tb_fp: abc_experiments.tb.SHARED_FP_DIR (no torch import here)

UNFINISHED = "unfinished"
UNREADABLE = "unreadable"
UNKNOWN_STATUS = "unknown"
UNFINISHED_REASON = "no summary.json (crashed, killed or still running)"
MAX_ERROR_CHARS = 200

IDENTITY_KEYS = ("dataset", "model", "M", "N", "seed")
# Keys that say where or how a job ran, or that every row shows anyway: never part of a variant.
NOT_VARIANT_KEYS = RUN_ONLY_KEYS | {"seed", "dataset.name", "model.name", "abc.M", "abc.N"}
_STAGE_REQUIRED = ("acc", "loss", "val_acc", "val_loss")

__all__ = [
    "FINISHED", "HYDRA_CONFIG", "INTERRUPTED", "RUNNING", "SUMMARY_FILE", "UNFINISHED", "UNKNOWN_STATUS",
    "UNREADABLE", "Job", "collect_jobs", "find_job_dirs", "label_variants", "load_job", "load_jobs",
]


@dataclass(frozen=True)
class Job:
    """One job directory and what could be read from it.

    ``status`` is the summary's *effective* status: a ``running`` summary whose process is gone
    reads as ``interrupted``. ``summary`` is None when there is no readable summary.json.
    """

    rel_dir: str
    status: str
    dataset: str | None
    model: str | None
    M: int | None
    N: int | None  # 0 means full-precision activations (also for N = null)
    seed: int | None
    summary: RunSummary | None = None
    error: str | None = None
    variant: str = ""  # the settings, besides dataset/model/M/N/seed, that vary across the sweep

    @property
    def config_key(self) -> tuple:
        return (self.dataset, self.model, self.M, self.N, self.variant)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED and self.summary is not None

    def stage(self, stage: str) -> StageResult | None:
        return None if self.summary is None else self.summary.stage(stage)

    def settings(self) -> dict:
        """The job's resolved config, flattened, without the keys that cannot define a variant."""
        config = self.summary.config if self.summary is not None else None
        return flat_settings(config if isinstance(config, Mapping) else {}, NOT_VARIANT_KEYS)


def find_job_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding a summary.json or a Hydra config."""
    root = Path(root)
    job_dirs = []
    for dirpath, dirnames, filenames in os.walk(root):
        skipped = SKIPPED_DIRS | (SKIPPED_TOP_LEVEL_DIRS if Path(dirpath) == root else set())
        dirnames[:] = sorted(d for d in dirnames if d not in skipped)
        job_dir = Path(dirpath)
        if SUMMARY_FILE in filenames or (job_dir / HYDRA_CONFIG).is_file():
            job_dirs.append(job_dir)
    return job_dirs


def _optional_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _name(value) -> str | None:
    """A dataset/model name given either as a string or as a config group with a ``name``."""
    if isinstance(value, Mapping):
        value = value.get("name")
    return None if value is None else str(value)


def _config_identity(config: Mapping) -> dict:
    """dataset/model/M/N/seed from a config (missing entries are None; N = null reads as 0)."""
    abc = config.get("abc")
    has_abc = isinstance(abc, Mapping)
    return {
        "dataset": _name(config.get("dataset")),
        "model": _name(config.get("model")),
        "M": _optional_int(abc.get("M")) if has_abc else None,
        "N": (_optional_int(abc.get("N")) or 0) if has_abc else None,
        "seed": _optional_int(config.get("seed")),
    }


def _summary_identity(summary: RunSummary) -> dict:
    known_abc = summary.abc is not None and _optional_int(summary.abc.M) is not None
    return {
        "dataset": _name(summary.dataset),
        "model": _name(summary.model),
        "M": _optional_int(summary.abc.M) if known_abc else None,
        "N": (_optional_int(summary.abc.N) or 0) if known_abc else None,
        "seed": _optional_int(summary.seed),
    }


def _merge(identities: Iterable[dict]) -> dict:
    """First non-None value of each identity key."""
    merged = dict.fromkeys(IDENTITY_KEYS)
    for identity in identities:
        for key, value in identity.items():
            if merged[key] is None:
                merged[key] = value
    return merged


def _read_hydra_config(job_dir: Path) -> Mapping:
    """The job's ``.hydra/config.yaml`` as a mapping ({} when missing or unreadable)."""
    try:
        config = yaml.safe_load((job_dir / HYDRA_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return config if isinstance(config, Mapping) else {}


def _tolerant(data: dict) -> dict:
    """An older or partial summary made readable: stage records missing a required figure get
    None for it (shown as "–"), so one absent ``val_loss`` does not hide the whole job."""
    data = dict(data)
    for stage in STAGES:
        record = data.get(stage)
        if isinstance(record, Mapping):
            data[stage] = {**dict.fromkeys(_STAGE_REQUIRED), **record}
        elif record is not None:
            data[stage] = None
    if not isinstance(data.get("abc"), Mapping):
        data["abc"] = {}
    for key in ("wall_time_s", "gaps"):
        if not isinstance(data.get(key), Mapping):
            data[key] = {}
    if data.get("size") is not None and not isinstance(data.get("size"), Mapping):
        data["size"] = None
    return data


def read_summary(job_dir: Path) -> tuple[RunSummary | None, bool, str | None]:
    """``(summary, has_status, None)``; ``(None, False, None)`` without a summary file;
    ``(None, False, why)`` when it cannot be read."""
    path = Path(job_dir) / SUMMARY_FILE
    if not path.is_file():
        return None, False, None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, False, f"cannot read {SUMMARY_FILE}: {exc}"
    if not isinstance(data, dict):
        return None, False, f"{SUMMARY_FILE} is not a JSON object"
    try:
        summary = RunSummary.from_dict(_tolerant(data))
    except (TypeError, ValueError, AttributeError) as exc:
        return None, False, f"{SUMMARY_FILE} is not a run summary: {exc}"
    return summary, "status" in data, None


def _first_line(text: str | None) -> str | None:
    lines = str(text).strip().splitlines() if text is not None else []
    if not lines:
        return None
    line = lines[0]
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 1] + "…"


def load_job(job_dir: Path, root: Path) -> Job:
    """Read one job directory into a :class:`Job`."""
    job_dir, root = Path(job_dir), Path(root)
    rel_dir = job_dir.relative_to(root).as_posix() if job_dir != root else "."
    summary, has_status, read_error = read_summary(job_dir)
    hydra_config = _read_hydra_config(job_dir)
    if summary is None:
        status = UNREADABLE if read_error else UNFINISHED
        return Job(rel_dir, status, **_merge([_config_identity(hydra_config)]),
                   error=read_error or UNFINISHED_REASON)
    embedded = summary.config if isinstance(summary.config, Mapping) else {}
    identity = _merge([_summary_identity(summary), _config_identity(embedded), _config_identity(hydra_config)])
    status = str(summary.effective_status()) if has_status else UNKNOWN_STATUS
    if status == FINISHED:
        error = None
    elif status == INTERRUPTED and summary.status == RUNNING:
        error = f"summary says running, but process {summary.pid} on {summary.host} is gone (killed?)"
    else:
        error = _first_line(summary.error)
    return Job(rel_dir, status, **identity, summary=summary, error=error)


def load_jobs(job_dirs: Sequence[Path], root: Path) -> list[Job]:
    """Given job directories (relative names taken from ``root``), labelled with their variant."""
    return label_variants([load_job(job_dir, root) for job_dir in job_dirs])


def collect_jobs(root: Path) -> list[Job]:
    """Every job found under ``root``, finished ones labelled with their variant."""
    return load_jobs(find_job_dirs(root), root)


def label_variants(jobs: list[Job]) -> list[Job]:
    """Give each finished job the values of the settings that differ between finished jobs
    (e.g. ``abc.scope=per_channel,finetune.lr=0.001``), so different configurations are never
    averaged as if they were seeds of one."""
    finished = [job for job in jobs if job.finished and job.summary.config]  # no config: nothing to compare
    settings = {id(job): job.settings() for job in finished}
    keys = sorted({k for s in settings.values() for k in s})
    varying = [k for k in keys if len({repr(s.get(k)) for s in settings.values()}) > 1]
    if not varying:
        return jobs
    return [replace(job, variant=",".join(f"{k}={settings[id(job)].get(k)}" for k in varying))
            if id(job) in settings else job for job in jobs]
