"""DataLoaders for a :class:`~abc_experiments.data.datasets.DataSplits`.

Training order and augmentation are pure functions of (seed, epoch, sample): the
:class:`EpochSampler` draws each epoch's permutation from its own generator and can start in the
middle of an epoch, and :class:`SeededSamples` runs each sample's random transforms under a seed
made from (seed, epoch, index). So a run resumed mid-epoch, with any number of worker processes,
sees exactly the batches an uninterrupted run would. Call ``loaders["train"].sampler.set_epoch``
before every epoch. With ``sampler_world_size > 1`` the training set is sharded across ranks
(like ``DistributedSampler``); val, test and calib are NOT sharded: every rank evaluates the
whole split.
"""

from __future__ import annotations

import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import DataSplits

# Datasets held in memory as ready tensors: worker processes would only add overhead.
IN_MEMORY_DATASETS = frozenset({"digits"})
MAX_DEFAULT_WORKERS = 4


def default_num_workers(dataset_name: str) -> int:
    """0 for in-memory datasets, else one worker per spare CPU core (at most 4)."""
    if dataset_name in IN_MEMORY_DATASETS:
        return 0
    return min(MAX_DEFAULT_WORKERS, max(0, (os.cpu_count() or 1) - 1))


def ignore_stop_signals(_worker_id: int) -> None:
    """``worker_init_fn`` of every loader: a worker ignores SIGINT and SIGTERM. Ctrl-C in a
    terminal, ``kill -TERM -<pgid>`` and cluster schedulers signal the whole process group; the main
    process then stops after the current step and saves a checkpoint, which needs the next batch
    from its workers, and it shuts them down itself (they also exit when it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (the same on every machine and process)."""
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value ^ (number & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return value >> 1


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys in an order fixed by (seed, epoch), sharded over ranks.

    ``set_epoch(epoch, start=k)`` starts the epoch after its first ``k`` samples of this rank (to
    resume mid-epoch). Like ``DistributedSampler``, the permutation is padded to a multiple of the
    world size so every rank gets the same number of samples.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        order = torch.randperm(self.size, generator=_seeded_generator(_mix(self.seed, self.epoch))).tolist()
        padded = -(-self.size // self.world_size) * self.world_size
        order += order[: padded - self.size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter([(self.epoch, index) for index in self._indices()[self.start:]])

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.start


class SeededSamples(Dataset):
    """Wraps a dataset so that ``dataset[(epoch, index)]`` runs its random transforms under the
    seed (seed, epoch, index): reproducible augmentation in any worker, and after a resume."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            # the generator itself: torch.manual_seed also seeds every GPU and is ~100x slower
            torch.default_generator.manual_seed(_mix(self.seed, epoch, index))
            return self.dataset[index]


def _train_loader(
    dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, **options
) -> DataLoader:
    sampler = EpochSampler(len(dataset), seed, rank, world_size)
    return DataLoader(SeededSamples(dataset, seed), batch_size=batch_size, sampler=sampler,
                      generator=_seeded_generator(seed), **options)


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
    # Workers persist for the loaders read every epoch (train, val), not for test and calib.
    once = {"num_workers": workers, "pin_memory": device.startswith("cuda"), "drop_last": False,
            "worker_init_fn": ignore_stop_signals if workers > 0 else None}
    options = dict(once, persistent_workers=workers > 0)
    return {
        "train": _train_loader(splits.train, batch_size, seed, sampler_rank, sampler_world_size, **options),
        # Every loader has its own generator: starting an iterator then never draws from the global
        # RNG, which would shift dropout after a resume.
        "val": DataLoader(splits.val, batch_size=eval_batch_size, shuffle=False,
                          generator=_seeded_generator(seed), **options),
        "test": DataLoader(splits.test, batch_size=eval_batch_size, shuffle=False,
                           generator=_seeded_generator(seed), **once),
        "calib": DataLoader(
            splits.calib, batch_size=eval_batch_size, shuffle=True, generator=_seeded_generator(seed),
            **once,
        ),
    }
