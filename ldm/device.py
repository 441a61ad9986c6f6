"""Devices and dtypes a user may name, checked once for the pipelines, the trainer and the command line."""
from __future__ import annotations

from typing import Union

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: Union[str, torch.device]) -> torch.device:
    """A torch.device that exists here, else a ValueError saying why (a typo, or no such accelerator)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU found"
        raise ValueError(f"device {str(device)!r} asked for, but torch.cuda.is_available() is False here "
                         f"(torch {torch.__version__}, {build})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for; this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but torch.backends.mps.is_available() is False here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'; got {str(device)!r}")
    return device


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """One of the floating dtypes the networks run in, else a ValueError listing them."""
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of torch.{', torch.'.join(DTYPES)}; got {dtype!r}")
    return dtype
