"""Run-directory names: ``outputs/runs/<launch id>[_<overrides>]`` and sweep job dirs
``outputs/multirun/<launch id>/<swept overrides>``, registered as OmegaConf resolvers used by
``conf/hydra/default.yaml``; and overrides quoted so that a printed command
(``hydra.run.dir=... resume=true``) works when pasted, whatever the path holds."""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

_LAUNCH_ID: list[str] = []


def launch_id() -> str:
    """A timestamp plus a random suffix, fixed for this process (and shared by torchrun's ranks,
    which all derive it from their common parent), so launches in the same second never collide."""
    if not _LAUNCH_ID:
        import datetime
        import secrets

        if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
            run_id = os.environ["TORCHELASTIC_RUN_ID"]
            if run_id in ("", "none"):  # torchrun without a rendezvous id: the agent's pid and start time
                stat = Path(f"/proc/{os.getppid()}/stat")
                started = stat.read_text().rsplit(")", 1)[1].split()[19] if stat.exists() else "0"
                run_id = f"{os.getppid()}-{started}"
            _LAUNCH_ID.append("ddp_" + run_id)
        else:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            _LAUNCH_ID.append(f"{stamp}_{secrets.token_hex(3)}")
    return _LAUNCH_ID[0]


def readable(overrides: str, limit: int = 120) -> str:
    """The overrides as a directory name; a long one is cut and given a hash of the whole, so
    jobs that differ only at the end still get different dirs."""
    name = overrides.replace("/", "-").replace(" ", "")
    if len(name) <= limit:
        return name
    return f"{name[:limit - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _sweep_definition(multirun_yaml: Path) -> tuple[set[str], dict[str, str]] | None:
    """What Hydra's basic sweeper expands, read from the ``multirun.yaml`` it writes into the sweep
    dir before it launches a job: the swept keys, and the value every job gets for each other key.
    As the sweeper does, ``hydra.sweeper.params`` come first and a command-line override of the
    same key replaces its entry. None when there is no such file."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun_yaml.is_file():
        return None
    config = OmegaConf.load(multirun_yaml)
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    task = OmegaConf.to_container(OmegaConf.select(config, "hydra.overrides.task"), resolve=False)
    lines = [f"{key}={value}" for key, value in params.items()] + [str(line) for line in task]
    swept: set[str] = set()
    common: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            swept.add(key)
            common.pop(key, None)
        else:
            swept.discard(key)
            common[key] = override.get_value_element_as_str()
    return swept, common


def swept_overrides(job_overrides: Sequence[str], sweep_dir: str | Path) -> str | None:
    """The job's overrides of the keys its sweep varies (``abc.M=3,abc.N=1``), sorted and joined
    as in ``hydra.job.override_dirname``; the overrides every job shares are left out (they are in
    the sweep dir's multirun.yaml and each job's .hydra/overrides.yaml). A swept key stays even if
    override_dirname excludes it (``device=cpu,cuda``), so that its jobs get dirs of their own.

    None, for the caller to fall back to every override, when the swept keys cannot be read (no
    multirun.yaml: another sweeper such as Optuna; a parse error) or when the job is not one this
    sweep definition makes (other keys, or another value of a shared key). That check is what
    keeps names apart: jobs that pass it differ only in their swept values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    definition = _sweep_definition(Path(sweep_dir) / "multirun.yaml")
    if definition is None or not definition[0]:
        return None
    swept, common = definition
    parsed = OverridesParser.create().parse_overrides([str(line) for line in job_overrides])
    keys = [override.get_key_element() for override in parsed]
    if len(set(keys)) != len(keys) or set(keys) != swept | set(common):
        return None
    if any(key in common and override.get_value_element_as_str() != common[key]
           for key, override in zip(keys, parsed)):
        return None
    return ",".join(sorted(str(override.input_line) for key, override in zip(keys, parsed) if key in swept))


def job_subdir(num, override_dirname: str, job_overrides=None, sweep_dir=None) -> str:
    """A sweep job's dir name: its swept overrides when they can be told (see
    :func:`swept_overrides`), else all of its overrides (``hydra.job.override_dirname``), else
    ``job<num>``; long names are cut with a hash by :func:`readable`. Never raises: a failure to
    read the sweep gives the full name."""
    name = None
    if job_overrides is not None and sweep_dir:
        try:
            overrides = OmegaConf.to_container(job_overrides, resolve=False) \
                if OmegaConf.is_config(job_overrides) else list(job_overrides)
            name = swept_overrides(overrides, str(sweep_dir))
        except Exception:  # noqa: BLE001  (any failure: the full name, which is never wrong)
            name = None
    name = name or override_dirname
    return readable(name) if name else f"job{num}"


def override_arg(key: str, value) -> str:
    """``key=value`` as one shell word that Hydra's override parser reads back as ``value``, even
    when the value holds ``=``, ``,``, spaces or quotes (run dirs do): double-quoted for Hydra
    (backslashes and double quotes escaped), then quoted for the shell."""
    text = str(value)
    if text and all(c.isalnum() or c in "/._-+~" for c in text):
        return shlex.quote(f"{key}={text}")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return shlex.quote(f'{key}="{escaped}"')


def register_resolvers() -> None:
    # use_cache: Hydra copies the launcher's resolver cache into every job's config, so jobs that
    # joblib or submitit run in other processes resolve the same sweep dir.
    OmegaConf.register_new_resolver("abc_launch_id", launch_id, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("abc_suffix", lambda o: f"_{readable(o)}" if o else "", replace=True)
    OmegaConf.register_new_resolver("abc_job_subdir", job_subdir, replace=True)
