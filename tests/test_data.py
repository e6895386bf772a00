"""Tests of abc_experiments.data on sklearn's digits and tiny genuine-format files in tmp_path."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from fake_datasets import (
    patch_cifar_checksums,
    patch_mnist_checksums,
    write_fake_cifar,
    write_fake_imagefolder,
    write_fake_mnist,
)

from abc_experiments.data import (
    DATASETS,
    DatasetUnavailableError,
    build_datasets,
    build_loaders,
    default_num_workers,
)
from abc_experiments.data.datasets import DIGITS_MAX_PIXEL, DIGITS_MEAN, DIGITS_STD

MNIST_STATS = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


@pytest.fixture
def offline(monkeypatch):
    """Every URL open fails as on a machine without network."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _assert_carved(splits, n_train: int, n_val: int) -> None:
    """train and val (and calib = train) partition the training set with the expected sizes."""
    assert len(splits.train) == n_train - n_val
    assert len(splits.val) == n_val
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    assert sorted(splits.train.indices + splits.val.indices) == list(range(n_train))
    assert splits.calib.indices == splits.train.indices


# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_and_split_sizes():
    splits = build_datasets("digits")
    assert (splits.name, splits.in_channels, splits.image_size, splits.num_classes) == ("digits", 1, 8, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1294, 144, 359)
    image, label = splits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert isinstance(label, int)
    all_indices = splits.train.indices + splits.val.indices + splits.test.indices
    assert sorted(all_indices) == list(range(1797))
    assert splits.calib.indices == splits.train.indices


def test_digits_normalisation():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    dataset = build_datasets("digits").train.dataset
    expected = (raw[5, 3, 4] / DIGITS_MAX_PIXEL - DIGITS_MEAN) / DIGITS_STD
    assert dataset[5][0][0, 3, 4].item() == pytest.approx(expected, abs=1e-5)
    assert dataset.images.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert dataset.images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_digits_test_split_does_not_depend_on_seed():
    first, second = build_datasets("digits", seed=0), build_datasets("digits", seed=1)
    assert first.test.indices == second.test.indices
    assert first.val.indices != second.val.indices


def test_digits_same_seed_same_split():
    first, second = build_datasets("digits", seed=3), build_datasets("digits", seed=3)
    assert first.train.indices == second.train.indices
    assert first.val.indices == second.val.indices


def test_val_size_overrides_fraction():
    splits = build_datasets("digits", val_size=100, val_fraction=0.5)
    assert len(splits.val) == 100


@pytest.mark.parametrize("options", [{"val_size": 0}, {"val_fraction": 1.0}, {"val_size": 10_000}])
def test_impossible_validation_size(options):
    with pytest.raises(ValueError, match="validation"):
        build_datasets("digits", **options)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="cifar10") as error:
        build_datasets("svhn")
    assert all(name in str(error.value) for name in DATASETS)


# ---------------------------------------------------------------------- MNIST family


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_family_from_unpacked_files(tmp_path, name, offline):
    fake = write_fake_mnist(tmp_path, n_train=50, n_test=20, folder=MNIST_FOLDERS[name])
    splits = build_datasets(name, root=tmp_path, download=True, val_fraction=0.1)
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (1, 28, 10)
    _assert_carved(splits, n_train=50, n_val=5)
    assert len(splits.test) == 20

    mean, std = MNIST_STATS[name]
    index = splits.train.indices[0]
    image, label = splits.train[0]
    assert image.shape == (1, 28, 28)
    assert label == fake.train_labels[index]
    expected = (fake.train_images[index, 7, 9] / 255 - mean) / std
    assert image[0, 7, 9].item() == pytest.approx(expected, abs=1e-5)
    test_image, _ = splits.test[3]
    expected = (fake.test_images[3, 0, 0] / 255 - mean) / std
    assert test_image[0, 0, 0].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_family_reads_gzipped_archives_in_place(tmp_path, monkeypatch, name):
    folder = MNIST_FOLDERS[name]
    fake = write_fake_mnist(tmp_path, n_train=30, n_test=10, folder=folder, gzipped=True)
    patch_mnist_checksums(monkeypatch, tmp_path, getattr(tvd, folder))
    raw_files = sorted(Path(tmp_path, folder, "raw").iterdir())

    splits = build_datasets(name, root=tmp_path, download=False, val_size=3)
    _assert_carved(splits, n_train=30, n_val=3)
    assert splits.test[9][1] == fake.test_labels[9]
    assert sorted(Path(tmp_path, folder, "raw").iterdir()) == raw_files  # nothing unpacked


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_shapes_normalisation_and_augmentation(tmp_path, monkeypatch, name):
    fake = write_fake_cifar(tmp_path, n_train=40, n_test=12, num_classes=CIFAR_CLASSES[name])
    patch_cifar_checksums(monkeypatch, tmp_path, CIFAR_CLASSES[name])
    splits = build_datasets(name, root=tmp_path, download=False, val_size=8)
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (3, 32, CIFAR_CLASSES[name])
    _assert_carved(splits, n_train=40, n_val=8)
    assert len(splits.test) == 12

    mean, std = CIFAR_STATS[name]
    image, label = splits.test[5]
    assert image.shape == (3, 32, 32)
    assert label == fake.test_labels[5]
    for channel in range(3):
        expected = (fake.test_images[5, 10, 20, channel] / 255 - mean[channel]) / std[channel]
        assert image[channel, 10, 20].item() == pytest.approx(expected, abs=1e-5)

    torch.manual_seed(0)
    assert torch.equal(splits.val[0][0], splits.val[0][0])
    assert torch.equal(splits.calib[0][0], splits.calib[0][0])
    assert any(not torch.equal(splits.train[0][0], splits.train[0][0]) for _ in range(5))


def test_cifar_without_augmentation(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, n_train=20, n_test=5)
    patch_cifar_checksums(monkeypatch, tmp_path)
    splits = build_datasets("cifar10", root=tmp_path, download=False, augment=False, val_size=4)
    assert torch.equal(splits.train[0][0], splits.calib[0][0])


# -------------------------------------------------------------------- missing files


@pytest.mark.parametrize(
    "name, file_name, folder, url",
    [
        ("mnist", "train-images-idx3-ubyte.gz", "MNIST/raw", "ossci-datasets.s3.amazonaws.com/mnist/"),
        ("fashion_mnist", "t10k-labels-idx1-ubyte.gz", "FashionMNIST/raw", "fashion-mnist"),
        ("cifar10", "cifar-10-python.tar.gz", "", "www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python.tar.gz", "", "www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    ],
)
@pytest.mark.parametrize("download", [False, True])
def test_missing_files_message(tmp_path, offline, name, file_name, folder, url, download):
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets(name, root=tmp_path, download=download)
    message = str(error.value)
    assert f"'{name}'" in message
    assert file_name in message
    assert f"{Path(tmp_path, folder).resolve()}/" in message
    assert url in message
    assert "data.root=" in message
    assert ("download" in message) and (("failed" in message) == download)
    assert "\n" not in message


def test_missing_cifar_message_names_unpacked_folder(tmp_path):
    with pytest.raises(DatasetUnavailableError, match=r"cifar-10-batches-py/ \(data_batch_1\.\.5"):
        build_datasets("cifar10", root=tmp_path, download=False)


def test_missing_mnist_message_suggests_shared_root(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="data.root=../shared/datasets"):
        build_datasets("mnist", root=tmp_path, download=False)


# -------------------------------------------------------------------------- ImageNet


def test_imagenet_missing_folder_message(tmp_path):
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets("imagenet", root=tmp_path)
    message = str(error.value)
    folder = Path(tmp_path, "imagenet").resolve()
    assert f"{folder}/train/<class>/*.JPEG" in message
    assert f"{folder}/val/<class>/*.JPEG" in message
    assert "data.root=" in message


def test_imagenet_from_image_folders(tmp_path):
    write_fake_imagefolder(tmp_path / "imagenet" / "train", per_class=3)
    write_fake_imagefolder(tmp_path / "imagenet" / "val", per_class=1)
    splits = build_datasets("imagenet", root=tmp_path, val_size=2)
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (3, 224, 2)
    _assert_carved(splits, n_train=6, n_val=2)
    assert len(splits.test) == 2
    assert splits.train[0][0].shape == (3, 224, 224)
    assert torch.equal(splits.val[0][0], splits.val[0][0])


def test_imagenet_mismatched_classes(tmp_path):
    write_fake_imagefolder(tmp_path / "imagenet" / "train", classes=("n01", "n02"), per_class=2)
    write_fake_imagefolder(tmp_path / "imagenet" / "val", classes=("n01",), per_class=1)
    with pytest.raises(DatasetUnavailableError, match="class folders of val/ differ"):
        build_datasets("imagenet", root=tmp_path, val_size=1)


# --------------------------------------------------------------------------- loaders


def test_digits_loaders_batches():
    loaders = build_loaders(build_datasets("digits"), batch_size=32, eval_batch_size=100)
    assert set(loaders) == {"train", "val", "test", "calib"}
    images, labels = next(iter(loaders["train"]))
    assert images.shape == (32, 1, 8, 8) and labels.shape == (32,) and labels.dtype == torch.int64
    assert next(iter(loaders["test"]))[0].shape == (100, 1, 8, 8)
    assert next(iter(loaders["calib"]))[0].shape == (100, 1, 8, 8)
    assert loaders["train"].num_workers == 0
    assert sum(len(batch[1]) for batch in loaders["val"]) == 144


def test_train_shuffle_is_seeded():
    splits = build_datasets("digits")

    def first_labels(seed):
        return next(iter(build_loaders(splits, batch_size=64, seed=seed)["train"]))[1]

    assert torch.equal(first_labels(1), first_labels(1))
    assert not torch.equal(first_labels(1), first_labels(2))


def test_distributed_sampler_shards_train_only():
    splits = build_datasets("digits")
    loaders = build_loaders(splits, batch_size=10, sampler_rank=1, sampler_world_size=2)
    assert len(loaders["train"].sampler) == len(splits.train) // 2
    assert len(loaders["val"].sampler) == len(splits.val)


def test_cifar_loader_batch(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, n_train=20, n_test=6)
    patch_cifar_checksums(monkeypatch, tmp_path)
    loaders = build_loaders(build_datasets("cifar10", root=tmp_path, val_size=4), batch_size=8, num_workers=0)
    images, labels = next(iter(loaders["train"]))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
    assert len(next(iter(loaders["test"]))[0]) == 6


@pytest.mark.parametrize("cpus,expected", [(None, 0), (1, 0), (2, 1), (5, 4), (64, 4)])
def test_default_num_workers_leaves_a_core_and_caps_at_four(monkeypatch, cpus, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    assert default_num_workers("cifar10") == expected
    assert default_num_workers("digits") == 0  # in memory: workers would only add overhead


def test_pin_memory_only_for_cuda():
    splits = build_datasets("digits")
    assert not build_loaders(splits, batch_size=8)["train"].pin_memory
    assert build_loaders(splits, batch_size=8, device="cuda:0")["train"].pin_memory


def test_loaded_values_match_numpy_reference(tmp_path, offline):
    fake = write_fake_mnist(tmp_path, n_train=12, n_test=4)
    loaders = build_loaders(build_datasets("mnist", root=tmp_path, val_size=2), batch_size=4, num_workers=0)
    images, labels = next(iter(loaders["test"]))
    expected = (fake.test_images.astype(np.float32) / 255 - 0.1307) / 0.3081
    assert torch.allclose(images[:, 0], torch.from_numpy(expected), atol=1e-5)
    assert labels.tolist() == fake.test_labels.tolist()


def test_epoch_sampler_resumes_mid_epoch_and_shards_disjointly():
    from abc_experiments.data.loaders import EpochSampler

    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    assert list(sampler) != full
    shards = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    for shard in shards:
        shard.set_epoch(2)
    keys = [key for shard in shards for key in shard]
    assert len(keys) == 12 and {index for _, index in keys} == set(range(10))  # padded like DistributedSampler


def test_augmentation_is_the_same_with_or_without_workers(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, n_train=12, n_test=4)
    patch_cifar_checksums(monkeypatch, tmp_path)
    splits = build_datasets("cifar10", root=tmp_path, val_size=2)

    def epoch_images(workers):
        loader = build_loaders(splits, batch_size=5, num_workers=workers)["train"]
        loader.sampler.set_epoch(1)
        return torch.cat([images for images, _ in loader])

    single = epoch_images(0)
    assert torch.equal(single, epoch_images(2))
    assert torch.equal(single, epoch_images(0))
