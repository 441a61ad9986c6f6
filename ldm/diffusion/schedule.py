"""Noise schedules: beta tables in float64, respacing, and inference timestep spacings."""
from __future__ import annotations

import math

import torch

from ..config import is_int
from . import process

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine")
# diffusers' names for the same schedules, so a scheduler_config.json can be read as it is.
SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}
SPACINGS = ("leading", "trailing", "linspace")


def _linear_betas(num_timesteps: int, beta_start: float | None, beta_end: float | None) -> torch.Tensor:
    """Ho et al. 2020: beta linear from 1e-4 to 0.02 at T=1000; scaled by 1000/T otherwise (Nichol & Dhariwal)."""
    scale = 1000.0 / num_timesteps
    start = scale * 1e-4 if beta_start is None else beta_start
    end = scale * 0.02 if beta_end is None else beta_end
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def _scaled_linear_betas(num_timesteps: int, beta_start: float | None, beta_end: float | None) -> torch.Tensor:
    """Stable Diffusion: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)."""
    start = 0.00085 if beta_start is None else beta_start
    end = 0.012 if beta_end is None else beta_end
    return torch.linspace(math.sqrt(start), math.sqrt(end), num_timesteps, dtype=torch.float64) ** 2


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), beta clipped at 0.999."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


class NoiseSchedule:
    """A discrete variance-preserving forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

    Index t runs over 0..T-1 (t = 0 is the first noisy step). Every table is float64; callers cast at use.
    `timesteps[i]` is the timestep of the original schedule that index i stands for: arange(T) for a
    schedule built from a name, the chosen subset for a respaced one.
    """

    def __init__(self, betas: torch.Tensor, timesteps: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() == 0:
            raise ValueError("betas must not be empty")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.timesteps = (torch.arange(len(betas)) if timesteps is None
                          else torch.as_tensor(timesteps, dtype=torch.long).flatten())
        if len(self.timesteps) != len(betas):
            raise ValueError(f"timesteps has {len(self.timesteps)} entries, betas has {len(betas)}")
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        # beta~_t (Ho et al. eq. 7); at t = 0 it is 0, so its log is clipped to beta~_1 as in improved DDPM.
        self.posterior_variance = process.posterior_variance(self.alpha_bar, self.alpha_bar_prev)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if len(betas) > 1 \
            else self.betas.clone()
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.log_snr = torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, *, beta_start: float | None = None,
                  beta_end: float | None = None) -> "NoiseSchedule":
        """Build a named schedule: "linear", "scaled_linear" or "cosine" (alias "squaredcos_cap_v2")."""
        key = SCHEDULE_ALIASES.get(name, name)
        if key not in SCHEDULE_NAMES:
            allowed = ", ".join(SCHEDULE_NAMES + tuple(SCHEDULE_ALIASES))
            raise ValueError(f"schedule name must be one of {allowed}; got {name!r}")
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps!r}")
        if key == "linear":
            return cls(_linear_betas(num_timesteps, beta_start, beta_end))
        if key == "scaled_linear":
            return cls(_scaled_linear_betas(num_timesteps, beta_start, beta_end))
        return cls(_cosine_betas(num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def __len__(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.num_timesteps}, alpha_bar[-1]={self.alpha_bar[-1].item():.3g})"

    def alpha_bar_at(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_bar at (a tensor of) timesteps, float64; t = -1 stands for the clean data (alpha_bar = 1)."""
        t = torch.as_tensor(t, dtype=torch.long)
        if bool(((t < -1) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_timesteps - 1}]; got {t.tolist()}")
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        return table[t.cpu() + 1].to(t.device)

    def respace(self, timesteps) -> "NoiseSchedule":
        """The schedule restricted to a subset of timesteps, betas recomputed so that alpha_bar is unchanged
        on the subset (Nichol & Dhariwal 2021, sec. 4): beta_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}]."""
        ts = torch.as_tensor(timesteps, dtype=torch.long).flatten().unique(sorted=True)
        if len(ts) == 0 or ts[0] < 0 or ts[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must be a non-empty subset of [0, {self.num_timesteps - 1}]")
        alpha_bar = self.alpha_bar[ts]
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return NoiseSchedule(process.step_beta(alpha_bar, alpha_bar_prev), timesteps=self.timesteps[ts])


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing",
                     steps_offset: int = 0) -> torch.Tensor:
    """Descending inference timesteps (Lin et al. 2023, table 2): "leading", "trailing" or "linspace".

    Follows the conventions of diffusers' DDIM/DDPM schedulers so the same names give the same steps.
    """
    check_num_steps(num_steps, num_timesteps)
    if spacing == "leading":
        ratio = num_timesteps // num_steps
        ts = torch.arange(num_steps, dtype=torch.float64).mul(ratio).round() + steps_offset
    elif spacing == "trailing":
        ratio = num_timesteps / num_steps
        ts = torch.round(torch.arange(num_timesteps, 0, -ratio, dtype=torch.float64)) - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round()
    else:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    ts = ts.long().sort(descending=True).values
    if ts[0] >= num_timesteps or ts[-1] < 0:
        raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {num_timesteps - 1}]")
    return ts


def check_num_steps(num_steps, num_timesteps: int) -> None:
    if not is_int(num_steps) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {num_timesteps}] (the schedule's T); got {num_steps!r}")
