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


# ---------------------------------------------------------- data.verify=false: any official-format folder

VERIFY_NOTICE = "data.verify=false"


def _notices(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if VERIFY_NOTICE in record.getMessage()]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_unverified_cifar_reads_a_subset_folder_and_says_so_once(tmp_path, offline, caplog, name):
    fake = write_fake_cifar(tmp_path, n_train=40, n_test=12, num_classes=CIFAR_CLASSES[name])  # not the official md5s
    with caplog.at_level("INFO"):
        splits = build_datasets(name, root=tmp_path, download=True, val_size=8, verify=False)
    assert len(_notices(caplog)) == 1 and str(tmp_path.resolve()) in _notices(caplog)[0]
    _assert_carved(splits, n_train=40, n_val=8)
    assert len(splits.test) == 12 and splits.num_classes == CIFAR_CLASSES[name]
    mean, std = CIFAR_STATS[name]
    image, label = splits.test[7]
    assert label == fake.test_labels[7]
    expected = (fake.test_images[7, 3, 30, 1] / 255 - mean[1]) / std[1]
    assert image[1, 3, 30].item() == pytest.approx(expected, abs=1e-5)
    index = splits.val.indices[0]
    assert splits.val[0][1] == fake.train_labels[index]
    assert any(not torch.equal(splits.train[0][0], splits.train[0][0]) for _ in range(5))  # still augmented


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_unverified_mnist_family_reads_the_files_in_place(tmp_path, offline, caplog, name, gzipped):
    fake = write_fake_mnist(tmp_path, n_train=30, n_test=10, folder=MNIST_FOLDERS[name], gzipped=gzipped)
    raw_files = sorted(Path(tmp_path, MNIST_FOLDERS[name], "raw").iterdir())
    with caplog.at_level("INFO"):
        splits = build_datasets(name, root=tmp_path, download=True, val_size=3, verify=False)
    assert len(_notices(caplog)) == 1
    _assert_carved(splits, n_train=30, n_val=3)
    mean, std = MNIST_STATS[name]
    image, label = splits.test[4]
    assert label == fake.test_labels[4]
    assert image[0, 12, 5].item() == pytest.approx((fake.test_images[4, 12, 5] / 255 - mean) / std, abs=1e-5)
    assert sorted(Path(tmp_path, MNIST_FOLDERS[name], "raw").iterdir()) == raw_files  # nothing written


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
def test_unverified_images_equal_the_verified_path(tmp_path, monkeypatch, name):
    """Same files, checksums patched to match: both paths give the same tensors and labels."""
    if name == "mnist":
        write_fake_mnist(tmp_path, n_train=20, n_test=6, gzipped=True)
        patch_mnist_checksums(monkeypatch, tmp_path)
    else:
        write_fake_cifar(tmp_path, n_train=20, n_test=6, num_classes=CIFAR_CLASSES[name])
        patch_cifar_checksums(monkeypatch, tmp_path, CIFAR_CLASSES[name])
    verified = build_datasets(name, root=tmp_path, download=False, val_size=4)
    unverified = build_datasets(name, root=tmp_path, download=False, val_size=4, verify=False)
    for split in ("val", "test", "calib"):
        for index in range(len(getattr(verified, split))):
            (a, a_label), (b, b_label) = getattr(verified, split)[index], getattr(unverified, split)[index]
            assert torch.equal(a, b) and a_label == b_label and type(a_label) is type(b_label)
    assert verified.test.classes == unverified.test.classes


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _rewrite_cifar_batch(path: Path, change) -> None:
    import pickle

    batch = pickle.loads(path.read_bytes())
    change(batch)
    path.write_bytes(pickle.dumps(batch))


class _WritesCanary:
    """Unpickling an instance calls Path.touch on the canary: what a malicious batch could do."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (self.canary,))


CIFAR_FAULTS = {
    "truncated": (lambda path: _truncate(path), "truncated"),
    "empty": (lambda path: path.write_bytes(b""), "truncated"),
    "not a pickle": (lambda path: path.write_bytes(b"GIF89a" + bytes(100)), "not a pickled CIFAR batch"),
    "label out of range": (lambda path: _rewrite_cifar_batch(path, lambda b: b["labels"].__setitem__(2, 10)),
                           "label 10 at position 2, outside 0..9"),
    "wrong row size": (lambda path: _rewrite_cifar_batch(path, lambda b: b.update(data=b["data"][:, :1024])),
                       "shape (8, 1024)"),
    "float data": (lambda path: _rewrite_cifar_batch(path, lambda b: b.update(data=b["data"].astype(np.float32))),
                   "float32"),
    "labels missing": (lambda path: _rewrite_cifar_batch(path, lambda b: b.pop("labels")), "lacks the key(s) labels"),
    "counts differ": (lambda path: _rewrite_cifar_batch(path, lambda b: b["labels"].pop()),
                      "8 images but 7 labels"),
}


@pytest.mark.parametrize("fault", sorted(CIFAR_FAULTS))
def test_unverified_cifar_refuses_a_bad_batch_naming_it(tmp_path, fault):
    write_fake_cifar(tmp_path, n_train=40, n_test=10)  # 8 images per training batch
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    damage, expected = CIFAR_FAULTS[fault]
    damage(batch)
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets("cifar10", root=tmp_path, val_size=4, verify=False)
    message = str(error.value)
    assert str(batch.resolve()) in message and expected in message, message
    assert "\n" not in message and message.count("data_batch") == 1


def test_unverified_cifar_never_runs_code_from_a_batch(tmp_path):
    import pickle

    write_fake_cifar(tmp_path, n_train=10, n_test=5)
    canary = tmp_path / "canary"
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": _WritesCanary(canary), "labels": [0]}))
    pickle.loads(batch.read_bytes())  # the plain unpickler does run it: the test can fail
    assert canary.exists()
    canary.unlink()
    with pytest.raises(DatasetUnavailableError, match=r"refers to pathlib\.(Path\.)?touch.*refused"):
        build_datasets("cifar10", root=tmp_path, val_size=2, verify=False)
    assert not canary.exists()


def _idx_header(path: Path, header: bytes) -> None:
    data = path.read_bytes()
    path.write_bytes(header + data[len(header):])


MNIST_FAULTS = {
    "truncated images": ("train-images-idx3-ubyte", lambda path: _truncate(path, 0.9),
                         "data bytes where its header announces 20x28x28 = 15680: truncated"),
    "header only": ("t10k-labels-idx1-ubyte", lambda path: path.write_bytes(path.read_bytes()[:3]),
                    "fewer than an idx header"),
    "bad magic": ("train-images-idx3-ubyte", lambda path: _idx_header(path, bytes([0, 0, 0x0D, 3])),
                  "magic number 0x00000D03, not 0x00000803"),
    "trailing bytes": ("t10k-images-idx3-ubyte", lambda path: path.write_bytes(path.read_bytes() + bytes(7)),
                       "7 bytes more than its header announces"),
    "fewer labels": ("train-labels-idx1-ubyte", lambda path: _idx_header(path, bytes([0, 0, 8, 1, 0, 0, 0, 19]))
                     or _truncate(path, (8 + 19) / (8 + 20)), "holds 19 labels for the 20 images"),
    "label out of range": ("t10k-labels-idx1-ubyte",
                           lambda path: path.write_bytes(path.read_bytes()[:-1] + bytes([10])),
                           "label 10 at position 5, outside 0..9"),
}


@pytest.mark.parametrize("fault", sorted(MNIST_FAULTS))
def test_unverified_mnist_refuses_a_bad_idx_file_naming_it(tmp_path, fault):
    write_fake_mnist(tmp_path, n_train=20, n_test=6)
    file_name, damage, expected = MNIST_FAULTS[fault]
    path = tmp_path / "MNIST" / "raw" / file_name
    damage(path)
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets("mnist", root=tmp_path, val_size=2, verify=False)
    message = str(error.value)
    assert str(path.resolve()) in message and expected in message, message
    assert "\n" not in message


def test_unverified_mnist_refuses_a_truncated_archive(tmp_path):
    write_fake_mnist(tmp_path, n_train=20, n_test=6, gzipped=True)
    archive = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    _truncate(archive)
    with pytest.raises(DatasetUnavailableError, match="truncated gzip archive") as error:
        build_datasets("mnist", root=tmp_path, val_size=2, verify=False)
    assert str(archive.resolve()) in str(error.value)


@pytest.mark.parametrize("name, missing", [("cifar10", "cifar-10-batches-py/batches.meta"),
                                           ("mnist", "MNIST/raw/t10k-labels-idx1-ubyte")])
def test_unverified_missing_file_is_named_and_nothing_is_downloaded(tmp_path, offline, name, missing):
    write_fake_cifar(tmp_path, n_train=10, n_test=5) if name == "cifar10" else write_fake_mnist(tmp_path)
    Path(tmp_path, missing).unlink()
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets(name, root=tmp_path, download=True, verify=False)
    message = str(error.value)
    assert f"{Path(tmp_path, missing).parent.resolve()}/ lacks {Path(missing).name}" in message
    assert "downloads nothing" in message and "data.verify=true" in message


@pytest.mark.parametrize("verify", [False, True])
def test_root_set_to_the_batches_folder_itself_suggests_its_parent(tmp_path, verify):
    write_fake_cifar(tmp_path, n_train=10, n_test=5)
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets("cifar10", root=tmp_path / "cifar-10-batches-py", download=False, verify=verify)
    assert f"data.root={tmp_path.resolve()})" in str(error.value)


# ----------------------------------------------- data.verify=true: valid but unofficial files are named


@pytest.mark.parametrize("download", [False, True])
def test_verified_refuses_valid_unofficial_cifar_naming_data_verify(tmp_path, offline, download):
    write_fake_cifar(tmp_path, n_train=20, n_test=5)
    folder = tmp_path / "cifar-10-batches-py"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets("cifar10", root=tmp_path, download=download)
    message = str(error.value)
    assert "data.verify=false" in message and "not the official files" in message
    assert "corrupt" not in message and "download" not in message.split("data.verify")[0]
    assert f"data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta in " \
           f"{folder.resolve()}/" in message
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # not downloaded over


def test_verified_refuses_valid_unofficial_mnist_archives_naming_data_verify(tmp_path, offline):
    write_fake_mnist(tmp_path, gzipped=True)
    with pytest.raises(DatasetUnavailableError, match="not the official files.*set data.verify=false"):
        build_datasets("mnist", root=tmp_path, download=True)


def test_verified_names_a_truncated_batch_as_corrupt_with_its_fault(tmp_path, offline):
    write_fake_cifar(tmp_path, n_train=20, n_test=5)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    _truncate(batch)
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets("cifar10", root=tmp_path, download=True)
    message = str(error.value)
    assert f"{batch.resolve()} is corrupt (it ends early" in message and "truncated" in message
    assert "data.verify" not in message  # verify=false would not help


# ----------------------------------------------------------------------- config and abc-eval


def test_data_verify_defaults_to_true_and_a_non_boolean_is_refused(compose_cfg):
    from hydra.errors import ConfigCompositionException

    assert compose_cfg().data.verify is True
    assert compose_cfg(["data.verify=false"]).data.verify is False
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg(["data.verify=maybe"])
    chain = f"{error.value} {error.value.__cause__}"
    assert "data.verify" in chain and "bool" in chain


def test_cifar10_subset_preset_is_a_cpu_recipe_without_a_baked_root(compose_cfg):
    cfg = compose_cfg(["experiment=cifar10_subset_resnet20"])
    assert (cfg.dataset.name, cfg.model.name, str(cfg.device)) == ("cifar10", "resnet20", "cpu")
    assert cfg.data.verify is False and cfg.data.root == "data"
    assert (cfg.abc.M, cfg.abc.N, cfg.abc.calibration.batches) == (5, 5, 4)
    assert (str(cfg.pretrain.optimizer), cfg.pretrain.lr, cfg.pretrain.epochs) == ("sgd", 0.1, 30)
    assert (str(cfg.finetune.optimizer), cfg.finetune.lr, cfg.finetune.epochs) == ("adam", 2e-4, 8)


def _cifar_run_summary(root: Path, data: dict):
    from abc_experiments.results import ABCSetting, RunSummary

    config = {"dataset": {"name": "cifar10"}, "seed": 0, "finetune": {"eval_batch_size": 4},
              "data": {"root": str(root), "download": False, "val_fraction": 0.1, "num_workers": 0, **data}}
    return RunSummary(dataset="cifar10", model="resnet20", seed=0, abc=ABCSetting(2, 2), run_dir=str(root),
                      config=config, input_shape=[3, 32, 32], num_classes=10)


def test_abc_eval_reads_data_verify_from_the_run_with_true_for_old_runs(tmp_path):
    from abc_experiments.runs import RunError, test_loader

    write_fake_cifar(tmp_path, n_train=20, n_test=6)
    old_run = _cifar_run_summary(tmp_path, {})  # written before data.verify existed
    with pytest.raises(DatasetUnavailableError, match="data.verify=false"):
        test_loader(old_run)
    loader, config = test_loader(old_run, ["data.verify=false"])
    assert len(loader.dataset) == 6 and config.data.verify is False
    assert len(test_loader(_cifar_run_summary(tmp_path, {"verify": False}))[0].dataset) == 6
    with pytest.raises(RunError, match="data.verify='maybe' is not true or false"):
        test_loader(old_run, ["data.verify=maybe"])
