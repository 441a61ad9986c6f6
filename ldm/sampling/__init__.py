"""Samplers and denoiser transforms. `sample` is the one entry point that picks a sampler by name."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import is_number
from ..diffusion.denoiser import DenoiseFn
from ..diffusion.schedule import SPACINGS, NoiseSchedule, check_num_steps, spaced_timesteps
from ..random import Generator
from .samplers import ddim, ddim_invert, ddim_step, ddpm, ddpm_step, dpmpp_2m, langevin
from .transforms import (classifier_free_guidance, classifier_guidance, dynamic_threshold,
                         dynamic_thresholding, static_thresholding)

SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "langevin": langevin, "dpmpp_2m": dpmpp_2m}


def resolve_timesteps(schedule: NoiseSchedule, num_steps: Optional[int], spacing: str = "trailing",
                      steps_offset: int = 0, timesteps=None) -> torch.Tensor:
    """The descending timesteps a sampler walks: explicit `timesteps`, or `num_steps` spaced by `spacing`."""
    T = schedule.num_timesteps
    if timesteps is None:
        return spaced_timesteps(T, num_steps, spacing, steps_offset)
    ts = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    if len(ts) == 0 or bool((ts < 0).any() | (ts >= T).any()) or bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"timesteps must be strictly decreasing integers in [0, {T - 1}]; got {ts.tolist()}")
    if num_steps is not None and num_steps != len(ts):
        raise ValueError(f"num_steps={num_steps} disagrees with the {len(ts)} timesteps given")
    return ts


def sample(denoise: DenoiseFn, x_T: torch.Tensor, schedule: NoiseSchedule, num_steps: Optional[int],
           sampler: str = "ddim", generator: Generator = None, *, spacing: str = "trailing",
           steps_offset: int = 0, timesteps=None, callback=None, **options) -> torch.Tensor:
    """Draw samples from x_T by walking `num_steps` timesteps of `schedule` (or the given `timesteps`).

    generator: one torch.Generator, or a list with one per row of x_T (per-image seeds).
    denoise(x_t, t) gets integer timesteps of the original schedule (shape [B]) and returns a Prediction.
    sampler: "ddpm" (option variance="fixed_small"|"fixed_large"), "ddim" (eta=0.0), "langevin"
    (n_corrector=1, snr=0.16) or "dpmpp_2m". spacing: "trailing" (default), "leading" or "linspace".
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if timesteps is None:
        check_num_steps(num_steps, schedule.num_timesteps)
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    eta = options.get("eta", 0.0)
    if sampler == "ddim" and (not is_number(eta) or eta < 0):
        raise ValueError(f"eta must be a number >= 0; got {eta!r}")
    ts = resolve_timesteps(schedule, num_steps, spacing, steps_offset, timesteps)
    return SAMPLERS[sampler](denoise, x_T, schedule, ts, generator=generator, callback=callback, **options)


__all__ = [
    "sample", "resolve_timesteps", "SAMPLERS", "ddpm", "ddim", "ddim_invert", "langevin", "dpmpp_2m",
    "ddpm_step", "ddim_step", "classifier_free_guidance", "classifier_guidance", "static_thresholding",
    "dynamic_thresholding", "dynamic_threshold",
]
