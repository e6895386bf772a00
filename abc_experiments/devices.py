"""Which torch device a run uses: ``device=auto|cpu|cuda|mps`` resolved against this machine."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


class DeviceUnavailableError(ValueError):
    """The device asked for does not exist here; the message names the alternatives."""


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """The device ``name`` names on this machine.

    Arguments:
        name: ``"auto"`` (CUDA, else MPS, else the CPU), ``"cpu"``, ``"cuda"`` (or ``"cuda:K"``) or ``"mps"``.

    Returns:
        The ``torch.device``.

    Raises:
        DeviceUnavailableError: the device is unknown or absent here (a :class:`ValueError`).
    """
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES[1:]:
        raise DeviceUnavailableError(f"device={name} is not a device: use one of {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device={name} but no CUDA device is available: use device=cpu or device=auto")
    if kind == "mps" and not _mps_available():
        raise DeviceUnavailableError(f"device={name} but MPS is not available: use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise DeviceUnavailableError(f"device={name}: {error}") from None
