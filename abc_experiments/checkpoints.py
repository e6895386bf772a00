"""Checkpoint files and the cache of pretrained full-precision models.

Every file is written to a temporary name and renamed into place, so a crash never leaves half a
checkpoint; every file is read with ``torch.load(weights_only=True)``. The pretrain cache is keyed
by a hash of everything that determines the pretrained weights and guarded by a file lock, so
concurrent jobs of a sweep train the model once and never read a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn


# The fine-tuned ABC model of a finished run: the one its finetuned results were measured on.
FINAL_CHECKPOINT = "finetuned.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


class ResumeRefusedError(CheckpointError):
    """``resume=true`` with settings other than those of the run being resumed."""


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str, what: str = "checkpoint") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; one clear error if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist: check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not a refused Python object: a damaged file
            raise CheckpointError(f"{what} {path} is not a readable torch checkpoint ({_first_sentence(error)}): "
                                  "it is corrupt or another format; delete it or point to another file") from None
        raise CheckpointError(
            f"{what} {path} is not a safe weights-only checkpoint: it holds pickled Python objects, which "
            "are never loaded here because unpickling can run arbitrary code. Re-save it as tensors only, "
            "e.g. torch.save(model.state_dict(), path), or point to another file"
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
        """Held while one job trains the model; other jobs wait, then find it in the cache."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            yield

    def load(self) -> dict:
        return load_checkpoint(self.path, "cached pretrained model")

    def store(self, model: nn.Module, history: list[dict]) -> None:
        atomic_save({"model": model.state_dict(), "history": history, "settings": self.settings}, self.path)
