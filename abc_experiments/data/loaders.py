"""DataLoaders for a :class:`~abc_experiments.data.datasets.DataSplits`.

Training batches are shuffled by a seeded ``torch.Generator`` so runs are reproducible. With
``sampler_world_size > 1`` the training set is sharded by a ``DistributedSampler`` (call
``loaders["train"].sampler.set_epoch(epoch)`` every epoch to reshuffle); val, test and calib
are NOT sharded: every rank evaluates the whole split.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from .datasets import DataSplits

# Datasets held in memory as ready tensors: worker processes would only add overhead.
IN_MEMORY_DATASETS = frozenset({"digits"})
MAX_DEFAULT_WORKERS = 4


def default_num_workers(dataset_name: str) -> int:
    """0 for in-memory datasets, else one worker per spare CPU core (at most 4)."""
    if dataset_name in IN_MEMORY_DATASETS:
        return 0
    return min(MAX_DEFAULT_WORKERS, max(0, (os.cpu_count() or 1) - 1))


def _seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _train_loader(
    dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, **options
) -> DataLoader:
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **options)
    generator = _seeded_generator(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, **options)


def build_loaders(
    splits: DataSplits,
    batch_size: int,
    eval_batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    sampler_rank: int = 0,
    sampler_world_size: int = 1,
) -> dict[str, DataLoader]:
    """Loaders ``"train"`` (shuffled), ``"val"``, ``"test"`` (in order) and ``"calib"`` (shuffled).

    Args:
        splits: the datasets.
        batch_size: training batch size.
        eval_batch_size: batch size of val, test and calib (default: ``batch_size``).
        num_workers: worker processes per loader (default: :func:`default_num_workers`).
        device: the training device; memory is pinned only for ``cuda``.
        seed: seed of the train and calib shuffling.
        sampler_rank, sampler_world_size: shard the training set across ranks when the
            world size is above 1 (the other splits stay whole on every rank).
    """
    workers = default_num_workers(splits.name) if num_workers is None else num_workers
    eval_batch_size = eval_batch_size or batch_size
    options = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": device.startswith("cuda"),
        "drop_last": False,
    }
    return {
        "train": _train_loader(splits.train, batch_size, seed, sampler_rank, sampler_world_size, **options),
        "val": DataLoader(splits.val, batch_size=eval_batch_size, shuffle=False, **options),
        "test": DataLoader(splits.test, batch_size=eval_batch_size, shuffle=False, **options),
        "calib": DataLoader(
            splits.calib, batch_size=eval_batch_size, shuffle=True, generator=_seeded_generator(seed),
            **options,
        ),
    }
