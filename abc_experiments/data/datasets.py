"""Datasets of the experiments, split into train / validation / test / calibration sets.

``build_datasets(name, ...)`` returns a :class:`DataSplits` for one of the datasets of
:data:`DATASET_REGISTRY` (its names: :data:`DATASETS`):

* ``digits``: scikit-learn's 1,797 8×8 handwritten digits (bundled, nothing to download).
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: torchvision's classes under ``root``.
  With ``verify=False`` any files in the official format are read (a subset, a relabelled copy):
  the official MD5 check is skipped, and :mod:`.formats` checks the format instead.
* ``imagenet``: ``torchvision.datasets.ImageFolder`` over ``root/imagenet/{train,val}``.

The validation set is always a seeded random carve of the *training* set and is read with the
evaluation transforms (no augmentation); the test set is the official test split (for digits, a
fixed carve that does not depend on the seed). When files are missing and cannot be downloaded,
:class:`DatasetUnavailableError` says which files are expected, where, and how to get them.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchvision.datasets as tvd
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets.utils import check_integrity

from .formats import DatasetFormatError, read_cifar_label_names, read_cifar_split, read_idx, read_mnist_split

log = logging.getLogger(__name__)

# Statistics of sklearn's digits (pixels 0..16 scaled to [0, 1]) over all 1,797 images.
DIGITS_MAX_PIXEL = 16.0
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760
# Fraction of the digits held out as the test set, always carved with the same seed.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetUnavailableError(RuntimeError):
    """The dataset's files are missing, unreadable, or (with ``verify``) not the official files."""


@dataclass
class DataSplits:
    """The four datasets of one experiment and the shape of its images.

    ``train`` carries the training augmentation; ``val`` (carved from the training set),
    ``test`` (the official test split) and ``calib`` (the training subset again, for
    calibration batches) use the evaluation transforms.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    in_channels: int
    image_size: int
    num_classes: int
    calib: Dataset


# --------------------------------------------------------------------------------------------
# MNIST family: read the gzipped archives in place when they are not unpacked.


def _read_idx_gz(path: str) -> torch.Tensor:
    """Read a gzipped idx file of unsigned bytes (the MNIST format) as a uint8 tensor."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim).reshape(shape)


class _GzipArchiveFallback:
    """Mixin for torchvision's MNIST-family classes: also read verified ``.gz`` archives in place.

    torchvision only reads the unpacked idx files, and unpacks the archives into ``raw/`` when
    ``download=True``; that fails on a read-only copy holding only the four ``.gz`` files (e.g. a
    shared dataset folder). With this mixin such archives are read directly and nothing is written.
    The subclasses keep torchvision's class names, which name the folder under ``root``.
    """

    def _check_exists(self) -> bool:
        return super()._check_exists() or self._archives_verified()

    def _archives_verified(self) -> bool:
        return all(check_integrity(os.path.join(self.raw_folder, name), md5) for name, md5 in self.resources)

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if super()._check_exists():
            return super()._load_data()
        prefix = "train" if self.train else "t10k"
        images = _read_idx_gz(os.path.join(self.raw_folder, f"{prefix}-images-idx3-ubyte.gz"))
        labels = _read_idx_gz(os.path.join(self.raw_folder, f"{prefix}-labels-idx1-ubyte.gz"))
        return images, labels.long()


class MNIST(_GzipArchiveFallback, tvd.MNIST):
    """torchvision's MNIST, also reading ``MNIST/raw/*.gz`` in place."""


class FashionMNIST(_GzipArchiveFallback, tvd.FashionMNIST):
    """torchvision's FashionMNIST, also reading ``FashionMNIST/raw/*.gz`` in place."""


# --------------------------------------------------------------------------------------------
# torchvision datasets with an official train/test split.


@dataclass(frozen=True)
class _TorchvisionSpec:
    """What :func:`build_datasets` needs to know about one torchvision dataset."""

    dataset_class: type
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_and_flip: bool  # CIFAR augmentation: RandomCrop(32, padding=4) + RandomHorizontalFlip
    files: str  # the files expected, for the error message
    folder: str  # where they go, relative to root
    url: str  # where to download them by hand
    root_example: str = ""  # a data.root known to hold the files, for the error message
    label_key: str = ""  # CIFAR: the key of a batch's labels


def _mnist_files(dataset_class: type) -> str:
    names = ", ".join(name for name, _ in dataset_class.resources)
    return f"{names} (gzipped, or unpacked without the .gz)"


def _cifar_files(dataset_class: type, batches: str) -> str:
    return (
        f"{dataset_class.filename} (download=True unpacks it, without network access), "
        f"or its unpacked folder {dataset_class.base_folder}/ ({batches})"
    )


_TORCHVISION_SPECS: dict[str, _TorchvisionSpec] = {
    "mnist": _TorchvisionSpec(
        dataset_class=MNIST, in_channels=1, image_size=28, num_classes=10,
        mean=(0.1307,), std=(0.3081,), crop_and_flip=False,
        files=_mnist_files(MNIST), folder="MNIST/raw", url=MNIST.mirrors[0],
        root_example="data.root=../shared/datasets",
    ),
    "fashion_mnist": _TorchvisionSpec(
        dataset_class=FashionMNIST, in_channels=1, image_size=28, num_classes=10,
        mean=(0.2860,), std=(0.3530,), crop_and_flip=False,
        files=_mnist_files(FashionMNIST), folder="FashionMNIST/raw", url=FashionMNIST.mirrors[0],
    ),
    "cifar10": _TorchvisionSpec(
        dataset_class=tvd.CIFAR10, in_channels=3, image_size=32, num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_and_flip=True,
        files=_cifar_files(tvd.CIFAR10, "data_batch_1..5, test_batch, batches.meta"), folder="",
        url=tvd.CIFAR10.url, label_key="labels",
    ),
    "cifar100": _TorchvisionSpec(
        dataset_class=tvd.CIFAR100, in_channels=3, image_size=32, num_classes=100,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), crop_and_flip=True,
        files=_cifar_files(tvd.CIFAR100, "train, test, meta"), folder="", url=tvd.CIFAR100.url,
        label_key="fine_labels",
    ),
}


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checksummed_files(spec: _TorchvisionSpec, root: str) -> list[tuple[Path, str]]:
    """(path, md5) of every file torchvision verifies for this dataset: the MNIST archives, or
    CIFAR's archive, its unpacked batches and meta file."""
    cls = spec.dataset_class
    if hasattr(cls, "resources"):  # MNIST family: <root>/<ClassName>/raw/<archive>
        return [(Path(root, cls.__name__, "raw", name), md5) for name, md5 in cls.resources]
    folder = Path(root, cls.base_folder)
    files = [(Path(root, cls.filename), cls.tgz_md5)]
    files += [(folder / name, md5) for name, md5 in cls.train_list + cls.test_list]
    return files + [(folder / cls.meta["filename"], cls.meta["md5"])]


def _format_problem(spec: _TorchvisionSpec, path: Path) -> str | None:
    """What is wrong with the format of one of the dataset's files; None when it reads correctly."""
    try:
        if path.name.endswith(".tar.gz"):
            return "does not match the official archive's MD5 checksum: truncated or altered"
        if spec.label_key and path.name == spec.dataset_class.meta["filename"]:
            read_cifar_label_names(path, spec.dataset_class.meta["key"], spec.num_classes)
        elif spec.label_key:
            read_cifar_split([path], spec.label_key, spec.num_classes)
        else:
            read_idx(path, 3 if "-images-" in path.name else 1)
    except DatasetFormatError as error:
        return error.problem
    return None


def _unofficial_files(spec: _TorchvisionSpec, root: str) -> list[tuple[Path, str | None]]:
    """The dataset's files that are present but fail their official MD5 check, each with what is
    wrong with its format (None: a valid file, just not the official bytes)."""
    return [(path, _format_problem(spec, path)) for path, md5 in _checksummed_files(spec, root)
            if path.is_file() and not check_integrity(str(path), md5)]


def _broken_message(name: str, spec: _TorchvisionSpec, broken: list[tuple[Path, str]]) -> str:
    faults = "; ".join(f"{path.resolve()} is corrupt (it {problem})" for path, problem in broken)
    one = len(broken) == 1
    return (
        f"Dataset '{name}' is not available: {faults}. Delete {'it' if one else 'them'} and put a good "
        f"copy there (from {spec.url}), or set data.root= to a folder with intact files."
    )


def _not_official_message(name: str, valid: list[Path]) -> str:
    folder = valid[0].parent.resolve()
    same_folder = all(path.parent.resolve() == folder for path in valid)
    names = ", ".join(path.name if same_folder else str(path.resolve()) for path in valid)
    one = len(valid) == 1
    where = f" in {folder}/" if same_folder else ""
    return (
        f"Dataset '{name}': {names}{where} {'is a valid file' if one else 'are valid files'} "
        f"in the official format but not the official {'file' if one else 'files'} (the MD5 checksum "
        f"differs: a subset, relabelled or otherwise modified copy). data.verify=true (the default) reads "
        f"only the official files; to read {'it' if one else 'them'} as {'it is' if one else 'they are'}, "
        f"set data.verify=false (the format is still checked)."
    )


def _refuse_unofficial(name: str, spec: _TorchvisionSpec, root: str) -> None:
    """Refuse, before torchvision may download over them, files in the official format that are
    not the official files (with ``verify``). Corrupt files are left to torchvision, which
    replaces them when it can download."""
    unofficial = _unofficial_files(spec, root)
    if unofficial and all(problem is None for _, problem in unofficial):
        raise DatasetUnavailableError(_not_official_message(name, [path for path, _ in unofficial]))


def _root_hint(spec: _TorchvisionSpec, root: str) -> str:
    """A parenthesised hint when ``root`` looks like a near miss: the files sit higher up than the
    sub-folder torchvision reads (e.g. data.root set to cifar-10-batches-py/ itself), or CIFAR's
    archive is there but not unpacked; empty otherwise."""
    cls = spec.dataset_class
    if spec.label_key:
        first, subfolder = cls.train_list[0][0], Path(cls.base_folder)
    else:
        first, subfolder = cls.resources[0][0].removesuffix(".gz"), Path(cls.__name__, "raw")
    for folder in (Path(root), Path(root, "raw"), Path(root, cls.__name__)):
        if (folder / first).is_file() or (folder / f"{first}.gz").is_file():
            folder = folder.resolve()
            depth = len(subfolder.parts)
            fix = (f"data.root={folder.parents[depth - 1]}" if folder.parts[-depth:] == subfolder.parts
                   else f"the files go in <data.root>/{subfolder}/")
            return f" ({folder}/ holds the files, but data.root is the folder that contains {subfolder}/: {fix})"
    if spec.label_key and Path(root, cls.filename).is_file():
        return f" ({cls.filename} is in {Path(root).resolve()}/ but not unpacked: tar xzf it there)"
    return ""


def _unavailable_message(
    name: str, spec: _TorchvisionSpec, root: str, download: bool, error: BaseException
) -> str:
    folder = Path(root, spec.folder).resolve()
    unofficial = _unofficial_files(spec, root)
    broken = [(path, problem) for path, problem in unofficial if problem is not None]
    if broken:
        return _broken_message(name, spec, broken)
    if unofficial:
        return _not_official_message(name, [path for path, _ in unofficial])
    if download:
        reason = f"its files are not in place and downloading them failed ({_one_line(error)})"
    else:
        reason = "its files were not found (or are corrupted) and download=False"
    example = f", e.g. {spec.root_example}" if spec.root_example else ""
    return (
        f"Dataset '{name}' is not available: {reason}. "
        f"Expected {spec.files} in {folder}/{_root_hint(spec, root)}. "
        f"To fix: download them by hand from {spec.url} into that folder, "
        f"or set data.root= to a folder that already has them{example}."
    )


def _load_torchvision(
    name: str, spec: _TorchvisionSpec, root: str, train: bool, transform: Callable, download: bool
) -> Dataset:
    """One split of a torchvision dataset; missing files become :class:`DatasetUnavailableError`."""
    try:
        return spec.dataset_class(root, train=train, transform=transform, download=download)
    except (RuntimeError, OSError) as error:  # torchvision's "not found", URLError, unpacking errors
        raise DatasetUnavailableError(_unavailable_message(name, spec, root, download, error)) from error


# --------------------------------------------------------------------------------------------
# data.verify=false: the files in place, their format checked by .formats, no MD5.


class _FromArrays:
    """Mixin for a torchvision dataset class: take the arrays read by :mod:`.formats` instead of
    reading (and verifying) the files, and keep the class's ``__getitem__``, so that every image
    goes through exactly the conversions of the verified path."""

    def __init__(self, root: str, train: bool, transform: Callable, data, targets, classes: list[str]):
        tvd.VisionDataset.__init__(self, root, transform=transform)
        self.train, self.data, self.targets, self.classes = train, data, targets, classes


class _CIFARFromArrays(_FromArrays, tvd.CIFAR10):
    """A CIFAR split (either size) from arrays: ``data`` (N, 32, 32, 3) uint8, ``targets`` ints."""


class _MNISTFromArrays(_FromArrays, tvd.MNIST):
    """An MNIST-family split from arrays: ``data`` (N, 28, 28) uint8 tensor, ``targets`` int64 tensor."""


def _unverified_files(name: str, spec: _TorchvisionSpec, root: str) -> dict[str, Path]:
    """The files to read with ``verify=False``, by role; :class:`DatasetUnavailableError` names the
    missing ones. MNIST files are taken unpacked, else gzipped."""
    cls = spec.dataset_class
    if spec.label_key:  # CIFAR: <root>/<base_folder>/<batches>, <meta>
        folder = Path(root, cls.base_folder)
        names = {f"train{i}": name for i, (name, _) in enumerate(cls.train_list)}
        names.update({f"test{i}": name for i, (name, _) in enumerate(cls.test_list)}, meta=cls.meta["filename"])
        files = {role: folder / file_name for role, file_name in names.items()}
        missing = [path.name for path in files.values() if not path.is_file()]
    else:  # MNIST family: <root>/<ClassName>/raw/<name>[.gz]
        folder = Path(root, cls.__name__, "raw")
        files, missing = {}, []
        for archive_name, _ in cls.resources:
            plain, gzipped = folder / archive_name.removesuffix(".gz"), folder / archive_name
            role = archive_name.removesuffix("-ubyte.gz")
            files[role] = plain if plain.is_file() else gzipped
            if not files[role].is_file():
                missing.append(f"{plain.name}[.gz]")
    if missing:
        lacks = f"{folder.resolve()}/ lacks {', '.join(missing)}{_root_hint(spec, root)}"
        raise DatasetUnavailableError(
            f"Dataset '{name}' is not available: {lacks}. "
            f"data.verify=false reads the files in place and downloads nothing: put files in the official "
            f"format there, set data.root= to a folder that has them, or set data.verify=true to download "
            f"the official files."
        )
    return files


def _read_unverified(name: str, spec: _TorchvisionSpec, root: str, train_transform: Callable,
                     eval_transform: Callable) -> tuple[Dataset, Dataset, Dataset]:
    """(train with ``train_transform``, train with ``eval_transform``, test) from the files in place,
    read once and format-checked; :class:`DatasetUnavailableError` names a file that is missing,
    unreadable or not in the official format."""
    files = _unverified_files(name, spec, root)
    try:
        if spec.label_key:
            classes = read_cifar_label_names(files["meta"], spec.dataset_class.meta["key"], spec.num_classes)
            splits = {
                train: read_cifar_split([path for role, path in files.items() if role.startswith(prefix)],
                                        spec.label_key, spec.num_classes)
                for train, prefix in ((True, "train"), (False, "test"))
            }
            dataset_class = _CIFARFromArrays
        else:
            classes = list(spec.dataset_class.classes)
            splits = {}
            for train, prefix in ((True, "train"), (False, "t10k")):
                images, labels = read_mnist_split(files[f"{prefix}-images-idx3"], files[f"{prefix}-labels-idx1"],
                                                  spec.image_size, spec.num_classes)
                splits[train] = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))
            dataset_class = _MNISTFromArrays
    except DatasetFormatError as error:
        raise DatasetUnavailableError(
            f"Dataset '{name}' is not available: {error.path.resolve()} {error.problem}. "
            f"Replace it with a file in the official format, or set data.root= to a folder with intact files."
        ) from None

    def split(train: bool, transform: Callable) -> Dataset:
        return dataset_class(root, train, transform, *splits[train], classes)

    return split(True, train_transform), split(True, eval_transform), split(False, eval_transform)


# --------------------------------------------------------------------------------------------


def _torchvision_transforms(spec: _TorchvisionSpec, augment: bool) -> tuple[Callable, Callable]:
    """(train, eval) transforms: ToTensor + Normalize, with CIFAR's crop and flip for training."""
    to_tensor = [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    augmentation = []
    if augment and spec.crop_and_flip:
        augmentation = [transforms.RandomCrop(spec.image_size, padding=4), transforms.RandomHorizontalFlip()]
    return transforms.Compose(augmentation + to_tensor), transforms.Compose(to_tensor)


def _build_torchvision(
    name: str, root: str, download: bool, augment: bool, val_fraction: float, val_size: int | None, seed: int,
    verify: bool = True,
) -> DataSplits:
    spec = _TORCHVISION_SPECS[name]
    train_transform, eval_transform = _torchvision_transforms(spec, augment)
    if verify:
        _refuse_unofficial(name, spec, root)
        train_augmented = _load_torchvision(name, spec, root, True, train_transform, download)
        train_plain = _load_torchvision(name, spec, root, True, eval_transform, download)
        test = _load_torchvision(name, spec, root, False, eval_transform, download)
    else:
        log.info("data.verify=false: reading dataset '%s' from %s without the official MD5 check "
                 "(the file format is checked)", name, Path(root).resolve())
        train_augmented, train_plain, test = _read_unverified(name, spec, root, train_transform, eval_transform)
    return _carve_splits(
        name, train_augmented, train_plain, test, val_fraction, val_size, seed,
        in_channels=spec.in_channels, image_size=spec.image_size, num_classes=spec.num_classes,
    )


# --------------------------------------------------------------------------------------------
# ImageNet (ImageFolder, never downloaded).


def _imagenet_message(folder: Path, reason: str) -> str:
    return (
        f"Dataset 'imagenet' is not available: {reason}. "
        f"ImageNet cannot be downloaded automatically; expected the ImageFolder layout "
        f"{folder}/train/<class>/*.JPEG and {folder}/val/<class>/*.JPEG, with the same class folders "
        f"(e.g. n01440764) in both (the official flat ILSVRC2012 validation images must first be "
        f"sorted into class folders). Get ILSVRC2012 from https://image-net.org/download.php, "
        f"or set data.root= to a folder that has imagenet/train and imagenet/val."
    )


def _load_image_folder(folder: Path, transform: Callable) -> tvd.ImageFolder:
    try:
        return tvd.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise DatasetUnavailableError(_imagenet_message(folder.parent, _one_line(error))) from error


def _build_imagenet(
    root: str, download: bool, augment: bool, val_fraction: float, val_size: int | None, seed: int,
    verify: bool = True,
) -> DataSplits:
    del download, verify  # ImageNet is never downloaded, and has no official checksums
    folder = Path(root, "imagenet").resolve()
    missing = [str(folder / split) for split in ("train", "val") if not (folder / split).is_dir()]
    if missing:
        raise DatasetUnavailableError(_imagenet_message(folder, f"missing folder(s) {', '.join(missing)}"))
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    eval_transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), *normalize])
    train_transform = eval_transform
    if augment:
        train_transform = transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), *normalize]
        )
    train_augmented = _load_image_folder(folder / "train", train_transform)
    train_plain = _load_image_folder(folder / "train", eval_transform)
    test = _load_image_folder(folder / "val", eval_transform)
    if test.classes != train_plain.classes:
        raise DatasetUnavailableError(
            _imagenet_message(folder, "the class folders of val/ differ from those of train/")
        )
    return _carve_splits(
        "imagenet", train_augmented, train_plain, test, val_fraction, val_size, seed,
        in_channels=3, image_size=224, num_classes=len(train_plain.classes),
    )


# --------------------------------------------------------------------------------------------
# sklearn digits.


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 8×8 digits as normalised float (1, 8, 8) images with int labels."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits  # imported here: slow, and only digits need it

        digits = load_digits()
        pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_PIXEL
        self.images = (pixels - DIGITS_MEAN) / DIGITS_STD
        self.targets = torch.as_tensor(digits.target, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def _build_digits(
    root: str, download: bool, augment: bool, val_fraction: float, val_size: int | None, seed: int,
    verify: bool = True,
) -> DataSplits:
    """Fixed test carve (seed 0, 20 %), then a ``seed``-dependent validation carve of the rest.
    Bundled with scikit-learn: no files, no download, no augmentation."""
    del root, download, augment, verify
    digits = DigitsDataset()
    all_indices = list(range(len(digits)))
    pool, test_indices = _carve(all_indices, round(DIGITS_TEST_FRACTION * len(digits)), DIGITS_TEST_SEED)
    train_indices, val_indices = _carve(pool, _validation_count(len(pool), val_fraction, val_size), seed)
    return DataSplits(
        name="digits",
        train=Subset(digits, train_indices),
        val=Subset(digits, val_indices),
        test=Subset(digits, test_indices),
        in_channels=1,
        image_size=8,
        num_classes=10,
        calib=Subset(digits, train_indices),
    )


# --------------------------------------------------------------------------------------------
# Validation carve.


def _validation_count(n_train: int, val_fraction: float, val_size: int | None) -> int:
    count = val_size if val_size is not None else round(val_fraction * n_train)
    if not 0 < count < n_train:
        raise ValueError(
            f"The validation set must hold between 1 and {n_train - 1} of the {n_train} training "
            f"images; got val_size={val_size}, val_fraction={val_fraction} ({count} images)."
        )
    return count


def _carve(indices: Sequence[int], n_carved: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``indices`` at random (seeded) into ``(rest, carved)``, each sorted."""
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    carved = sorted(indices[i] for i in order[:n_carved])
    rest = sorted(indices[i] for i in order[n_carved:])
    return rest, carved


def _carve_splits(
    name: str,
    train_augmented: Dataset,
    train_plain: Dataset,
    test: Dataset,
    val_fraction: float,
    val_size: int | None,
    seed: int,
    in_channels: int,
    image_size: int,
    num_classes: int,
) -> DataSplits:
    """Carve the validation set out of the training set.

    The same indices index both instances of the training set (one with the training
    augmentation, one with the evaluation transforms), so train is augmented and val and
    calib are not.
    """
    n_train = len(train_plain)
    n_val = _validation_count(n_train, val_fraction, val_size)
    train_indices, val_indices = _carve(range(n_train), n_val, seed)
    return DataSplits(
        name=name,
        train=Subset(train_augmented, train_indices),
        val=Subset(train_plain, val_indices),
        test=test,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        calib=Subset(train_plain, train_indices),
    )


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset: its builder ``build(root, download, augment, val_fraction, val_size, seed,
    verify=...)``."""

    name: str
    build: Callable[..., DataSplits]


# The one table of datasets: the config's choices, build_datasets and its errors all read it.
DATASET_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, build: Callable[..., DataSplits]) -> None:
    if name in DATASET_REGISTRY:
        raise ValueError(f"dataset {name!r} is registered twice")
    DATASET_REGISTRY[name] = DatasetEntry(name, build)


register_dataset("digits", _build_digits)
for _name in _TORCHVISION_SPECS:
    register_dataset(_name, partial(_build_torchvision, _name))
register_dataset("imagenet", _build_imagenet)
DATASETS: tuple[str, ...] = tuple(DATASET_REGISTRY)


def build_datasets(
    name: str,
    root: str | os.PathLike = "data",
    download: bool = True,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    val_size: int | None = None,
    verify: bool = True,
) -> DataSplits:
    """Build the train / val / test / calib datasets of ``name`` (one of :data:`DATASETS`).

    Args:
        name: dataset name.
        root: folder holding (or receiving) the dataset files; unused by ``digits``.
        download: let torchvision download missing files (never for ``imagenet``/``digits``).
        val_fraction: fraction of the training set carved out as validation set.
        seed: seed of the validation carve (the test split never depends on it).
        augment: use the training augmentation (CIFAR crop+flip, ImageNet random resized crop);
            MNIST, FashionMNIST and digits have none.
        val_size: number of validation images; overrides ``val_fraction`` when given.
        verify: accept only the official files (their MD5 checksums). With ``False``, any files in
            the official format are read as they are, nothing is downloaded, the log says so once,
            and the format is checked (MNIST, FashionMNIST, CIFAR-10/100; the others ignore it).

    Returns:
        The train / val / test / calib datasets and the shape of their images.

    Raises:
        ValueError: unknown ``name`` or an impossible validation size.
        DatasetUnavailableError: the files are missing and could not be downloaded, a file is
            unreadable or not in the official format (named), or, with ``verify``, valid files are
            not the official ones (the message names ``data.verify=false``).
    """
    if name not in DATASET_REGISTRY:
        raise ValueError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASET_REGISTRY[name].build(os.fspath(root), download, augment, val_fraction, val_size, seed,
                                        verify=verify)
