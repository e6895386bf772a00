"""The report's tables: ``report.md`` (Markdown), ``report.csv`` and the compact per-job text table.

``N = 0`` (weight-only ABC, also written ``N = null``) shows as ``FP`` in Markdown and text and is
stored as ``0`` in ``report.csv`` so the column stays numeric. Missing values show as ``–``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..results import STAGES
from .aggregate import (
    METRICS,
    STAGE_LABELS,
    CloseCall,
    ConfigResult,
    PretrainingSummary,
    _none_last,
    all_test_sizes,
    close_calls,
    format_test_size,
    split_duplicates,
    stage_acc,
)
from .jobs import Job, find_job_dirs, load_jobs

REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
HEATMAP_PNG = "accuracy_heatmap.png"
SIZE_PLOT_PNG = "accuracy_vs_size.png"
MISSING = "–"
SE_HEADER = "± s.e."
TEST_N_HEADER = "test n"


def format_n(n: int | None) -> str:
    """N for display: ``FP`` for full-precision activations."""
    if n is None:
        return "?"
    return "FP" if n == 0 else str(n)


def _text(value) -> str:
    return "?" if value is None else str(value)


def markdown_literal(text: str) -> str:
    """``text`` with Markdown's emphasis characters escaped: variants can hold globs such as
    ``abc.layers={layer1.*: {M: 5}, layer2.*: {N: 1}}``, whose ``*`` would turn into italics."""
    return text.replace("*", "\\*")


def format_stat(stat: tuple[float, float | None] | None, decimals: int) -> str:
    """``mean ± std`` (just the value for one seed); ``–`` without values."""
    if stat is None:
        return MISSING
    mean, std = stat
    return f"{mean:.{decimals}f}" if std is None else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _format_number(value: float | None, decimals: int) -> str:
    return MISSING if value is None else f"{value:.{decimals}f}"


def format_seeds(seeds: Sequence[int | None]) -> str:
    listed = ", ".join(_text(seed) for seed in sorted(seeds, key=_none_last))
    return f"{len(seeds)} ({listed})"


def group_label(group: tuple) -> str:
    label = f"{_text(group[0])} / {_text(group[1])}"
    return f"{label} [{group[2]}]" if len(group) > 2 and group[2] else label


def config_label(result: ConfigResult, with_group: bool = True) -> str:
    bases = f"M={_text(result.M)} N={format_n(result.N)}"
    return f"{group_label(result.group)} {bases}" if with_group else bases


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)])


def results_header(results: Sequence[ConfigResult]) -> list[str]:
    variants = any(r.variant for r in results)
    header = ["id", "dataset", "model", *(["variant"] if variants else []), "M", "N", "seeds", TEST_N_HEADER]
    for metric in METRICS:
        header.append(metric.header)
        if metric.se_column:
            header.append(SE_HEADER)
    return header


def results_table(results: Sequence[ConfigResult]) -> str:
    """Markdown table with one row per configuration (``id`` is the label in the plots)."""
    variants = any(r.variant for r in results)
    rows = []
    for r in results:
        row = [r.id, _text(r.dataset), _text(r.model), *([markdown_literal(r.variant)] if variants else []), _text(r.M),
               format_n(r.N), format_seeds(r.seeds), format_test_size(r.test_sizes) or MISSING]
        for metric in METRICS:
            row.append(format_stat(r.stats(metric.column), metric.decimals))
            if metric.se_column:
                row.append(_format_number(r.mean(metric.se_column), metric.decimals))
        rows.append(row)
    return _markdown_table(results_header(results), rows)


def problems_table(problems: Sequence[Job]) -> str:
    """Markdown table of failed, interrupted, unfinished or still running jobs."""
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


def duplicates_section(duplicates: Sequence[tuple[Job, Job]]) -> str:
    """The finished jobs left out because an earlier job has their configuration and seed."""
    header = ["dir", "duplicate of", "dataset", "model", "M", "N", "seed", "finetuned_acc (%)", "counted (%)"]
    rows = [
        [f"`{dup.rel_dir}`", f"`{kept.rel_dir}`", _text(dup.dataset), _text(dup.model), _text(dup.M),
         format_n(dup.N), _text(dup.seed), _format_number(stage_acc(dup.summary, "finetuned"), 2),
         _format_number(stage_acc(kept.summary, "finetuned"), 2)]
        for dup, kept in duplicates
    ]
    return (
        "## Duplicate jobs\n\n"
        f"{len(duplicates)} finished job(s) repeat the configuration and seed of another job (e.g. "
        "`abc.N=null` and `abc.N=0`, which are the same setting); each is left out of the means and "
        "does not count as a seed.\n\n" + _markdown_table(header, rows) + "\n"
    )


def precision_section(results: Sequence[ConfigResult]) -> str:
    """What the test-set size lets the accuracies tell apart (binomial standard errors)."""
    sizes = format_test_size(all_test_sizes(results))
    lines = ["## Test-set size and standard errors\n"]
    if sizes is None:
        lines.append("The summaries do not record their test-set size (written by an older abc-run), so no "
                     "standard errors can be given: treat differences of a few tenths of a point with care.\n")
        return "\n".join(lines)
    lines.append(
        f"Accuracies are measured on a test set of {sizes} images. `± s.e.` is the binomial standard "
        "error of one such measurement, √(p(1−p)/n) in percentage points; the seeds' `± std` does not "
        "include it (every seed is scored on the same images). Two accuracies whose difference is below "
        "√(s.e.₁² + s.e.₂²) are within the standard error: this test set cannot tell them apart.\n"
    )
    calls: list[CloseCall] = close_calls(results)
    for call in calls:
        members = [r for r in results if r.group == call.group]
        size = format_test_size(all_test_sizes(members))
        prefix = f"- **{markdown_literal(group_label(call.group))}** (test set: {size} images): "
        notes = []
        if call.within:
            listed = ", ".join(f"{config_label(r, False)} (id {r.id}, {r.mean('finetuned_acc'):.2f}%)"
                               for r in call.within)
            notes.append(f"the best fine-tuned result, {config_label(call.best, False)} (id {call.best.id}, "
                         f"{call.best.mean('finetuned_acc'):.2f}%), is within the standard error of {listed}: "
                         "these differences are not significant")
        else:
            notes.append(f"the best fine-tuned result, {config_label(call.best, False)} (id {call.best.id}), "
                         "is more than one standard error ahead of the others")
        if call.like_fp:
            listed = ", ".join(f"{config_label(r, False)} (id {r.id})" for r in call.like_fp)
            notes.append(f"the gap to full precision is within the standard error for {listed}")
        lines.append(prefix + "; ".join(notes) + ".")
    return "\n".join(lines) + "\n"


def pretraining_section(summary: PretrainingSummary) -> str:
    """The FP pretrainings, each shown once: jobs that reuse one through the cache spend nothing."""
    lines = ["## Time\n",
             "`own_time_s` in the results is each job's conversion + fine-tuning time. The full-precision "
             "pretraining is shared: one job trains the FP model, the others load it from the cache, so it "
             "is counted once here, not in any job's time.\n"]
    if summary.trained:
        lines.append(f"Pretraining (shared): {summary.total_seconds:.1f} s for {len(summary.trained)} FP model(s).\n")
        header = ["trained by", "dataset", "model", "seed", "pretrain (shared) s", "reused by (jobs)"]
        rows = [[f"`{p.job_dir}`", _text(p.dataset), _text(p.model), _text(p.seed),
                 _format_number(p.seconds, 1), str(p.reused_by)] for p in summary.trained]
        lines.append(_markdown_table(header, rows) + "\n")
    else:
        lines.append("No job here trained an FP model (all reused a cached one, or their summaries do not "
                     "say).\n")
    if summary.reused_external:
        lines.append(f"{summary.reused_external} job(s) loaded an FP model pretrained outside the scanned "
                     "directory.\n")
    if summary.unknown:
        lines.append(f"{summary.unknown} job(s) do not record where their FP model came from (older summaries).\n")
    return "\n".join(lines)


def render_markdown(root: Path, results: Sequence[ConfigResult], problems: Sequence[Job],
                    duplicates: Sequence[tuple[Job, Job]] = (),
                    pretraining: PretrainingSummary | None = None) -> str:
    """The full ``report.md`` (results, precision and plots sections only when there are results)."""
    n_finished = sum(r.n_seeds for r in results)
    dup_text = f", {len(duplicates)} duplicate(s) left out" if duplicates else ""
    parts = [
        "# ABC-Net sweep report\n",
        f"Source: `{root}`: {n_finished} finished jobs in {len(results)} configurations, "
        f"{len(problems)} failed or unfinished{dup_text}.\n",
    ]
    if results:
        sizes = format_test_size(all_test_sizes(results))
        test_text = f"test set: {sizes} images" if sizes else "test-set size not recorded"
        parts += [
            f"Accuracies in % on the test split ({test_text}; column `test n`), `mean ± std` over seeds "
            "(sample std, shown only with two or more seeds); `± s.e.` after each accuracy is its binomial "
            "standard error; `gap_to_fp` = fp_acc − finetuned_acc in percentage points; `size_kb` is the "
            "ABC model size; `own_time_s` = conversion + fine-tuning seconds (the shared pretraining is "
            "under Time); `N = FP` means full-precision activations (weight-only ABC, `abc.N=0` or `null`, "
            "stored as N = 0 in report.csv); `id` labels the configuration in the plots.\n",
            f"## Results\n\n{results_table(results)}\n",
            precision_section(results),
        ]
    parts.append(problems_section(problems))
    if duplicates:
        parts.append(duplicates_section(duplicates))
    if results and pretraining is not None:
        parts.append(pretraining_section(pretraining))
    if results:
        parts.append(
            f"## Plots\n\n![Fine-tuned accuracy over M x N]({HEATMAP_PNG})\n\n"
            f"![Accuracy vs model size]({SIZE_PLOT_PNG})\n"
        )
    return "\n".join(parts)


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(round(value, 4))


def csv_header() -> list[str]:
    header = ["id", "dataset", "model", "variant", "M", "N", "n_seeds", "seeds", "test_n"]
    for metric in METRICS:
        header += [f"{metric.column}_mean", f"{metric.column}_std"]
        if metric.se_column:
            header.append(metric.se_column)
    return header


def write_csv(results: Sequence[ConfigResult], path: Path) -> None:
    """``report.csv``: one row per configuration, ``<metric>_mean``/``_std`` and ``<acc>_se`` columns."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_header())
        for r in results:
            row = [r.id, _text(r.dataset), _text(r.model), r.variant, _text(r.M), _text(r.N), r.n_seeds,
                   ";".join(_text(s) for s in sorted(r.seeds, key=_none_last)),
                   ";".join(str(n) for n in sorted(r.test_sizes))]
            for metric in METRICS:
                mean, std = r.stats(metric.column) or (None, None)
                row += [_csv_number(mean), _csv_number(std)]
                if metric.se_column:
                    row.append(_csv_number(r.mean(metric.se_column)))
            writer.writerow(row)


# ---- the compact per-job table -----------------------------------------------------------------


def _common_root(job_dirs: Sequence[Path]) -> Path:
    resolved = [Path(d).resolve() for d in job_dirs]
    if len(resolved) == 1:
        return resolved[0].parent
    return Path(os.path.commonpath(resolved))


def compact_table(source: Path | str | Sequence[Path | str]) -> str:
    """One text line per job of a sweep dir (or of the given job dirs): the job's directory (its
    overrides in a Hydra sweep), M, N, seed, status (``interrupted`` for a killed ``running`` job)
    and the FP / converted / fine-tuned test accuracies. Duplicates (same configuration and seed as
    an earlier job) are marked. Empty string when there are no jobs."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        jobs = load_jobs(find_job_dirs(root), root)
    else:
        job_dirs = [Path(d) for d in source]
        if not job_dirs:
            return ""
        jobs = load_jobs([d.resolve() for d in job_dirs], _common_root(job_dirs))
    if not jobs:
        return ""
    _, duplicates = split_duplicates(jobs)
    duplicate_of = {id(dup): kept.rel_dir for dup, kept in duplicates}
    header = ["job", "M", "N", "seed", "status", *(f"{STAGE_LABELS[s]} %" for s in STAGES), ""]
    rows = []
    for job in jobs:
        accs = [_format_number(stage_acc(job.summary, s), 2) if job.summary else MISSING for s in STAGES]
        note = f"duplicate of {duplicate_of[id(job)]}" if id(job) in duplicate_of else ""
        rows.append([job.rel_dir, _text(job.M), format_n(job.N), _text(job.seed), job.status, *accs, note])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    numeric = {1, 2, 3, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        text = "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
        return text.rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])
