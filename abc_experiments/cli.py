"""``abc-run``: the Hydra entry point. It only wraps :func:`abc_experiments.pipeline.run`.

User errors (bad config values, missing data, unusable checkpoints, a diverged loss) end with one
message and exit status 1, without a traceback; Ctrl-C / SIGTERM saves a checkpoint and exits
with 130 after printing the command that resumes. In a multirun, a failing job is logged and
recorded in its ``summary.json`` and the sweep goes on; at the end a table of every job and the
``abc-report`` command are printed, and the exit status is 1 if any job failed.

:class:`RunCallbacks` (a Hydra callback, ``conf/hydra/default.yaml``) does what must happen
outside a job: refusing a mismatched resume before Hydra writes into the run dir, and the
sweep's closing table.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .checkpoints import CheckpointError
from .config import CONFIG_GROUPS, ConfigError, is_config_key, to_container, unknown_key_error  # registers the schema
from .data import DatasetUnavailableError
from .models import PretrainedWeightsUnavailableError
from .pipeline import read_earlier_summary, refuse_resume_message, resume_conflicts, run
from .results import FAILED, FINISHED, SUMMARY_FILE, ABCSetting, RunSummary
from .rundirs import override_arg
from .settings import flat_settings
from .tb import shared_fp_root
from .training import TrainingDiverged, TrainingInterrupted

log = logging.getLogger("abc-run")
# conf/hydra/launcher/submitit_slurm.yaml deliberately shadows the plugin's config of that name
# (it keeps every key of the plugin's schema and adds GPU settings); Hydra warns about the match.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore")

USER_ERRORS = (ConfigError, DatasetUnavailableError, PretrainedWeightsUnavailableError, CheckpointError,
               TrainingDiverged)
# Files Hydra itself writes into a run dir before a job starts.
HYDRA_FILES = (".hydra", "abc-run.log", "cli.log")


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def resume_command(run_dir: str | Path) -> str:
    """The command that resumes the run in ``run_dir``: this run's overrides, each quoted so that
    it pastes into a shell and parses in Hydra whatever the path holds (``=``, ``,``, spaces)."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("hydra.run.dir", "resume")]
    words = ["abc-run", *(shlex.quote(o) for o in kept), override_arg("hydra.run.dir", run_dir), "resume=true"]
    return " ".join(words)


def _remove_if_untouched(run_dir: Path) -> None:
    """A run that failed before writing anything of its own leaves no run dir behind (Hydra made
    it, and its config and log only repeat what the command line said)."""
    if RunCallbacks.run_dir_existed is not False or not run_dir.is_dir():
        return
    if all(entry.name in HYDRA_FILES for entry in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _record_failure(cfg: DictConfig, error: BaseException) -> None:
    """A sweep job refused before it wrote anything still records why, for the closing table and
    abc-report."""
    path = Path(cfg.run_dir) / SUMMARY_FILE
    if path.exists():
        return
    summary = RunSummary(dataset=str(cfg.dataset.name), model=str(cfg.model.name), seed=cfg.seed,
                         abc=ABCSetting(M=cfg.abc.M, N=cfg.abc.N or 0, scope=str(cfg.abc.scope)),
                         run_dir=str(Path(cfg.run_dir).absolute()), status=FAILED,
                         error=f"{type(error).__name__}: {error}", config=to_container(cfg))
    summary.write(path)


def run_job(cfg: DictConfig) -> float:
    """:func:`run` with the command-line handling of errors and interruptions."""
    multirun = _is_multirun()
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 speaks for everyone
        logging.getLogger().setLevel(logging.WARNING)
    if multirun:  # a line per job on the console; the full tables stay in the job's log file
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.WARNING)
    try:
        value = run(cfg, shared_fp_root(HydraConfig.get().sweep.dir) if multirun else None)
        if multirun:
            print(f"  {_job_line(Path(cfg.run_dir))}", flush=True)
        return value
    except USER_ERRORS as error:
        log.error("%s", error)
        if multirun:
            _record_failure(cfg, error)
            return float("nan")
        _remove_if_untouched(Path(cfg.run_dir))
        sys.exit(1)
    except (TrainingInterrupted, KeyboardInterrupt) as error:
        log.warning("%s\nresume with:\n  %s", error or "interrupted", resume_command(cfg.run_dir))
        sys.exit(130)
    except Exception:
        if not multirun:
            raise
        log.exception("job failed (recorded in %s/summary.json); the sweep continues", cfg.run_dir)
        return float("nan")


def _task_settings(config: DictConfig, run_dir: str) -> dict:
    """The flat settings of the job that ``config`` (with its ``hydra`` node) describes."""
    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    task.run_dir = run_dir  # "${hydra:runtime.output_dir}" resolves only inside a job
    return flat_settings(to_container(task))


def _job_line(run_dir: Path) -> str:
    summary = RunSummary.read(run_dir / SUMMARY_FILE)
    accs = " -> ".join(f"{stage} {summary.stage(stage).acc:.2f}" for stage in ("fp", "converted", "finetuned"))
    return f"{summary.status}: test acc {accs} ({summary.wall_time_s.get('total', 0):.0f} s; log in {run_dir.name}/)"


class RunCallbacks(Callback):
    """Hydra callbacks of ``abc-run`` (configured in ``conf/hydra/default.yaml``)."""

    run_dir_existed: bool | None = None  # whether the single run's dir was there before this launch

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        RunCallbacks.run_dir_existed = run_dir.exists()
        if not config.get("resume"):
            return
        changed = resume_conflicts(read_earlier_summary(run_dir), _task_settings(config, str(run_dir)))
        if changed:  # refuse before Hydra writes its config and log into the run dir
            print(f"[abc-run][ERROR] - {refuse_resume_message(run_dir, changed)}", file=sys.stderr)
            sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .report import compact_table, find_job_dirs, load_jobs  # light: no torch, no matplotlib

        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        jobs = load_jobs(find_job_dirs(sweep_dir), sweep_dir) if sweep_dir.is_dir() else []
        if not jobs:
            return
        failed = sum(job.status != FINISHED for job in jobs)
        print(f"\n{compact_table(sweep_dir)}\n\nfull report: abc-report {shlex.quote(str(sweep_dir))}")
        if failed:
            print(f"abc-run: {failed} of {len(jobs)} job(s) failed (see each job's summary.json and log)",
                  file=sys.stderr)
            sys.exit(1)
        print(f"abc-run: all {len(jobs)} job(s) finished")


def unknown_override_key(argv: list[str]) -> str | None:
    """The first override on the command line whose key the closed schema lacks (``abc.m=3``,
    ``+abc.m=3``, ``~abc.m``), or None. Config groups (``dataset=mnist``), ``hydra.*`` keys and keys
    below ``model.options`` are left to Hydra and the model's builder; so is an override that does
    not parse (Hydra explains it)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # Hydra's own parse reports a bad option once
            arguments, _ = get_args_parser().parse_known_args(argv)
        overrides = OverridesParser.create().parse_overrides(arguments.overrides)
    except (SystemExit, Exception):  # argparse exits on a bad option, and Hydra answers it (or --help)
        return None
    for override in overrides:
        key = override.key_or_group
        if "/" in key or override.package is not None or key.split(".")[0] == "hydra" or key in CONFIG_GROUPS:
            continue
        if not is_config_key(key):
            return key
    return None


@hydra.main(version_base="1.3", config_path="pkg://abc_experiments.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    return run_job(cfg)


def main() -> None:
    """``abc-run``: refuse an unknown key in one line (before Hydra composes, creates a run dir or
    imports anything heavy for the run), then hand the command line to Hydra."""
    key = unknown_override_key(sys.argv[1:])
    if key is not None:
        print(f"[abc-run][ERROR] - {unknown_key_error(key)}", file=sys.stderr)
        sys.exit(1)
    _hydra_main()


if __name__ == "__main__":
    main()
