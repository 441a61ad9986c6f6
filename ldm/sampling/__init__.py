"""Samplers and denoiser transforms. `sample` is the one entry point that picks a sampler by name."""
from __future__ import annotations

from typing import Optional

import torch

from ..diffusion.denoiser import DenoiseFn
from ..diffusion.grids import check_levels, levels_of_timesteps, noise_levels
from ..diffusion.schedule import NoiseSchedule
from ..random import Generator
from .registry import SAMPLERS, Option, SamplerSpec, get_sampler, register
from .dpm_solvers import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde
from .k_samplers import euler, euler_ancestral, heun, lms
from .plms import plms
from .samplers import ddim, ddim_invert, ddim_step, ddpm, ddpm_step, langevin
from .unipc import unipc
from .transforms import (classifier_free_guidance, classifier_guidance, dynamic_threshold,
                         dynamic_thresholding, static_thresholding)


def resolve_sigmas(schedule: Optional[NoiseSchedule], num_steps: Optional[int], spacing: str = "trailing",
                   steps_offset: int = 0, timesteps=None, sigmas=None, sigma_schedule: Optional[str] = None,
                   final: str = "zero") -> torch.Tensor:
    """The descending noise levels a sampler walks: explicit `sigmas`, explicit integer `timesteps` of the
    schedule (then `final`), or `num_steps` levels of a grid (ldm.diffusion.grids.noise_levels)."""
    given = [name for name, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
    if len(given) > 1:
        raise ValueError("pass timesteps or sigmas, not both")
    if sigmas is not None:
        levels = check_levels(sigmas)
    elif schedule is None:
        raise ValueError("a schedule is needed unless sigmas are given")
    elif timesteps is not None:
        levels = levels_of_timesteps(schedule, timesteps, final)
    else:
        return noise_levels(schedule, num_steps, spacing, steps_offset, sigma_schedule, final)
    if num_steps is not None and num_steps != len(levels) - 1:
        raise ValueError(f"num_steps={num_steps} disagrees with the {len(levels) - 1} steps of the {given[0]} given")
    return levels


def sample(denoise: DenoiseFn, x_T: torch.Tensor, schedule: Optional[NoiseSchedule], num_steps: Optional[int],
           sampler: str = "ddim", generator: Generator = None, *, spacing: str = "trailing",
           steps_offset: int = 0, sigma_schedule: Optional[str] = None, final: str = "zero", timesteps=None,
           sigmas=None, callback=None, **options) -> torch.Tensor:
    """Draw samples from x_T (unit-variance noise at the first level) by walking noise levels: `num_steps` of a
    grid over `schedule` (spacing "trailing" (default), "leading" or "linspace"; sigma_schedule None, "karras",
    "exponential" or "beta"; final "zero" or "sigma_min"), or the given integer `timesteps` or `sigmas`.

    generator: one torch.Generator, a list with one per row of x_T (per-image seeds), or a callable x -> noise
    shaped as x (a given noise source).
    denoise(x_t, sigma) gets the noise levels (float64, shape [B]) and returns a Prediction.
    sampler: a name in SAMPLERS; options: that sampler's (SAMPLERS[name].options), checked and defaulted there.
    callback(i, sigma, x, prediction) after each step.
    """
    spec = get_sampler(sampler)
    values = spec.check_options(options)
    levels = resolve_sigmas(schedule, num_steps, spacing, steps_offset, timesteps, sigmas, sigma_schedule, final)
    return spec.fn(denoise, x_T, levels, generator=generator, callback=callback, **values)


__all__ = [
    "sample", "resolve_sigmas", "SAMPLERS", "SamplerSpec", "Option", "register", "get_sampler", "ddpm", "ddim",
    "ddim_invert", "langevin", "plms", "euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde",
    "dpmpp_3m_sde", "unipc", "ddpm_step", "ddim_step", "classifier_free_guidance",
    "classifier_guidance", "static_thresholding", "dynamic_thresholding", "dynamic_threshold",
]
