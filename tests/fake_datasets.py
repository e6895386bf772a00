"""Tiny datasets in the genuine on-disk formats, for tests that must not touch the network.

* :func:`write_fake_mnist` writes idx files where torchvision's ``MNIST``/``FashionMNIST`` look
  for them (``root/<folder>/raw/``): unpacked by default, which torchvision accepts without
  checksum (so ``download=True`` is a no-op), or gzipped (checked against the md5 sums in the
  class's ``resources``: patch them with :func:`patch_mnist_checksums`).
* :func:`write_fake_cifar` writes the pickled batches of ``cifar-10-batches-py/`` or
  ``cifar-100-python/``; torchvision checks their md5 sums, so patch them with
  :func:`patch_cifar_checksums`.
* :func:`write_fake_imagefolder` writes small JPEG images in ``<class>/`` sub-folders.

Every writer returns the pixel values and labels it wrote, as :class:`FakeData`.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, MNIST
from torchvision.datasets.utils import calculate_md5

MNIST_IMAGE_SIZE = 28
CIFAR_IMAGE_SIZE = 32
IDX_UBYTE = 0x08


class FakeData(NamedTuple):
    """What a writer wrote: uint8 images (N, H, W) or (N, H, W, 3) and int labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _random_split(
    n: int, num_classes: int, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    return images, labels


def _idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes: magic (0, 0, type, ndim), big-endian dims, then the data."""
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(
    root: str | Path,
    n_train: int = 50,
    n_test: int = 20,
    folder: str = "MNIST",
    gzipped: bool = False,
    seed: int = 0,
) -> FakeData:
    """Write MNIST-format idx files to ``root/<folder>/raw/`` (``folder="FashionMNIST"`` for that).

    With ``gzipped`` only the ``.gz`` archives are written (as in a fresh download).
    """
    rng = np.random.default_rng(seed)
    shape = (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE)
    data = FakeData(*_random_split(n_train, 10, shape, rng), *_random_split(n_test, 10, shape, rng))
    raw = Path(root, folder, "raw")
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": data.train_images,
        "train-labels-idx1-ubyte": data.train_labels,
        "t10k-images-idx3-ubyte": data.test_images,
        "t10k-labels-idx1-ubyte": data.test_labels,
    }
    for name, array in arrays.items():
        if gzipped:
            (raw / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(array)))
        else:
            (raw / name).write_bytes(_idx_bytes(array))
    return data


def patch_mnist_checksums(monkeypatch, root: str | Path, dataset_class: type = MNIST) -> None:
    """Make ``dataset_class.resources`` carry the md5 sums of the fake ``.gz`` archives under ``root``."""
    raw = Path(root, dataset_class.__name__, "raw")
    resources = [(name, calculate_md5(raw / name)) for name, _ in dataset_class.resources]
    monkeypatch.setattr(dataset_class, "resources", resources)


def _cifar_files(num_classes: int) -> tuple[type, dict[str, list[str]]]:
    """The torchvision class and, per file kind, the file names of CIFAR-``num_classes``."""
    if num_classes == 10:
        return CIFAR10, {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if num_classes == 100:
        return CIFAR100, {"train": ["train"], "test": ["test"]}
    raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}")


def _cifar_batch(images: np.ndarray, labels: np.ndarray, num_classes: int, batch_name: str) -> dict:
    """One pickled CIFAR batch: rows of 3072 bytes (1024 red, 1024 green, 1024 blue)."""
    batch = {
        "batch_label": batch_name,
        "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
        "filenames": [f"fake_{i}.png" for i in range(len(images))],
    }
    if num_classes == 10:
        batch["labels"] = labels.tolist()
    else:
        batch["fine_labels"] = labels.tolist()
        batch["coarse_labels"] = (labels // 5).tolist()
    return batch


def _cifar_meta(num_classes: int) -> dict:
    if num_classes == 10:
        return {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": 10_000, "num_vis": 3072}
    return {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }


def write_fake_cifar(
    root: str | Path, n_train: int = 50, n_test: int = 20, num_classes: int = 10, seed: int = 0
) -> FakeData:
    """Write the pickled python batches of CIFAR-10 or CIFAR-100 under ``root``.

    CIFAR-10's training images are spread over ``data_batch_1..5``. Images are (N, 32, 32, 3).
    """
    dataset_class, files = _cifar_files(num_classes)
    rng = np.random.default_rng(seed)
    shape = (CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE, 3)
    data = FakeData(
        *_random_split(n_train, num_classes, shape, rng), *_random_split(n_test, num_classes, shape, rng)
    )
    folder = Path(root, dataset_class.base_folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": (data.train_images, data.train_labels), "test": (data.test_images, data.test_labels)}
    for kind, (images, labels) in splits.items():
        chunks = np.array_split(np.arange(len(images)), len(files[kind]))
        for name, chunk in zip(files[kind], chunks):
            batch = _cifar_batch(images[chunk], labels[chunk], num_classes, name)
            (folder / name).write_bytes(pickle.dumps(batch))
    (folder / dataset_class.meta["filename"]).write_bytes(pickle.dumps(_cifar_meta(num_classes)))
    return data


def patch_cifar_checksums(monkeypatch, root: str | Path, num_classes: int = 10) -> None:
    """Make torchvision's CIFAR class expect the md5 sums of the fake files under ``root``."""
    dataset_class, _ = _cifar_files(num_classes)
    folder = Path(root, dataset_class.base_folder)

    def with_md5(entries):
        return [[name, calculate_md5(folder / name)] for name, _ in entries]

    monkeypatch.setattr(dataset_class, "train_list", with_md5(dataset_class.train_list))
    monkeypatch.setattr(dataset_class, "test_list", with_md5(dataset_class.test_list))
    meta = dict(dataset_class.meta, md5=calculate_md5(folder / dataset_class.meta["filename"]))
    monkeypatch.setattr(dataset_class, "meta", meta)


def write_fake_imagefolder(
    root: str | Path, classes: tuple[str, ...] = ("n01", "n02"), per_class: int = 3, size: int = 40, seed: int = 0
) -> None:
    """Write ``per_class`` random RGB ``.JPEG`` images of ``size``² pixels into ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = Path(root, name)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{index}.JPEG")
