"""Run-directory names: ``outputs/runs/<launch id>[_<overrides>]`` and sweep job dirs, registered
as OmegaConf resolvers used by ``conf/hydra/default.yaml``; and overrides quoted so that a printed
command (``hydra.run.dir=... resume=true``) works when pasted, whatever the path holds."""

from __future__ import annotations

import hashlib
import os
import shlex
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
    OmegaConf.register_new_resolver(
        "abc_job_subdir", lambda num, o: readable(o) if o else f"job{num}", replace=True)
