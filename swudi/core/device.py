"""Choice of the compute device.

The maths always runs in float32 on the best device available; results come back to the CPU.
"""

from __future__ import annotations

import torch

from swudi.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device to compute on.

    ``"auto"`` picks CUDA when it is available, else the CPU. ``"cpu"``, ``"cuda"`` and
    ``"cuda:<index>"`` (or a ``torch.device``) are taken as given; asking for CUDA on a machine
    without it raises :class:`ConfigError` rather than silently falling back.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif not isinstance(device, str):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    elif device.strip().lower() == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            resolved = torch.device(device.strip().lower())
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available here; use 'auto' or 'cpu'")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return resolved
