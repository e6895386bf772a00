"""Datasets (digits, MNIST, FashionMNIST, CIFAR-10/100, ImageNet) and their DataLoaders."""

from .datasets import DATASETS, DataSplits, DatasetUnavailableError, DigitsDataset, build_datasets
from .loaders import build_loaders, default_num_workers

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetUnavailableError",
    "DigitsDataset",
    "build_datasets",
    "build_loaders",
    "default_num_workers",
]
