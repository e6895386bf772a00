"""The resume policy: when a run continues an earlier one in its run dir, and when it must refuse.

A run resumes when asked (``resume=true``) or when SLURM requeued its job (a preempted or timed-out
job restarted by submitit resumes from its own checkpoints, unasked). A resume must have the
settings of the run it continues, read from that run's ``summary.json``; otherwise it is refused
before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from .results import SUMMARY_FILE, RunSummary
from .settings import flat_settings, setting_differences


def requeued() -> bool:
    """True in a SLURM job that was preempted or timed out and requeued (``SLURM_RESTART_COUNT`` > 0)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resume_requested(asked: bool) -> bool:
    """Whether a run resumes: ``asked`` (``resume=true``) or a requeued SLURM job."""
    return bool(asked) or requeued()


def read_earlier_summary(run_dir: Path) -> RunSummary | None:
    """The summary a run dir already holds; None if there is none or it was cut short."""
    try:
        return RunSummary.read(Path(run_dir) / SUMMARY_FILE)
    except (OSError, ValueError):
        return None


def resume_conflicts(earlier: RunSummary | None, settings: dict) -> list[str]:
    """``key: saved -> current`` for every setting in which ``settings`` (flat, as
    :func:`abc_experiments.settings.flat_settings` gives) differ from the ``earlier`` run's;
    empty without an earlier summary to compare with."""
    if earlier is None or not earlier.config:
        return []
    return setting_differences(flat_settings(earlier.config), settings)


def refuse_resume_message(run_dir: Path, changed: list[str]) -> str:
    """The one line that refuses a resume whose settings differ (``changed``) from the run's."""
    return (f"resume=true, but {run_dir} was run with other settings ({'; '.join(changed)}): resume with "
            "the same overrides as the interrupted run, or start a new run dir. Nothing was changed.")
