"""``device=`` of every command: a name checked against the devices this machine has, so an
absent GPU is reported as such, not later as an unreadable checkpoint (torch.load onto a
missing device fails with a RuntimeError that reads like corruption)."""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """``cpu``, then ``cuda:0`` .. ``cuda:N-1``, then ``mps`` when torch can use them."""
    names = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if there is one, else ``cpu``; any other name must be available.

    ``cuda`` means ``cuda:0``'s type (torch picks the current device); a ``ValueError`` names
    the device asked for and lists the available ones.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_devices()
    choices = f"choose auto or one of {', '.join(available)}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r}: not a device name; {choices}") from None
    key = device.type if device.type in ("cpu", "mps") else f"{device.type}:{device.index or 0}"
    if key not in available:
        raise ValueError(f"device={name!r} is not available on this machine; {choices}")
    return device
