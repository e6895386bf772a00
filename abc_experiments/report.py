"""``abc-report``: summarise an ``abc-run`` sweep into tables and plots.

Walks a Hydra multirun sweep directory (or a whole ``outputs/`` tree), collects every job's
``summary.json``, aggregates the seeds of each (dataset, model, M, N) configuration and writes,
into the scanned directory:

* ``report.md`` / ``report.csv`` -- one row per configuration (mean and sample std over seeds),
  plus the list of failed or unfinished jobs (Markdown only);
* ``accuracy_heatmap.png`` -- fine-tuned accuracy and gap to full precision over the M x N grid;
* ``accuracy_vs_size.png`` -- accuracy against model size, with the paper's ImageNet ResNet-18
  numbers as reference when the sweep is exactly that setting.

Activations with ``N = 0`` or ``null`` (weight-only ABC) are shown as ``FP`` in Markdown and plots
and stored as ``N = 0`` in ``report.csv`` so the column stays numeric.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before this import)
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from .settings import RUN_ONLY_KEYS, flat_settings  # noqa: E402

PROG = "abc-report"
SUMMARY_FILE = "summary.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
SKIPPED_DIRS = frozenset({".hydra", "tb", "checkpoints"})
SKIPPED_TOP_LEVEL_DIRS = frozenset({"cache"})

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
HEATMAP_PNG = "accuracy_heatmap.png"
SIZE_PLOT_PNG = "accuracy_vs_size.png"

FINISHED = "finished"
UNFINISHED = "unfinished"
UNREADABLE = "unreadable"
UNKNOWN_STATUS = "unknown"
UNFINISHED_REASON = "no summary.json (crashed, killed or still running)"
MAX_ERROR_CHARS = 200
RUN_HINT = "run `abc-run -m ...` first"

IDENTITY_KEYS = ("dataset", "model", "M", "N", "seed")

# Reference numbers: Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network",
# NIPS 2017, arXiv 1711.11294, Table 4 -- ResNet-18 on ImageNet, top-1 accuracy (%) for
# M weight bases x N activation bases.  The weight-only rows (FP activations) are left out.
PAPER_FP_TOP1 = 69.3
PAPER_ABC_TOP1 = {
    (1, 1): 42.7,
    (3, 1): 49.1,
    (3, 3): 61.0,
    (3, 5): 63.1,
    (5, 1): 54.1,
    (5, 3): 62.5,
    (5, 5): 65.0,
}
# Approximate paper model sizes: torchvision's ResNet-18 parameter count, every weight stored with
# 32 bits (full precision) or M bits (M binary bases); scales and full-precision layers are ignored.
RESNET18_PARAMS = 11_689_512
BYTES_PER_KB = 1000  # as in summary.json (abc_experiments.nn.summary)
# Keys that say where or how a job ran, or that every row shows anyway: never part of a variant.
NOT_VARIANT_KEYS = RUN_ONLY_KEYS | {"seed", "dataset.name", "model.name", "abc.M", "abc.N"}


@dataclass(frozen=True)
class Job:
    """One job directory and what could be read from it."""

    rel_dir: str
    status: str
    dataset: str | None
    model: str | None
    M: int | None
    N: int | None  # 0 means full-precision activations
    seed: int | None
    summary: Mapping = field(default_factory=dict)
    error: str | None = None
    variant: str = ""  # the settings, besides dataset/model/M/N/seed, that vary across the sweep

    @property
    def config_key(self) -> tuple:
        return (self.dataset, self.model, self.M, self.N, self.variant)

    def settings(self) -> dict:
        """The job's resolved config, flattened, without the keys that cannot define a variant."""
        config = self.summary.get("config")
        return flat_settings(config if isinstance(config, Mapping) else {}, NOT_VARIANT_KEYS)


@dataclass(frozen=True)
class Metric:
    """A per-job number that is aggregated over seeds."""

    column: str
    unit: str
    decimals: int
    extract: Callable[[Mapping], float | None]

    @property
    def header(self) -> str:
        return f"{self.column} ({self.unit})" if self.unit else self.column


@dataclass
class ConfigResult:
    """All finished seeds of one (dataset, model, M, N) configuration."""

    dataset: str | None
    model: str | None
    M: int | None
    N: int | None
    variant: str = ""
    seeds: list[int | None] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def stats(self, column: str) -> tuple[float, float | None] | None:
        """Mean and sample std (None for a single value) of a metric, None without values."""
        values = self.values.get(column, [])
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std


@dataclass(frozen=True)
class PaperPoint:
    """One published ABC-Net ResNet-18 ImageNet result."""

    M: int | None  # None for the full-precision network
    N: int | None
    top1: float
    size_kb: float


def _lookup(summary: Mapping, section: str, key: str) -> float | None:
    """``summary[section][key]`` as float, or None when absent or not a number."""
    value = summary.get(section)
    value = value.get(key) if isinstance(value, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _gap_to_fp(summary: Mapping) -> float | None:
    fp_acc, finetuned_acc = _lookup(summary, "fp", "acc"), _lookup(summary, "finetuned", "acc")
    return None if fp_acc is None or finetuned_acc is None else fp_acc - finetuned_acc


METRICS = (
    Metric("fp_acc", "%", 2, lambda s: _lookup(s, "fp", "acc")),
    Metric("converted_acc", "%", 2, lambda s: _lookup(s, "converted", "acc")),
    Metric("finetuned_acc", "%", 2, lambda s: _lookup(s, "finetuned", "acc")),
    Metric("gap_to_fp", "pp", 2, _gap_to_fp),
    Metric("size_kb", "", 1, lambda s: _lookup(s, "size", "abc_kb")),
    Metric("compression", "×", 2, lambda s: _lookup(s, "size", "compression")),
    Metric("wall_time_s", "", 1, lambda s: _lookup(s, "wall_time_s", "total")),
)


# --------------------------------------------------------------------------------------------
# Reading job directories
# --------------------------------------------------------------------------------------------


def find_job_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding a summary.json or a Hydra config."""
    job_dirs = []
    for dirpath, dirnames, filenames in os.walk(root):
        skipped = SKIPPED_DIRS | (SKIPPED_TOP_LEVEL_DIRS if Path(dirpath) == root else set())
        dirnames[:] = sorted(d for d in dirnames if d not in skipped)
        job_dir = Path(dirpath)
        if SUMMARY_FILE in filenames or (job_dir / HYDRA_CONFIG).is_file():
            job_dirs.append(job_dir)
    return job_dirs


def _optional_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _name(value) -> str | None:
    """A dataset/model name given either as a string or as a config group with a ``name``."""
    if isinstance(value, Mapping):
        value = value.get("name")
    return None if value is None else str(value)


def _identity(source: Mapping) -> dict:
    """dataset/model/M/N/seed from a summary or a config (missing entries are None)."""
    abc = source.get("abc")
    has_abc = isinstance(abc, Mapping)
    return {
        "dataset": _name(source.get("dataset")),
        "model": _name(source.get("model")),
        "M": _optional_int(abc.get("M")) if has_abc else None,
        "N": (_optional_int(abc.get("N")) or 0) if has_abc else None,
        "seed": _optional_int(source.get("seed")),
    }


def _merged_identity(sources: Iterable[Mapping]) -> dict:
    """First non-None value of each identity key over ``sources``."""
    merged = dict.fromkeys(IDENTITY_KEYS)
    for source in sources:
        for key, value in _identity(source).items():
            if merged[key] is None:
                merged[key] = value
    return merged


def _read_hydra_config(job_dir: Path) -> Mapping:
    """The job's ``.hydra/config.yaml`` as a mapping ({} when missing or unreadable)."""
    try:
        config = yaml.safe_load((job_dir / HYDRA_CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, Mapping) else {}


def _read_summary(job_dir: Path) -> tuple[Mapping | None, str | None]:
    """``(summary, None)``; ``(None, None)`` without summary file; ``(None, why)`` if unreadable."""
    path = job_dir / SUMMARY_FILE
    if not path.is_file():
        return None, None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"cannot read {SUMMARY_FILE}: {exc}"
    if not isinstance(summary, Mapping):
        return None, f"{SUMMARY_FILE} is not a JSON object"
    return summary, None


def _first_line(text: str | None) -> str | None:
    lines = str(text).strip().splitlines() if text is not None else []
    if not lines:
        return None
    line = lines[0]
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 1] + "…"


def load_job(job_dir: Path, root: Path) -> Job:
    """Read one job directory into a :class:`Job`."""
    rel_dir = job_dir.relative_to(root).as_posix()
    summary, read_error = _read_summary(job_dir)
    if summary is None:
        status = UNREADABLE if read_error else UNFINISHED
        identity = _merged_identity([_read_hydra_config(job_dir)])
        return Job(rel_dir, status, **identity, error=read_error or UNFINISHED_REASON)
    embedded_config = summary.get("config")
    sources = [summary, embedded_config if isinstance(embedded_config, Mapping) else {}]
    identity = _merged_identity([*sources, _read_hydra_config(job_dir)])
    status = str(summary.get("status", UNKNOWN_STATUS))
    error = None if status == FINISHED else _first_line(summary.get("error"))
    return Job(rel_dir, status, **identity, summary=summary, error=error)


def collect_jobs(root: Path) -> list[Job]:
    """Every job found under ``root``, finished ones labelled with their variant."""
    return label_variants([load_job(job_dir, root) for job_dir in find_job_dirs(root)])


def label_variants(jobs: list[Job]) -> list[Job]:
    """Give each finished job the values of the settings that differ between finished jobs
    (e.g. ``abc.scope=per_channel,finetune.lr=0.001``), so different configurations are never
    averaged as if they were seeds of one."""
    finished = [job for job in jobs if job.status == FINISHED]
    settings = {id(job): job.settings() for job in finished}
    keys = sorted({k for s in settings.values() for k in s})
    varying = [k for k in keys if len({repr(s.get(k)) for s in settings.values()}) > 1]
    if not varying:
        return jobs
    return [replace(job, variant=",".join(f"{k}={settings[id(job)].get(k)}" for k in varying))
            if id(job) in settings else job for job in jobs]


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def _none_last(value) -> tuple:
    return (value is None, value if value is not None else 0)


def _config_sort_key(key: tuple) -> tuple:
    dataset, model, m, n, variant = key
    return (_none_last(dataset), _none_last(model), variant, _none_last(m), _none_last(n))


def aggregate(jobs: Iterable[Job]) -> list[ConfigResult]:
    """Group finished jobs by configuration, sorted by dataset, model, M, N (FP first)."""
    results: dict[tuple, ConfigResult] = {}
    for job in jobs:
        if job.status != FINISHED:
            continue
        result = results.setdefault(job.config_key, ConfigResult(*job.config_key))
        result.seeds.append(job.seed)
        for metric in METRICS:
            value = metric.extract(job.summary)
            if value is not None:
                result.values.setdefault(metric.column, []).append(value)
    return [results[key] for key in sorted(results, key=_config_sort_key)]


def fp_baselines(jobs: Iterable[Job]) -> dict[tuple, tuple[float | None, float | None]]:
    """Mean full-precision (accuracy %, size kB) per (dataset, model) over finished jobs."""
    collected: dict[tuple, tuple[list[float], list[float]]] = {}
    for job in jobs:
        if job.status != FINISHED:
            continue
        accs, sizes = collected.setdefault((job.dataset, job.model), ([], []))
        for values, value in ((accs, _lookup(job.summary, "fp", "acc")),
                              (sizes, _lookup(job.summary, "size", "fp_kb"))):
            if value is not None:
                values.append(value)
    return {
        pair: tuple(statistics.fmean(v) if v else None for v in values)
        for pair, values in collected.items()
    }


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def format_n(n: int | None) -> str:
    """N for display: ``FP`` for full-precision activations."""
    if n is None:
        return "?"
    return "FP" if n == 0 else str(n)


def _text(value) -> str:
    return "?" if value is None else str(value)


def format_stat(stat: tuple[float, float | None] | None, decimals: int) -> str:
    """``mean ± std`` (or just the value for one seed); ``–`` without values."""
    if stat is None:
        return "–"
    mean, std = stat
    return f"{mean:.{decimals}f}" if std is None else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def format_seeds(seeds: Sequence[int | None]) -> str:
    listed = ", ".join(_text(seed) for seed in sorted(seeds, key=_none_last))
    return f"{len(seeds)} ({listed})"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def results_table(results: Sequence[ConfigResult]) -> str:
    """Markdown table with one row per configuration."""
    variants = any(r.variant for r in results)
    header = ["dataset", "model", *(["variant"] if variants else []), "M", "N", "seeds",
              *(m.header for m in METRICS)]
    rows = [
        [_text(r.dataset), _text(r.model), *([r.variant] if variants else []), _text(r.M), format_n(r.N),
         format_seeds(r.seeds), *(format_stat(r.stats(m.column), m.decimals) for m in METRICS)]
        for r in results
    ]
    return _markdown_table(header, rows)


def problems_table(problems: Sequence[Job]) -> str:
    """Markdown table of failed or unfinished jobs."""
    header = ["dir", "status", "dataset", "model", "M", "N", "seed", "error"]
    rows = [
        [f"`{job.rel_dir}`", job.status, _text(job.dataset), _text(job.model), _text(job.M),
         format_n(job.N), _text(job.seed), job.error or ""]
        for job in problems
    ]
    return _markdown_table(header, rows)


def problems_section(problems: Sequence[Job]) -> str:
    body = problems_table(problems) if problems else "None."
    return f"## Failed or unfinished jobs\n\n{body}\n"


def render_markdown(root: Path, results: Sequence[ConfigResult], problems: Sequence[Job]) -> str:
    """The full ``report.md`` (results and plots sections only when there are results)."""
    n_finished = sum(len(r.seeds) for r in results)
    parts = [
        "# ABC-Net sweep report\n",
        f"Source: `{root}`: {n_finished} finished jobs in {len(results)} configurations, "
        f"{len(problems)} failed or unfinished.\n",
    ]
    if results:
        parts += [
            "Accuracies in %, `mean ± std` over seeds (sample std); `gap_to_fp` = fp_acc − "
            "finetuned_acc in percentage points; `size_kb` is the ABC model size; `N = FP` means "
            "full-precision activations (weight-only ABC, stored as N = 0 in report.csv).\n",
            f"## Results\n\n{results_table(results)}\n",
        ]
    parts.append(problems_section(problems))
    if results:
        parts.append(
            f"## Plots\n\n![Fine-tuned accuracy over M x N]({HEATMAP_PNG})\n\n"
            f"![Accuracy vs model size]({SIZE_PLOT_PNG})\n"
        )
    return "\n".join(parts)


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(round(value, 4))


def write_csv(results: Sequence[ConfigResult], path: Path) -> None:
    """``report.csv``: one row per configuration, ``<metric>_mean`` and ``<metric>_std`` columns."""
    header = ["dataset", "model", "variant", "M", "N", "n_seeds", "seeds"]
    for metric in METRICS:
        header += [f"{metric.column}_mean", f"{metric.column}_std"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in results:
            row = [_text(r.dataset), _text(r.model), r.variant, _text(r.M), _text(r.N), len(r.seeds),
                   ";".join(_text(s) for s in sorted(r.seeds, key=_none_last))]
            for metric in METRICS:
                mean, std = r.stats(metric.column) or (None, None)
                row += [_csv_number(mean), _csv_number(std)]
            writer.writerow(row)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def paper_reference_points(dataset: str | None, model: str | None) -> list[PaperPoint]:
    """The paper's ResNet-18 ImageNet results, only for dataset=imagenet and model=resnet18."""
    if dataset is None or model is None:
        return []
    if _normalise(dataset) != "imagenet" or _normalise(model) != "resnet18":
        return []

    def size_kb(bits_per_weight: int) -> float:
        return RESNET18_PARAMS * bits_per_weight / 8 / BYTES_PER_KB

    fp = PaperPoint(None, None, PAPER_FP_TOP1, size_kb(32))
    return [fp] + [
        PaperPoint(m, n, top1, size_kb(m))
        for (m, n), top1 in sorted(PAPER_ABC_TOP1.items())
    ]


def _pair(result: ConfigResult) -> tuple:
    return (result.dataset, result.model, result.variant)


def _pairs(results: Iterable[ConfigResult]) -> list[tuple]:
    """Distinct (dataset, model, variant) groups in first-seen order (results are already sorted)."""
    return list(dict.fromkeys(_pair(r) for r in results))


def _pair_label(pair: tuple) -> str:
    label = f"{_text(pair[0])} / {_text(pair[1])}"
    return f"{label} [{pair[2]}]" if pair[2] else label


def _grid(
    results: Sequence[ConfigResult], column: str
) -> tuple[list, list, np.ndarray, np.ndarray]:
    """M values, N values, and (M x N) arrays of mean and std (NaN where missing)."""
    ms = sorted({r.M for r in results}, key=_none_last)
    ns = sorted({r.N for r in results}, key=_none_last)
    means = np.full((len(ms), len(ns)), np.nan)
    stds = np.full_like(means, np.nan)
    for r in results:
        stat = r.stats(column)
        if stat is not None:
            i, j = ms.index(r.M), ns.index(r.N)
            means[i, j] = stat[0]
            stds[i, j] = np.nan if stat[1] is None else stat[1]
    return ms, ns, means, stds


def _draw_heatmap(fig, ax, results: Sequence[ConfigResult], column: str, cmap: str,
                  title: str, colorbar_label: str) -> None:
    """One annotated M x N panel of a metric's mean (± std in the cell text)."""
    ms, ns, means, stds = _grid(results, column)
    colormap = plt.get_cmap(cmap).with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(means), cmap=colormap, origin="lower", aspect="auto")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(colorbar_label, fontsize=11)
    ax.set_xticks(range(len(ns)), [format_n(n) for n in ns])
    ax.set_yticks(range(len(ms)), [_text(m) for m in ms])
    ax.set_xlabel("N (activation bases)", fontsize=11)
    ax.set_ylabel("M (weight bases)", fontsize=11)
    ax.set_title(title, fontsize=12)
    font_size = max(7, 13 - max(len(ms), len(ns)))
    finite = means[np.isfinite(means)]
    decimals = 2 if finite.size and np.ptp(finite) < 1 else 1  # close results still read apart
    for i, j in np.ndindex(means.shape):
        if np.isnan(means[i, j]):
            ax.text(j, i, "not run", ha="center", va="center", fontsize=font_size, color="#555555")
            continue
        text = f"{means[i, j]:.{decimals}f}" + ("" if np.isnan(stds[i, j]) else f"\n±{stds[i, j]:.{decimals}f}")
        red, green, blue, _ = colormap(image.norm(means[i, j]))
        dark_cell = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(j, i, text, ha="center", va="center", fontsize=font_size,
                color="white" if dark_cell else "black")


def plot_heatmaps(results: Sequence[ConfigResult], baselines: Mapping, path: Path) -> None:
    """``accuracy_heatmap.png``: per (dataset, model) row, fine-tuned accuracy and gap to FP."""
    pairs = _pairs(results)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 4.5 * len(pairs)), squeeze=False)
    for (acc_ax, gap_ax), pair in zip(axes, pairs, strict=True):
        pair_results = [r for r in results if _pair(r) == pair]
        fp_acc = baselines.get(pair[:2], (None, None))[0]
        fp_text = "" if fp_acc is None else f" (FP {fp_acc:.1f}%)"
        _draw_heatmap(fig, acc_ax, pair_results, "finetuned_acc", "viridis",
                      f"{_pair_label(pair)}: fine-tuned accuracy", "fine-tuned accuracy (%)")
        _draw_heatmap(fig, gap_ax, pair_results, "gap_to_fp", "magma_r",
                      f"{_pair_label(pair)}: gap to FP{fp_text}", "FP − fine-tuned (% points)")
    fig.suptitle("ABC-Net sweep: accuracy over M × N (mean over seeds, ± sample std)",
                 fontsize=14)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class SeriesPoints:
    """Accuracy points of one colour: ``(size kB, accuracy %, M, N)`` each.

    Points of equal N are joined by a line (accuracy as M grows).  With ``side=1`` every N series
    is labelled ``N=…`` right of its largest-size point and every column of equal size (same M)
    is titled ``M=…`` above its highest point; with ``side=-1`` the labels go left of the
    smallest-size point and the titles below the lowest point, so that two overlapping series
    (jobs and paper) keep their labels apart.
    """

    points: list[tuple[float, float, int | None, int | None]]
    color: object
    side: int


def _plot_stage(ax, results: Sequence[ConfigResult], column: str, color, marker: str,
                filled: bool, label: str) -> None:
    """Accuracy of one stage (converted or fine-tuned) against ABC size, with std error bars."""
    points = [(r.stats("size_kb"), r.stats(column)) for r in results]
    points = [(size[0], acc[0], acc[1] or 0.0) for size, acc in points if size and acc]
    if not points:
        return
    sizes, accs, errors = zip(*points, strict=True)
    ax.errorbar(sizes, accs, yerr=errors, fmt=marker, color=color, markersize=8, capsize=3,
                elinewidth=1, markerfacecolor=color if filled else "none", linestyle="none",
                label=label)


def _finetuned_series(results: Sequence[ConfigResult], color) -> SeriesPoints:
    points = []
    for r in results:
        size, acc = r.stats("size_kb"), r.stats("finetuned_acc")
        if size and acc:
            points.append((size[0], acc[0], r.M, r.N))
    return SeriesPoints(points, color, side=1)


def _plot_paper_points(ax, points: Sequence[PaperPoint]) -> SeriesPoints:
    """The paper's FP line and ABC-Net points; returns them as a series for labelling."""
    fp = next(p for p in points if p.M is None)
    ax.axhline(fp.top1, color="black", linestyle=":", linewidth=1.2,
               label=f"paper ResNet-18 FP top-1 ({fp.top1}%)")
    ax.plot([fp.size_kb], [fp.top1], marker="*", markersize=14, color="black", linestyle="none")
    abc = [p for p in points if p.M is not None]
    ax.scatter([p.size_kb for p in abc], [p.top1 for p in abc], marker="D", color="black",
               s=36, zorder=3, label="paper ABC-Net ResNet-18 top-1 (size ≈ M bits/weight)")
    return SeriesPoints([(p.size_kb, p.top1, p.M, p.N) for p in abc], "black", side=-1)


def _plot_series_lines(ax, series: SeriesPoints) -> None:
    """Join points of equal N, in order of size."""
    for n in {point[3] for point in series.points}:
        line = sorted((x, y) for x, y, _, point_n in series.points if point_n == n)
        if len(line) > 1:
            ax.plot(*zip(*line, strict=True), color=series.color, linewidth=1, alpha=0.5, zorder=1)


def _spread(values: Sequence[float], min_gap: float) -> list[float]:
    """Offsets that move sorted ``values`` at least ``min_gap`` apart, keeping their mean."""
    positions = list(values[:1])
    for value in values[1:]:
        positions.append(max(value, positions[-1] + min_gap))
    shift = statistics.fmean(positions) - statistics.fmean(values) if values else 0.0
    return [position - shift - value for position, value in zip(positions, values, strict=True)]


def _series_ends(series: SeriesPoints) -> dict[float, list[tuple[float, int | None]]]:
    """Per x, the ``(y, N)`` of series ending there (largest x for side=1, smallest for -1)."""
    ends: dict[int | None, tuple[float, float]] = {}
    for x, y, _, n in series.points:
        if n not in ends or (x - ends[n][0]) * series.side > 0:
            ends[n] = (x, y)
    ends_by_x: dict[float, list[tuple[float, int | None]]] = {}
    for n, (x, y) in ends.items():
        ends_by_x.setdefault(x, []).append((y, n))
    return ends_by_x


def _label_series(ax, series: SeriesPoints) -> None:
    """Write the ``N=…`` series labels and ``M=…`` column titles of :class:`SeriesPoints`.

    Needs the final axes layout (pixel positions), so call it after ``tight_layout`` and a draw.
    """
    font_size = 8
    pixels_per_point = ax.figure.dpi / 72
    label_extent: dict[float, float] = {}  # x -> furthest label offset towards the title
    for x, column in _series_ends(series).items():
        column.sort(key=lambda item: item[0])
        pixel_ys = [ax.transData.transform((x, y))[1] for y, _ in column]
        gap = 1.3 * font_size * pixels_per_point
        offsets = [offset / pixels_per_point for offset in _spread(pixel_ys, gap)]
        label_extent[x] = offsets[-1] if series.side > 0 else -offsets[0]
        for (y, n), offset in zip(column, offsets, strict=True):
            ax.annotate(f"N={format_n(n)}", (x, y), xytext=(8 * series.side, offset),
                        textcoords="offset points", ha="left" if series.side > 0 else "right",
                        va="center", fontsize=font_size, color=series.color,
                        arrowprops={"arrowstyle": "-", "color": series.color, "linewidth": 0.5})
    outermost: dict[float, tuple[float, int | None]] = {}  # x -> highest (side=1) / lowest point
    for x, y, m, _ in series.points:
        if x not in outermost or (y - outermost[x][0]) * series.side > 0:
            outermost[x] = (y, m)
    for x, (y, m) in outermost.items():
        distance = max(8, label_extent.get(x, 0) + 10)
        ax.annotate(f"M={_text(m)}", (x, y), xytext=(0, distance * series.side),
                    textcoords="offset points", ha="center",
                    va="bottom" if series.side > 0 else "top",
                    fontsize=font_size + 1, fontweight="bold", color=series.color)


def plot_accuracy_vs_size(results: Sequence[ConfigResult], baselines: Mapping, path: Path) -> None:
    """``accuracy_vs_size.png``: accuracy against ABC model size (log x), FP baselines."""
    fig, ax = plt.subplots(figsize=(10, 6))
    colors = plt.get_cmap("tab10").colors
    all_series = []
    for index, pair in enumerate(_pairs(results)):
        color = colors[index % len(colors)]
        pair_results = [r for r in results if _pair(r) == pair]
        label = _pair_label(pair)
        _plot_stage(ax, pair_results, "converted_acc", color, "s", False, f"{label}: converted")
        _plot_stage(ax, pair_results, "finetuned_acc", color, "o", True, f"{label}: fine-tuned")
        all_series.append(_finetuned_series(pair_results, color))
        fp_acc, fp_kb = baselines.get(pair[:2], (None, None))
        if fp_acc is not None:
            ax.axhline(fp_acc, color=color, linestyle="--", linewidth=1.2,
                       label=f"{label}: FP baseline ({fp_acc:.1f}%)")
            if fp_kb is not None:
                ax.plot([fp_kb], [fp_acc], marker="*", markersize=14, color=color, linestyle="none")
        paper_points = paper_reference_points(*pair[:2])
        if paper_points:
            all_series.append(_plot_paper_points(ax, paper_points))
    for series in all_series:
        _plot_series_lines(ax, series)
    low, high = ax.get_xlim()
    wide = low > 0 and high / low >= 10  # a log axis only pays off over a decade or more
    ax.set_xscale("log" if wide else "linear")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if not wide:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(6))
    scale = "log scale; " if wide else ""
    ax.set_xlabel(f"model size (kB, {scale}★ = full-precision model)", fontsize=11)
    ax.set_ylabel("accuracy (%)", fontsize=11)
    ax.set_title("ABC-Net sweep: accuracy vs model size (mean over seeds, bars = sample std;\n"
                 "lines join fine-tuned points of equal N)", fontsize=12)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(y=0.1)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.canvas.draw()
    for series in all_series:
        _label_series(ax, series)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def write_report(root: Path, jobs: Sequence[Job]) -> list[Path]:
    """Write all report files (needs a finished job), print the tables; returns the paths."""
    results = aggregate(jobs)
    problems = [job for job in jobs if job.status != FINISHED]
    baselines = fp_baselines(jobs)
    paths = [root / name for name in (REPORT_MD, REPORT_CSV, HEATMAP_PNG, SIZE_PLOT_PNG)]
    md_path, csv_path, heatmap_path, size_path = paths
    md_path.write_text(render_markdown(root, results, problems))
    write_csv(results, csv_path)
    plot_heatmaps(results, baselines, heatmap_path)
    plot_accuracy_vs_size(results, baselines, size_path)
    print(results_table(results))
    if problems:
        print(f"\n{problems_section(problems)}")
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Summarise an abc-run sweep (summary.json of every job) into report.md, "
                    "report.csv, accuracy_heatmap.png and accuracy_vs_size.png, written into DIR.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR",
                        help="a Hydra multirun sweep directory or a whole outputs/ tree")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns 0 on success, 1 without finished jobs, 2 for a bad DIR."""
    root = _parse_args(argv).dir
    if not root.is_dir():
        _error(f"{root} is not a directory" if root.exists() else f"no such directory: {root}")
        return 2
    root = root.resolve()
    jobs = collect_jobs(root)
    if not jobs:
        _error(f"no jobs found under {root} (no {SUMMARY_FILE} or {HYDRA_CONFIG}): {RUN_HINT}")
        return 1
    try:
        if not any(job.status == FINISHED for job in jobs):
            md_path = root / REPORT_MD
            md_path.write_text(render_markdown(root, [], jobs))
            _error(f"no finished jobs under {root} (found {len(jobs)} failed/unfinished, "
                   f"listed in {md_path}): {RUN_HINT}")
            return 1
        paths = write_report(root, jobs)
    except OSError as exc:
        _error(f"cannot write the report into {root}: {exc}")
        return 1
    print("\nWrote:\n" + "\n".join(f"  {path}" for path in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
