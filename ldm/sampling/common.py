"""What every sampler shares: the (level, next level) pairs of a grid, alpha_bar of a level, the noise source,
the callback type, and the variance-exploding view x / sqrt(alpha_bar) = x0 + sigma eps of the k-style samplers."""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from ..diffusion import process
from ..diffusion.denoiser import DenoiseFn, Prediction, per_row
from ..random import Generator, randn

Tensor = torch.Tensor
Callback = Optional[Callable[[int, float, Tensor, Prediction], None]]
# A noise source: one torch.Generator, one per row of x (per-image seeds), or a callable x -> standard normal
# noise shaped as x (to inject given noise, as the parity tests do).
NoiseSource = Union[Generator, Callable[[Tensor], Tensor]]

# The largest finite level a k-style sampler starts from when a zero-terminal-SNR grid starts at sigma = inf:
# alpha_bar = 2**-24, as diffusers' Euler schedulers clamp it (sigma = 4096).
MAX_SIGMA = math.sqrt((1 - 2.0**-24) / 2.0**-24)


def pairs(sigmas: Tensor) -> list[tuple[float, float]]:
    levels = [float(s) for s in sigmas]
    return list(zip(levels[:-1], levels[1:]))


def ab(sigma: float) -> Tensor:
    """alpha_bar of a level as a float64 scalar tensor."""
    return process.alpha_bar_of_sigma(sigma)


def noise_like(x: Tensor, source: NoiseSource) -> Tensor:
    if callable(source):
        noise = source(x)
        if noise.shape != x.shape:
            raise ValueError(f"the noise source returned shape {tuple(noise.shape)}; expected {tuple(x.shape)}")
        return noise.to(device=x.device, dtype=x.dtype)
    return randn(x.shape, source, x.dtype, x.device)


def finite(sigmas: Tensor) -> Tensor:
    """The grid with a starting level of sigma = inf (zero terminal SNR) replaced by MAX_SIGMA."""
    return torch.where(torch.isinf(sigmas), torch.full_like(sigmas, MAX_SIGMA), sigmas)


def to_ve(x: Tensor, sigma: float) -> Tensor:
    """Variance-preserving x at level sigma -> x0 + sigma eps."""
    return x * math.sqrt(1 + sigma**2)


def to_vp(x: Tensor, sigma: float) -> Tensor:
    return x / math.sqrt(1 + sigma**2)


def denoise_ve(denoise: DenoiseFn, x: Tensor, sigma: float) -> Prediction:
    """The prediction at x = x0 + sigma eps (k-diffusion's convention), from a variance-preserving denoiser."""
    return denoise(to_vp(x, sigma), per_row(sigma, x.shape[0]))
