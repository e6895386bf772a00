"""Aggregating finished jobs over seeds: one :class:`ConfigResult` per configuration.

A configuration is (dataset, model, M, N, variant); its jobs should differ only in the seed. Two
finished jobs of one configuration with the same seed (e.g. launched once as ``abc.N=null`` and once
as ``abc.N=0``, which are the same setting) are duplicates: the first (in directory order) counts,
the others are listed as duplicates and never inflate the seed count or the std.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..results import STAGES, RunSummary
from .jobs import Job

STAGE_LABELS = {"fp": "FP", "converted": "converted", "finetuned": "fine-tuned"}


def _number(value) -> float | None:
    """``value`` as a finite float, None when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def stage_acc(summary: RunSummary, stage: str) -> float | None:
    result = summary.stage(stage)
    return None if result is None else _number(result.acc)


def stage_se(summary: RunSummary, stage: str) -> float | None:
    """Binomial standard error (pp) of a stage's test accuracy, None without ``test_size``."""
    result = summary.stage(stage)
    if result is None or _number(result.acc) is None or not isinstance(result.test_size, int):
        return None
    return result.standard_error()


def _gap_to_fp(summary: RunSummary) -> float | None:
    fp_acc, finetuned_acc = stage_acc(summary, "fp"), stage_acc(summary, "finetuned")
    return None if fp_acc is None or finetuned_acc is None else fp_acc - finetuned_acc


def _size(summary: RunSummary, key: str) -> float | None:
    return None if summary.size is None else _number(getattr(summary.size, key, None))


def own_time(summary: RunSummary) -> float | None:
    """The job's own wall time: conversion + fine-tuning (the FP pretraining is shared)."""
    times = [_number(summary.wall_time_s.get(stage)) for stage in ("convert", "finetune")]
    times = [t for t in times if t is not None]
    return sum(times) if times else None


@dataclass(frozen=True)
class Metric:
    """A per-job number that is aggregated over seeds."""

    column: str
    unit: str
    decimals: int
    extract: Callable[[RunSummary], float | None]
    se_column: str | None = None  # the column of its binomial standard error (accuracies)

    @property
    def header(self) -> str:
        return f"{self.column} ({self.unit})" if self.unit else self.column


def _acc_metric(stage: str) -> Metric:
    return Metric(f"{stage}_acc", "%", 2, lambda s: stage_acc(s, stage), se_column=f"{stage}_acc_se")


METRICS = (
    *(_acc_metric(stage) for stage in STAGES),
    Metric("gap_to_fp", "pp", 2, _gap_to_fp),
    Metric("size_kb", "", 1, lambda s: _size(s, "abc_kb")),
    Metric("compression", "×", 2, lambda s: _size(s, "compression")),
    Metric("own_time_s", "", 1, own_time),
)
SE_EXTRACTORS = {f"{stage}_acc_se": (lambda s, stage=stage: stage_se(s, stage)) for stage in STAGES}


@dataclass
class ConfigResult:
    """All finished seeds of one (dataset, model, M, N, variant) configuration."""

    dataset: str | None
    model: str | None
    M: int | None
    N: int | None
    variant: str = ""
    seeds: list[int | None] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    test_sizes: set[int] = field(default_factory=set)
    job_dirs: list[str] = field(default_factory=list)
    id: str = ""  # short label used in the plots and the tables

    @property
    def group(self) -> tuple:
        """(dataset, model, variant): the configurations compared in one plot panel."""
        return (self.dataset, self.model, self.variant)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def stats(self, column: str) -> tuple[float, float | None] | None:
        """Mean and sample std (None for a single value) of a metric, None without values."""
        values = self.values.get(column, [])
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std

    def mean(self, column: str) -> float | None:
        stat = self.stats(column)
        return None if stat is None else stat[0]


def _none_last(value) -> tuple:
    return (value is None, value if value is not None else 0)


def _config_sort_key(key: tuple) -> tuple:
    dataset, model, m, n, variant = key
    return (_none_last(dataset), _none_last(model), variant, _none_last(m), _none_last(n))


def split_duplicates(jobs: Iterable[Job]) -> tuple[list[Job], list[tuple[Job, Job]]]:
    """Finished jobs, without the duplicates; and ``(duplicate, the job it duplicates)`` pairs.

    A duplicate is a finished job with the configuration and seed of an earlier one (jobs without
    a known seed are never duplicates: nothing says they repeat each other).
    """
    first: dict[tuple, Job] = {}
    unique, duplicates = [], []
    for job in jobs:
        if not job.finished:
            continue
        key = (job.config_key, job.seed)
        if job.seed is not None and key in first:
            duplicates.append((job, first[key]))
            continue
        first.setdefault(key, job)
        unique.append(job)
    return unique, duplicates


def aggregate(jobs: Iterable[Job]) -> list[ConfigResult]:
    """Group finished jobs by configuration, sorted by dataset, model, variant, M, N (FP first);
    duplicates (same configuration and seed) count once. Results get ids ``1``, ``2``, ..."""
    unique, _ = split_duplicates(jobs)
    results: dict[tuple, ConfigResult] = {}
    for job in unique:
        result = results.setdefault(job.config_key, ConfigResult(*job.config_key))
        result.seeds.append(job.seed)
        result.job_dirs.append(job.rel_dir)
        summary = job.summary
        for metric in METRICS:
            value = metric.extract(summary)
            if value is not None:
                result.values.setdefault(metric.column, []).append(value)
        for column, extract in SE_EXTRACTORS.items():
            value = extract(summary)
            if value is not None:
                result.values.setdefault(column, []).append(value)
        for stage in STAGES:
            stage_result = summary.stage(stage)
            if stage_result is not None and isinstance(stage_result.test_size, int):
                result.test_sizes.add(stage_result.test_size)
    ordered = [results[key] for key in sorted(results, key=_config_sort_key)]
    for index, result in enumerate(ordered, start=1):
        result.id = str(index)
    return ordered


def fp_baselines(jobs: Iterable[Job]) -> dict[tuple, tuple[float | None, float | None]]:
    """Mean full-precision (accuracy %, size kB) per (dataset, model) over finished jobs."""
    unique, _ = split_duplicates(jobs)
    collected: dict[tuple, tuple[list[float], list[float]]] = {}
    for job in unique:
        accs, sizes = collected.setdefault((job.dataset, job.model), ([], []))
        for values, value in ((accs, stage_acc(job.summary, "fp")), (sizes, _size(job.summary, "fp_kb"))):
            if value is not None:
                values.append(value)
    return {pair: tuple(statistics.fmean(v) if v else None for v in values) for pair, values in collected.items()}


def groups(results: Iterable[ConfigResult]) -> list[tuple]:
    """Distinct (dataset, model, variant) groups in first-seen order (results are already sorted)."""
    return list(dict.fromkeys(r.group for r in results))


def all_test_sizes(results: Iterable[ConfigResult]) -> set[int]:
    return set().union(*(r.test_sizes for r in results))


def format_test_size(sizes: Iterable[int]) -> str | None:
    """``"359"``, ``"359–360"`` when jobs differ, None when no job recorded it."""
    sizes = sorted(set(sizes))
    if not sizes:
        return None
    return f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"


def binomial_se(acc: float, n: int) -> float:
    """Standard error (pp) of an accuracy (%) measured on ``n`` images."""
    p = min(max(acc / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1 - p) / n)


# ---- differences within the standard error -----------------------------------------------------


@dataclass(frozen=True)
class CloseCall:
    """Configurations whose fine-tuned accuracies cannot be told apart on the group's test set."""

    group: tuple
    best: ConfigResult
    within: list[ConfigResult]  # within one s.e. of the difference from the best
    like_fp: list[ConfigResult]  # fine-tuned within one s.e. of the difference from FP


def _difference_se(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else math.hypot(a, b)


def close_calls(results: Sequence[ConfigResult]) -> list[CloseCall]:
    """Per group, the configurations whose fine-tuned accuracy differs from the best one's, or
    from the FP model's, by less than the binomial standard error of that difference
    (√(s.e.₁² + s.e.₂²)). Groups without recorded test sizes are skipped."""
    calls = []
    for group in groups(results):
        members = [r for r in results if r.group == group and r.mean("finetuned_acc") is not None]
        members = [r for r in members if r.mean("finetuned_acc_se") is not None]
        if not members:
            continue
        best = max(members, key=lambda r: r.mean("finetuned_acc"))
        within = []
        for r in members:
            if r is best:
                continue
            se = _difference_se(best.mean("finetuned_acc_se"), r.mean("finetuned_acc_se"))
            if best.mean("finetuned_acc") - r.mean("finetuned_acc") <= se:
                within.append(r)
        like_fp = []
        for r in members:
            gap, se = r.mean("gap_to_fp"), _difference_se(r.mean("fp_acc_se"), r.mean("finetuned_acc_se"))
            if gap is not None and se is not None and abs(gap) <= se:
                like_fp.append(r)
        calls.append(CloseCall(group, best, within, like_fp))
    return calls


# ---- shared pretraining ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pretraining:
    """One FP model trained by a job of the sweep and shared (through the cache) with others."""

    job_dir: str
    dataset: str | None
    model: str | None
    seed: int | None
    seconds: float | None
    cache: str | None
    reused_by: int  # other jobs that loaded it from the cache


@dataclass(frozen=True)
class PretrainingSummary:
    trained: list[Pretraining]
    reused_external: int  # jobs that loaded a cached FP model trained outside the scanned jobs
    unknown: int  # jobs whose summary does not say where their FP model came from (older runs)

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.trained if p.seconds is not None)


def pretrainings(jobs: Iterable[Job]) -> PretrainingSummary:
    """The pretrainings done by the scanned jobs (``fp_source == "trained"``), each counted once,
    with how many other jobs reused it (``fp_source == "cache <its pretrain_cache>"``)."""
    with_summary = [job for job in jobs if job.summary is not None]
    trained_jobs = [job for job in with_summary if job.summary.fp_source == "trained"]
    caches = {job.summary.pretrain_cache for job in trained_jobs if job.summary.pretrain_cache}
    reuse: dict[str, int] = {}
    external = unknown = 0
    for job in with_summary:
        source = job.summary.fp_source
        if source is None:
            unknown += job.summary.fp is not None
        elif source.startswith("cache "):
            path = source[len("cache "):]
            if path in caches:
                reuse[path] = reuse.get(path, 0) + 1
            else:
                external += 1
    trained = [
        Pretraining(job.rel_dir, job.dataset, job.model, job.seed, _number(job.summary.wall_time_s.get("pretrain")),
                    job.summary.pretrain_cache, reuse.get(job.summary.pretrain_cache or "", 0))
        for job in trained_jobs
    ]
    return PretrainingSummary(trained, external, unknown)
