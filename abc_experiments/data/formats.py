"""Readers of the official CIFAR and MNIST file formats that check the format, not the bytes.

``data.verify=false`` reads a folder of files in the official format that are not the official
download (a subset, a relabelled or cleaned copy), so nothing here trusts the files:

* CIFAR python batches are unpickled by :class:`_ArrayUnpickler`, which resolves only the three
  numpy names an array needs (and ``_codecs.encode``, which Python 3 pickles of bytes use) and
  refuses every other global, so a file cannot run code. A batch must be a dict with ``data``, an
  N x 3072 uint8 array, and N integer labels in ``[0, num_classes)``.
* MNIST idx files (gzipped or not) must carry the magic number of an idx file of unsigned bytes
  with the expected number of dimensions, and exactly the bytes their header announces.

Every fault is a :class:`DatasetFormatError` that names the file and says what is wrong with it.
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

CIFAR_IMAGE_SIZE = 32
CIFAR_ROW_BYTES = 3 * CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE  # 1024 red, 1024 green, 1024 blue
IDX_UNSIGNED_BYTE = 0x08
IDX_HEADER_BYTES = 4


class DatasetFormatError(ValueError):
    """A dataset file that is unreadable or not in its official format.

    Attributes:
        path: the file.
        problem: what is wrong with it, as the end of a sentence that starts with the path.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path} {problem}")


# ------------------------------------------------------------------------------------------------
# CIFAR python batches.


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array refers to, under the module names numpy 1 and 2 use."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy(._core).multiarray._reconstruct
    from_buffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._core).numeric._frombuffer (protocol 5)
    names = {}
    for core in ("numpy.core", "numpy._core"):
        names[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        names[(f"{core}.numeric", "_frombuffer")] = from_buffer
    names[("numpy", "ndarray")] = np.ndarray
    names[("numpy", "dtype")] = np.dtype
    names[("_codecs", "encode")] = codecs.encode  # bytes pickled by Python 3 with protocol < 3
    return names


_ALLOWED_GLOBALS = _numpy_globals()


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain Python data and numpy arrays."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR batch never holds; refused, as loading it "
                "could run code"
            ) from None


def _unpickle(path: Path) -> object:
    """The object pickled in ``path``, read with :class:`_ArrayUnpickler` (Python 2 strings as latin-1)."""
    try:
        with open(path, "rb") as file:
            return _ArrayUnpickler(file, encoding="latin1").load()
    except OSError as error:
        raise DatasetFormatError(path, f"cannot be read ({error.strerror or error})") from None
    except EOFError:
        raise DatasetFormatError(path, f"ends early, after {path.stat().st_size} bytes: truncated") from None
    except pickle.UnpicklingError as error:
        text = str(error)
        if "truncated" in text:
            raise DatasetFormatError(path, f"ends early, after {path.stat().st_size} bytes: truncated") from None
        raise DatasetFormatError(path, f"is not a pickled CIFAR batch ({text})") from None
    except Exception as error:  # a damaged pickle fails in many ways (KeyError, ValueError, ...)
        raise DatasetFormatError(path, f"is not a pickled CIFAR batch ({type(error).__name__}: {error})") from None


def _string_keys(path: Path, entry: object, what: str) -> dict:
    if not isinstance(entry, dict):
        raise DatasetFormatError(path, f"holds a {type(entry).__name__}, not the dict of a CIFAR {what}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}


class CifarBatch(NamedTuple):
    """One CIFAR batch: ``data`` (N, 3072) uint8 rows and ``labels`` (N,) int64."""

    data: np.ndarray
    labels: np.ndarray


def read_cifar_batch(path: str | Path, label_key: str, num_classes: int) -> CifarBatch:
    """Read and check one CIFAR python batch (``data_batch_1``, ``test_batch``, ``train``...).

    Args:
        path: the pickled batch.
        label_key: the key of its labels: ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100).
        num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
        The batch's pixel rows and labels.

    Raises:
        DatasetFormatError: the file is unreadable, truncated, refers to code, or is not a batch
            of N x 3072 uint8 rows with N labels in range.
    """
    path = Path(path)
    entry = _string_keys(path, _unpickle(path), "batch")
    missing = [key for key in ("data", label_key) if key not in entry]
    if missing:
        raise DatasetFormatError(path, f"lacks the key(s) {', '.join(missing)} of a CIFAR batch "
                                       f"(it has {', '.join(map(str, entry)) or 'none'})")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        found = (f"a {data.dtype} array of shape {tuple(data.shape)}" if isinstance(data, np.ndarray)
                 else f"a {type(data).__name__}")
        raise DatasetFormatError(path, f"holds {found} as data, not N x {CIFAR_ROW_BYTES} uint8 rows (32x32 RGB)")
    try:
        labels = np.asarray(entry[label_key])
    except Exception as error:  # ragged or odd label lists
        raise DatasetFormatError(path, f"holds labels that are not a list of integers ({error})") from None
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise DatasetFormatError(path, f"holds {label_key} that are not a list of integers")
    if len(labels) != len(data):
        raise DatasetFormatError(path, f"holds {len(data)} images but {len(labels)} {label_key}")
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        index = int(np.flatnonzero(out_of_range)[0])
        raise DatasetFormatError(path, f"holds label {int(labels[index])} at position {index}, outside "
                                       f"0..{num_classes - 1}")
    return CifarBatch(data, labels.astype(np.int64))


def read_cifar_label_names(path: str | Path, names_key: str, num_classes: int) -> list[str]:
    """Read and check a CIFAR meta file (``batches.meta``, ``meta``).

    Args:
        path: the pickled meta file.
        names_key: the key of the class names: ``label_names`` or ``fine_label_names``.
        num_classes: the number of names it must hold.

    Returns:
        The class names.

    Raises:
        DatasetFormatError: the file is unreadable or lacks ``num_classes`` names under ``names_key``.
    """
    path = Path(path)
    entry = _string_keys(path, _unpickle(path), "meta file")
    names = entry.get(names_key)
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        raise DatasetFormatError(path, f"lacks the {num_classes} class names a CIFAR meta file holds under "
                                       f"{names_key}")
    return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


def read_cifar_split(
    paths: list[Path], label_key: str, num_classes: int
) -> tuple[np.ndarray, list[int]]:
    """Read the batches of one split, as torchvision's CIFAR classes hold them.

    Args:
        paths: the split's batch files, in order.
        label_key, num_classes: as for :func:`read_cifar_batch`.

    Returns:
        The images as an (N, 32, 32, 3) uint8 array (HWC) and the labels as a list of ints.
    """
    batches = [read_cifar_batch(path, label_key, num_classes) for path in paths]
    rows = np.vstack([batch.data for batch in batches])
    images = rows.reshape(-1, 3, CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE).transpose(0, 2, 3, 1)
    labels = [int(label) for batch in batches for label in batch.labels]
    return images, labels


# ------------------------------------------------------------------------------------------------
# MNIST idx files.


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, un-gzipped when its name ends with ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as file:
                return file.read()
        return path.read_bytes()
    except EOFError:
        raise DatasetFormatError(path, "ends early: a truncated gzip archive") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DatasetFormatError(path, f"is not a readable gzip archive ({error})") from None
    except OSError as error:
        raise DatasetFormatError(path, f"cannot be read ({error.strerror or error})") from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read and check an idx file of unsigned bytes (the MNIST format), gzipped or not.

    Args:
        path: the file; read through gzip when its name ends with ``.gz``.
        ndim: the number of dimensions it must have (3 for images, 1 for labels).

    Returns:
        The uint8 array, of the shape its header gives.

    Raises:
        DatasetFormatError: unreadable, a wrong magic number, or not the bytes the header announces.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header_bytes = IDX_HEADER_BYTES + 4 * ndim
    expected_magic = (IDX_UNSIGNED_BYTE << 8) | ndim
    if len(raw) < IDX_HEADER_BYTES:
        raise DatasetFormatError(path, f"holds {len(raw)} bytes, fewer than an idx header: empty or truncated")
    magic = struct.unpack(">I", raw[:IDX_HEADER_BYTES])[0]
    if magic != expected_magic:
        raise DatasetFormatError(path, f"starts with the magic number 0x{magic:08X}, not 0x{expected_magic:08X} "
                                       f"(an idx file of unsigned bytes with {ndim} dimension(s))")
    if len(raw) < header_bytes:
        raise DatasetFormatError(path, f"ends inside its idx header ({len(raw)} bytes): truncated")
    shape = struct.unpack(f">{ndim}I", raw[IDX_HEADER_BYTES:header_bytes])
    expected = math.prod(shape)
    found = len(raw) - header_bytes
    if found < expected:
        raise DatasetFormatError(path, f"holds {found} data bytes where its header announces "
                                       f"{'x'.join(map(str, shape))} = {expected}: truncated")
    if found > expected:
        raise DatasetFormatError(path, f"holds {found - expected} bytes more than its header announces "
                                       f"({'x'.join(map(str, shape))} = {expected})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def read_mnist_split(
    images_path: str | Path, labels_path: str | Path, image_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one MNIST split: an idx3 image file and the idx1 file of its labels.

    Args:
        images_path, labels_path: the two idx files (gzipped or not).
        image_size: the images must be ``image_size`` x ``image_size``.
        num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
        The (N, H, W) uint8 images and the (N,) uint8 labels.

    Raises:
        DatasetFormatError: either file is unreadable or malformed, or the two do not match.
    """
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[1:] != (image_size, image_size):
        raise DatasetFormatError(images_path, f"holds {images.shape[1]}x{images.shape[2]} images, not "
                                              f"{image_size}x{image_size}")
    if len(labels) != len(images):
        raise DatasetFormatError(labels_path, f"holds {len(labels)} labels for the {len(images)} images of "
                                              f"{Path(images_path).name}")
    if labels.size and labels.max() >= num_classes:
        index = int(np.flatnonzero(labels >= num_classes)[0])
        raise DatasetFormatError(labels_path, f"holds label {int(labels[index])} at position {index}, outside "
                                              f"0..{num_classes - 1}")
    return images, labels
