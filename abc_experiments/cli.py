"""``abc-run``: the Hydra entry point. It only wraps :func:`abc_experiments.pipeline.run`.

User errors (bad config values, missing data, unusable checkpoints, a NaN loss) end with one
message and exit status 1, without a traceback; Ctrl-C / SIGTERM saves a checkpoint and exits
with 130 after saying how to resume. In a multirun, a failing job is logged and recorded in its
``summary.json`` and the sweep goes on with the next job.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import config  # noqa: F401  (registers the schema and the run-dir resolvers)
from .checkpoints import CheckpointError
from .config import ConfigError
from .data import DatasetUnavailableError
from .models import PretrainedWeightsUnavailableError
from .pipeline import run
from .training import NonFiniteLossError, TrainingInterrupted

log = logging.getLogger("abc-run")
# conf/hydra/launcher/submitit_slurm.yaml deliberately shadows the plugin's config of that name
# (it keeps every key of the plugin's schema and adds GPU settings); Hydra warns about the match.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore")

USER_ERRORS = (ConfigError, DatasetUnavailableError, PretrainedWeightsUnavailableError, CheckpointError,
               NonFiniteLossError)


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_job(cfg: DictConfig) -> float:
    """:func:`run` with the command-line handling of errors and interruptions."""
    multirun = _is_multirun()
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 speaks for everyone
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return run(cfg)
    except USER_ERRORS as error:
        log.error("%s", error)
        if multirun:
            return float("nan")
        sys.exit(1)
    except (TrainingInterrupted, KeyboardInterrupt) as error:
        log.warning("%s\nresume with the same command plus: hydra.run.dir=%s resume=true",
                    error or "interrupted", cfg.run_dir)
        sys.exit(130)
    except Exception:
        if not multirun:
            raise
        log.exception("job failed (recorded in %s/summary.json); the sweep continues", cfg.run_dir)
        return float("nan")


@hydra.main(version_base="1.3", config_path="pkg://abc_experiments.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg)


if __name__ == "__main__":
    main()
