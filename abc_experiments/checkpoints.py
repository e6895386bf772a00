"""Checkpoint files and the cache of pretrained full-precision models.

Every file is written to a temporary name and renamed into place, so a crash never leaves half a
checkpoint; every file is read with ``torch.load(weights_only=True)``. The pretrain cache is keyed
by a hash of everything that determines the pretrained weights and guarded by a file lock, so
concurrent jobs of a sweep train the model once and never read a partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from torch import nn

from .results import FINAL_CHECKPOINT  # noqa: F401  (re-exported: where checkpoint code looks for it)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


class ResumeRefusedError(CheckpointError):
    """``resume=true`` with settings other than those of the run being resumed."""


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file here: 0o666 less the umask."""
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_write(path: Path | str):
    """Write ``path`` all at once: yields a temporary name beside it to write to; when the block
    ends without an error the file is renamed onto ``path`` (``os.replace``), else it is removed.
    A reader, or a process killed mid-write, never sees half a file.

    Args:
        path: the file to create or replace (its folder is created).

    Yields:
        The temporary path to write (same folder, hidden name). It gets the mode a plain new
        file gets under the umask, whatever mode the writer created it with (safetensors: 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: Path) -> None:
    """``path.write_text(text)`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


# How torch's weights-only unpickler words a refusal of a pickled Python object (a class, a
# function, a call): the file is a pickle, just not weights only. Other errors mean damage.
_PICKLED_OBJECT_SIGNS = ("GLOBAL ", "Trying to call reduce", "Can only create new object", "Can only build",
                         "must be imported to load")


def _holds_pickled_objects(path: Path, error: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only reader refused ``path`` for holding Python objects: it named one,
    or the file is a plain pickle (protocol 3 or later: opcodes torch.save never writes)."""
    if any(sign in str(error) for sign in _PICKLED_OBJECT_SIGNS):
        return True
    with open(path, "rb") as handle:
        head = handle.read(2)
    return "Unsupported operand" in str(error) and len(head) == 2 and head[0] == 0x80 and head[1] >= 3


def load_checkpoint(path: Path | str, what: str = "checkpoint") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; one clear error if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist: check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not _holds_pickled_objects(path, error):  # not a refused object: damage
            raise CheckpointError(f"{what} {path} is not a readable torch checkpoint ({_first_sentence(error)}): "
                                  "it is corrupt or another format; delete it or point to another file") from None
        raise CheckpointError(
            f"{what} {path} is not a safe weights-only checkpoint: it holds pickled Python objects and was not "
            "loaded (unpickling them can run arbitrary code, so they are never loaded here). Re-save it as "
            "tensors only, e.g. torch.save(model.state_dict(), path), or point to another file"
        ) from None
    except Exception as error:  # truncated zip, wrong format, ...
        raise CheckpointError(
            f"{what} {path} is not a readable torch checkpoint ({type(error).__name__}: "
            f"{_first_sentence(error)}): it is corrupt or another format; delete it or point to another file"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _first_sentence(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split())
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_model_state(model: nn.Module, state: dict, path: Path | str, what: str = "checkpoint") -> None:
    """Load a state dict (bare, or under a ``"model"`` key) into ``model``; explain a mismatch."""
    weights = state.get("model", state)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as error:
        first = str(error).splitlines()
        detail = "; ".join(line.strip() for line in first[:3])[:400]
        raise CheckpointError(
            f"{what} {path} does not fit the {type(model).__name__} of this config ({detail}): "
            "it was saved for another model, dataset or ABC setting"
        ) from None


def cache_key(settings: dict) -> str:
    """A short stable hash of plain-data settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PretrainCache:
    """Pretrained FP models under ``<cache_dir>/pretrain/<name>-<key>.pt`` with their history."""

    def __init__(self, cache_dir: Path, name: str, settings: dict):
        self.key = cache_key(settings)
        self.path = Path(cache_dir) / "pretrain" / f"{name}-{self.key}.pt"
        self.settings = settings

    def exists(self) -> bool:
        return self.path.is_file()

    @contextmanager
    def lock(self):
        """Held while one job trains the model; other jobs wait (and say so), then find it in the cache."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logging.getLogger(__name__).info(
                "another process is training this FP model (lock %s.lock): waiting for it, then reusing it",
                self.path)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def load(self) -> dict:
        return load_checkpoint(self.path, "cached pretrained model")

    def store(self, model: nn.Module, history: list[dict]) -> None:
        atomic_save({"model": model.state_dict(), "history": history, "settings": self.settings}, self.path)
