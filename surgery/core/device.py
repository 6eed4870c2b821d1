"""Checking a ``--device`` before any work: a name torch knows, on a backend this machine has."""

from __future__ import annotations

from .errors import UsageError


def check_device(device: str) -> str:
    """``device`` unchanged when torch can run on it here.

    Raises:
        UsageError: not a device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``), a CUDA or MPS
            device this machine does not have, or a CUDA index past the last GPU.
    """
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(f"`device` {device!r} is not a device name; use cpu, cuda, cuda:1 or mps.") from exc
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"`device` {device} asked for a CUDA GPU but torch sees none; use cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"`device` {device} names GPU {dev.index} but torch sees {torch.cuda.device_count()} "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
        return device
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"`device` {device} asked for Apple MPS but torch sees none; use cpu.")
        return device
    raise UsageError(f"`device` {device} is a {dev.type} device, which surgery does not run on; use cpu, cuda or mps.")
