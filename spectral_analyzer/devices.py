"""The computing device, resolved where the work runs.

A device is asked for as ``"auto"``, ``"cpu"``, ``"cuda"`` or
``"cuda:N"``. With a dask.distributed cluster the client and the workers
need not have the same hardware, so the band build sends what was asked for
and each task resolves it on its worker: ``"auto"`` is cuda where that
worker sees a GPU and cpu elsewhere, and ``"cuda"`` is the current device of
the thread that runs the task (``cuda:<index>``, as a dask-cuda worker sets
it). A device that is not there is refused with a :class:`DeviceError`, on
one line, naming the host.
"""

from __future__ import annotations

import socket

import torch

from .errors import DeviceError

__all__ = ["check_device", "resolve_device"]


def check_device(device: str | torch.device = "auto") -> str:
    """*device* as text, refused only when it is not a device this package computes on (no availability check).

    >>> check_device("cuda:1"), check_device(torch.device("cpu"))
    ('cuda:1', 'cpu')
    """
    text = str(device)
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {text!r}; use 'auto', 'cpu' or 'cuda'") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {text!r} is not supported (the band needs float64 there); use 'auto', 'cpu' or 'cuda'")
    return text


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device to compute on here: ``"auto"`` is cuda when this process sees a GPU, else cpu.

    cuda resolves to ``cuda:<index>``: the index asked for, or the current
    device of the calling thread.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    text = check_device(device)
    if text == "auto":
        return _cuda(None) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(text)
    return dev if dev.type == "cpu" else _cuda(dev.index)


def _cuda(index: int | None) -> torch.device:
    if not torch.cuda.is_available():
        raise DeviceError(
            f"cuda requested but torch {torch.__version__} sees no CUDA device on {socket.gethostname()}; "
            "use device='cpu' (or 'auto')"
        )
    count = torch.cuda.device_count()
    if index is None:
        index = torch.cuda.current_device()
    elif index >= count:
        raise DeviceError(f"cuda:{index} requested but torch sees {count} CUDA device(s) on {socket.gethostname()}")
    return torch.device("cuda", index)
