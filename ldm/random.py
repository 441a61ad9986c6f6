"""Every random draw of the library goes through this file (a test checks that no other module calls torch's
random functions). Noise is drawn on the generator's device, the CPU for the usual CPU generators and for no
generator, and then moved to where it is used, as diffusers' randn_tensor does: a seed gives the same noise on
a CPU, a CUDA GPU or an Apple GPU, and torch's refusal of a CPU generator for a CUDA tensor never arises. With one
generator per row, row i is drawn from generator i, so a seed gives the same image at any batch size."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generator = Optional[Union[torch.Generator, Sequence[torch.Generator]]]
CPU = torch.device("cpu")


def _rows(shape: tuple[int, ...], generator: Generator) -> list[tuple[Optional[torch.Generator], tuple[int, ...]]]:
    """(generator, shape) per draw: the whole shape for one generator (or none), else one row per generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return [(generator, shape)]
    generators = list(generator)
    if not shape or len(generators) != shape[0]:
        raise ValueError(f"generator is a list of {len(generators)} generators but the batch has "
                         f"{shape[0] if shape else 0} rows")
    return [(g, (1,) + shape[1:]) for g in generators]


def _source(generator: Optional[torch.Generator]) -> torch.device:
    return CPU if generator is None else generator.device


def _draw(draw, shape: Sequence[int], generator: Generator, device, **kwargs) -> torch.Tensor:
    """draw(shape, generator=, device=, **kwargs) where each generator is, rows concatenated, moved to `device`."""
    parts = [draw(s, generator=g, device=_source(g), **kwargs) for g, s in _rows(tuple(shape), generator)]
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).to(device)


def randn(shape: Sequence[int], generator: Generator = None, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of `shape` on `device`; with a list of generators, row i is drawn from generator i."""
    return _draw(torch.randn, shape, generator, device, dtype=dtype)


def rand(shape: Sequence[int], generator: Generator = None, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform noise in [0, 1) of `shape` on `device` (e.g. caption dropout); per-row generators as randn."""
    return _draw(torch.rand, shape, generator, device, dtype=dtype)


def randint(high: int, shape: Sequence[int], generator: Generator = None,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Integers uniform in [0, high) of `shape` on `device` (e.g. training timesteps); per-row generators as randn."""
    return _draw(lambda size, **kw: torch.randint(0, high, size, **kw), shape, generator, device)


def multinomial(probs: torch.Tensor, num_samples: int, generator: Optional[torch.Generator] = None,
                replacement: bool = True) -> torch.Tensor:
    """Indices drawn from the distribution `probs` (on its device), with replacement unless told otherwise; drawn
    where the generator is."""
    return torch.multinomial(probs.to(_source(generator)), num_samples, replacement=replacement,
                             generator=generator).to(probs.device)


def randperm(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random permutation of range(n) on the CPU (data order)."""
    return torch.randperm(n, generator=generator, device=_source(generator)).cpu()
