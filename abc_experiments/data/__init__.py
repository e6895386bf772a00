"""Datasets (digits, MNIST, FashionMNIST, CIFAR-10/100, ImageNet) and their DataLoaders."""

from .datasets import (
    DATASET_REGISTRY,
    DATASETS,
    DatasetEntry,
    DatasetUnavailableError,
    DataSplits,
    DigitsDataset,
    build_datasets,
    register_dataset,
)
from .loaders import build_loaders, default_num_workers

__all__ = [
    "DATASET_REGISTRY",
    "DatasetEntry",
    "register_dataset",
    "DATASETS",
    "DataSplits",
    "DatasetUnavailableError",
    "DigitsDataset",
    "build_datasets",
    "build_loaders",
    "default_num_workers",
]
