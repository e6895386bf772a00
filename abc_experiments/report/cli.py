"""``abc-report DIR``: write report.md, report.csv and the two plots of a sweep into DIR."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .aggregate import aggregate, fp_baselines, pretrainings, split_duplicates
from .jobs import HYDRA_CONFIG, SUMMARY_FILE, Job, collect_jobs
from .tables import (
    HEATMAP_PNG,
    REPORT_CSV,
    REPORT_MD,
    SIZE_PLOT_PNG,
    problems_section,
    render_markdown,
    results_table,
    write_csv,
)

PROG = "abc-report"
RUN_HINT = "run `abc-run -m ...` first"


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def write_report(root: Path, jobs: Sequence[Job]) -> list[Path]:
    """Write all report files (needs a finished job), print the tables; returns the paths."""
    from .plots import plot_accuracy_vs_size, plot_heatmaps  # matplotlib only when plotting

    results = aggregate(jobs)
    problems = [job for job in jobs if not job.finished]
    _, duplicates = split_duplicates(jobs)
    baselines = fp_baselines(jobs)
    paths = [root / name for name in (REPORT_MD, REPORT_CSV, HEATMAP_PNG, SIZE_PLOT_PNG)]
    md_path, csv_path, heatmap_path, size_path = paths
    md_path.write_text(render_markdown(root, results, problems, duplicates, pretrainings(jobs)))
    write_csv(results, csv_path)
    plot_heatmaps(results, baselines, heatmap_path)
    plot_accuracy_vs_size(results, baselines, size_path)
    print(results_table(results))
    if problems:
        print(f"\n{problems_section(problems)}")
    if duplicates:
        print(f"\n{len(duplicates)} duplicate job(s) (same configuration and seed as another) left out: "
              + ", ".join(f"{dup.rel_dir} (= {kept.rel_dir})" for dup, kept in duplicates))
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
        if not any(job.finished for job in jobs):
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
