"""Which torch device a run uses: ``device=auto|cpu|cuda|mps`` resolved against this machine.

Torch is imported only when a device is resolved, so a command can check a device's name
(:func:`check_device_name`) before paying for the import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


class DeviceUnavailableError(ValueError):
    """The device asked for does not exist here; the message names the alternatives."""


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def check_device_name(name: str, option: str = "device=") -> None:
    """Refuse a name that is no device at all (``foo``), without importing torch.

    Args:
        name: the device as given.
        option: how the user gave it, for the message (``"device="``, or ``"--device "`` for a flag).

    Raises:
        DeviceUnavailableError: ``name`` is not ``auto``, ``cpu``, ``cuda``, ``cuda:K`` or ``mps``.
    """
    kind, _, index = str(name).partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceUnavailableError(f"{option}{name} is not a device: use one of "
                                     f"{', '.join(option + device for device in DEVICES)} (or {option}cuda:K)")


def resolve_device(name: str, option: str = "device=") -> torch.device:
    """The device ``name`` names on this machine.

    Args:
        name: ``"auto"`` (CUDA, else MPS, else the CPU), ``"cpu"``, ``"cuda"`` (or ``"cuda:K"``) or ``"mps"``.
        option: how the user gave it, for the messages (``"device="``, or ``"--device "`` for a flag).

    Returns:
        The ``torch.device``.

    Raises:
        DeviceUnavailableError: the device is unknown or absent here (a :class:`ValueError`).
    """
    import torch

    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    check_device_name(name, option)
    kind = name.split(":")[0]
    instead = f"use {option}cpu or {option}auto"
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"{option}{name} but no CUDA device is available: {instead}")
    if kind == "cuda" and ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"{option}{name} but this machine has {torch.cuda.device_count()} CUDA "
                                     f"device(s), numbered from 0: {instead}")
    if kind == "mps" and not _mps_available():
        raise DeviceUnavailableError(f"{option}{name} but MPS is not available: {instead}")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise DeviceUnavailableError(f"{option}{name}: {error}") from None
