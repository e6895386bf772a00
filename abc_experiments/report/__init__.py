"""``abc-report``: summarise an ``abc-run`` sweep into tables and plots.

Walks a Hydra multirun sweep directory (or a whole ``outputs/`` tree), reads every job's
``summary.json`` as a :class:`~abc_experiments.results.RunSummary`, aggregates the seeds of each
(dataset, model, M, N, variant) configuration and writes, into the scanned directory:

* ``report.md`` / ``report.csv`` -- one row per configuration (mean and sample std over seeds, the
  test-set size and each accuracy's binomial standard error), then the failed or unfinished jobs,
  duplicate jobs and the shared pretraining time (Markdown only);
* ``accuracy_heatmap.png`` -- fine-tuned accuracy and gap to full precision over the M x N grid;
* ``accuracy_vs_size.png`` -- accuracy against model size, with the paper's ImageNet ResNet-18
  numbers as reference when the sweep is exactly that setting.

The modules, by topic: :mod:`.jobs` (finding and reading jobs), :mod:`.aggregate` (over seeds),
:mod:`.tables` (Markdown, CSV, the compact per-job table), :mod:`.plots`, :mod:`.paper` (reference
numbers) and :mod:`.cli` (the command). No torch import anywhere, and matplotlib only once a plot
is drawn (the plotting names below load :mod:`.plots` on first use).
"""

from __future__ import annotations

from .aggregate import (
    METRICS,
    ConfigResult,
    Metric,
    Pretraining,
    PretrainingSummary,
    aggregate,
    close_calls,
    fp_baselines,
    pretrainings,
    split_duplicates,
)
from .cli import PROG, main, write_report
from .jobs import (
    FINISHED,
    INTERRUPTED,
    RUNNING,
    SUMMARY_FILE,
    UNFINISHED,
    UNREADABLE,
    Job,
    collect_jobs,
    find_job_dirs,
    label_variants,
    load_job,
    load_jobs,
)
from .paper import PaperPoint, paper_reference_points
from .tables import (
    HEATMAP_PNG,
    REPORT_CSV,
    REPORT_MD,
    SIZE_PLOT_PNG,
    compact_table,
    format_n,
    format_stat,
    problems_table,
    render_markdown,
    results_table,
    write_csv,
)

_PLOT_NAMES = frozenset({"plot_heatmaps", "plot_accuracy_vs_size", "heatmap_figure", "accuracy_vs_size_figure",
                         "place_labels", "MIN_SPAN_PP", "LABEL_GID"})


def __getattr__(name: str):
    if name in _PLOT_NAMES:
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FINISHED", "HEATMAP_PNG", "INTERRUPTED", "METRICS", "PROG", "REPORT_CSV", "REPORT_MD", "RUNNING",
    "SIZE_PLOT_PNG", "SUMMARY_FILE", "UNFINISHED", "UNREADABLE", "ConfigResult", "Job", "Metric",
    "PaperPoint", "Pretraining", "PretrainingSummary", "aggregate", "close_calls", "collect_jobs",
    "compact_table", "find_job_dirs", "format_n", "format_stat", "fp_baselines", "label_variants", "load_job",
    "load_jobs", "main", "paper_reference_points", "pretrainings", "problems_table", "render_markdown",
    "results_table", "split_duplicates", "write_csv", "write_report", *sorted(_PLOT_NAMES),
]
