"""Inference grids: the descending noise levels (sigma, float64) a sampler walks, ending at clean data.

A grid is two choices, as in diffusers' schedulers: which training timesteps (`spacing`: leading, trailing,
linspace; Lin et al. 2023, table 2) and, optionally, how the levels are redistributed between the first and
the last of them (`sigma_schedule`: Karras et al. 2022's rho-spaced sigmas, log-uniform "exponential", or
"beta" quantiles; diffusers' use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas), then where the
last step lands (`final`: "zero", the clean data, or "sigma_min", the training grid's smallest level, which is
DDIM's set_alpha_to_one=False and DPM-Solver's final_sigmas_type="sigma_min").
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import is_number
from .schedule import NoiseSchedule, check_num_steps

SPACINGS = ("leading", "trailing", "linspace", "linspace_float", "leading_open", "linspace_open")
SIGMA_SCHEDULES = ("karras", "exponential", "beta")
FINALS = ("zero", "sigma_min")


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing",
                     steps_offset: int = 0) -> torch.Tensor:
    """Descending inference timesteps, as diffusers' schedulers compute them (each family has its own variants,
    so each has its own name here; DiffusionConfig.from_diffusers picks the one a scheduler class means):

    - "leading": i * (T // n) + steps_offset; "trailing": round(T - i T / n) - 1; "linspace": round(linspace(0,
      T - 1, n)) (DDIM, DDPM, PNDM; Euler, Heun and LMS for leading and trailing);
    - "linspace_float": linspace(0, T - 1, n) unrounded, fractional timesteps (Euler, Heun, LMS's linspace), as
      float64; its levels interpolate sigma linearly between training timesteps, as those schedulers do;
    - "leading_open" and "linspace_open": n + 1 leading or linspace points with the lowest one (t = 0 before the
      offset) left out (DPM-Solver's and UniPC's leading and linspace).
    """
    check_num_steps(num_steps, num_timesteps)
    T, n = num_timesteps, num_steps
    if spacing == "leading":
        ts = torch.arange(n, dtype=torch.float64).mul(T // n).round() + steps_offset
    elif spacing == "trailing":
        ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)) - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
    elif spacing == "linspace_float":
        return torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
    elif spacing == "leading_open":
        ts = torch.arange(1, n + 1, dtype=torch.float64).mul(T // (n + 1)).round() + steps_offset
    elif spacing == "linspace_open":
        ts = torch.linspace(0, T - 1, n + 1, dtype=torch.float64).round()[1:]
    else:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    ts = ts.long().sort(descending=True).values
    if ts[0] >= T or ts[-1] < 0:
        raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T - 1}]")
    return ts


def sigma_at_float(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """sigma at (fractional) timesteps, interpolated linearly in sigma between training timesteps, as diffusers'
    Euler, Heun and LMS schedulers place a fractional linspace (np.interp); equal to sigma_at on integers."""
    t = torch.as_tensor(t, dtype=torch.float64)
    low = t.floor().long().clamp(0, schedule.num_timesteps - 1)
    high = (low + 1).clamp(max=schedule.num_timesteps - 1)
    w = t - low
    between = (1 - w) * schedule.sigmas[low] + w * schedule.sigmas[high]
    return torch.where(w == 0, schedule.sigmas[low], between)  # exact on the grid, and no 0 * inf at T - 1


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5:
    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """Uniform in log sigma from sigma_max to sigma_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def beta_sigmas(sigma_max: float, sigma_min: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024 ("Beta sampling is all you need"): sigma_min + (sigma_max - sigma_min) * F^-1(1 - i/(n-1))
    with F the Beta(alpha, beta) CDF, so steps crowd at both ends."""
    from scipy.stats import beta as beta_distribution  # only this grid needs it

    q = 1 - torch.linspace(0, 1, n, dtype=torch.float64)
    ppf = torch.as_tensor(beta_distribution.ppf(q.numpy(), alpha, beta), dtype=torch.float64)
    return sigma_min + ppf * (sigma_max - sigma_min)


def check_grid(spacing: str, sigma_schedule: Optional[str], final: str) -> None:
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    if sigma_schedule is not None and sigma_schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"sigma_schedule must be None or one of {', '.join(SIGMA_SCHEDULES)}; got {sigma_schedule!r}")
    if final not in FINALS:
        raise ValueError(f"final must be one of {', '.join(FINALS)}; got {final!r}")


def noise_levels(schedule: NoiseSchedule, num_steps: int, spacing: str = "trailing", steps_offset: int = 0,
                 sigma_schedule: Optional[str] = None, final: str = "zero", rho: float = 7.0) -> torch.Tensor:
    """The num_steps + 1 descending noise levels of a grid (module docstring): num_steps levels the network is
    evaluated at, then the final one. With a sigma_schedule, its end points are the levels of the first and last
    spaced timesteps (as diffusers' Euler; with "linspace" spacing they are the training grid's extremes)."""
    check_grid(spacing, sigma_schedule, final)
    ts = spaced_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
    sigmas = sigma_at_float(schedule, ts) if ts.is_floating_point() else schedule.sigma_at(ts)
    if sigma_schedule is not None and num_steps > 1:
        if not bool(torch.isfinite(sigmas[0])):
            raise ValueError(f"sigma_schedule={sigma_schedule!r} needs a finite largest noise level; this schedule "
                             "ends at zero SNR (sigma = inf)")
        hi, lo = float(sigmas[0]), float(sigmas[-1])
        if sigma_schedule == "karras":
            if not is_number(rho) or rho <= 0:
                raise ValueError(f"rho must be a number > 0; got {rho!r}")
            sigmas = karras_sigmas(hi, lo, num_steps, rho)
        elif sigma_schedule == "exponential":
            sigmas = exponential_sigmas(hi, lo, num_steps)
        else:
            sigmas = beta_sigmas(hi, lo, num_steps)
    last = schedule.sigmas[:1] if final == "sigma_min" else torch.zeros(1, dtype=torch.float64)
    return torch.cat([sigmas, last])


def levels_of_timesteps(schedule: NoiseSchedule, timesteps, final: str = "zero") -> torch.Tensor:
    """Explicit strictly decreasing integer timesteps as a grid: their levels, then the final one."""
    T = schedule.num_timesteps
    ts = torch.as_tensor(timesteps).flatten()
    if ts.is_floating_point() and not bool((ts == ts.round()).all()):
        raise ValueError(f"timesteps must be integers; got {ts.tolist()} (pass sigmas= for levels between them)")
    ts = ts.long()
    if len(ts) == 0 or bool((ts < 0).any() | (ts >= T).any()) or bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"timesteps must be strictly decreasing integers in [0, {T - 1}]; got {ts.tolist()}")
    check_grid("trailing", None, final)
    last = schedule.sigmas[:1] if final == "sigma_min" else torch.zeros(1, dtype=torch.float64)
    return torch.cat([schedule.sigma_at(ts), last])


def check_levels(sigmas) -> torch.Tensor:
    """A grid given by hand: at least two levels, non-increasing (a step may repeat a level), >= 0, float64."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if len(s) < 2 or bool(torch.isnan(s).any()) or bool((s < 0).any()) or bool((s[1:] > s[:-1]).any()) \
            or not bool(s[0] > s[-1]):
        raise ValueError("sigmas must be at least two non-increasing noise levels >= 0 (the last one where "
                         f"sampling ends, usually 0), first above last; got {s.tolist()}")
    return s


def stop_at(sigmas: torch.Tensor, sigma_stop: float) -> torch.Tensor:
    """A grid that ends at sigma_stop instead of its own last level: the levels above it, then it (truncated
    conditioning augmentation stops a stage there). At least one step: refused if sigma_stop is not below the
    first level."""
    if sigma_stop <= float(sigmas[-1]):
        return sigmas
    if sigma_stop >= float(sigmas[0]):
        raise ValueError(f"cannot stop at noise level {sigma_stop:.4g}: the grid starts at {float(sigmas[0]):.4g}")
    above = sigmas[sigmas > sigma_stop]
    return torch.cat([above, torch.tensor([sigma_stop], dtype=sigmas.dtype)])
