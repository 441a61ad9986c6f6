"""Seeded Gaussian noise, one generator for the batch or one per row (so a seed gives the same image at
any batch size). Draws exactly as diffusers' randn_tensor does, so seeded runs line up with it."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generator = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def randn(shape: Sequence[int], generator: Generator = None, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of `shape`; with a list of generators, row i is drawn from generator i."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"generator is a list of {len(generators)} generators but the batch has {shape[0]} rows")
    return torch.cat([torch.randn((1,) + shape[1:], generator=g, dtype=dtype, device=device) for g in generators])
