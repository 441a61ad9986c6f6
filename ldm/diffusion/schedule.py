"""Noise schedules: beta tables in float64 and the noise-level axis the samplers walk (sigma, with the map from a
noise level to the network's time input). Inference grids over that axis are in grids.py."""
from __future__ import annotations

import math

import torch

from ..config import is_int
from . import process

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine")
# diffusers' names for the same schedules, so a scheduler_config.json can be read as it is.
SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that it is 0 at t = T - 1 (zero terminal
    SNR, the last step pure noise) and unchanged at t = 0; diffusers' rescale_betas_zero_snr."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


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
    The samplers' axis is the noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (Karras et al. 2022:
    x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps), 0 for clean data and inf where alpha_bar is 0 (zero terminal
    SNR); `timestep_of` maps any level back to the network's (fractional) time input.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() == 0:
            raise ValueError("betas must not be empty")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        # beta~_t (Ho et al. eq. 7); at t = 0 it is 0, so its log is clipped to beta~_1 as in improved DDPM.
        self.posterior_variance = process.posterior_variance(self.alpha_bar, self.alpha_bar_prev)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if len(betas) > 1 \
            else self.betas.clone()
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.log_snr = torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)
        self.sigmas = process.sigma_of_alpha_bar(self.alpha_bar)
        # log sigma for the time map; a zero alpha_bar (zero terminal SNR) counts as 2**-24 there, as diffusers'
        # schedulers do (only a zero one: the cosine schedule's last alpha_bar, 2.4e-9, is smaller than that)
        alpha_bar = torch.where(self.alpha_bar == 0, torch.full_like(self.alpha_bar, 2.0**-24), self.alpha_bar)
        self._log_sigmas = process.sigma_of_alpha_bar(alpha_bar).log()

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, *, beta_start: float | None = None,
                  beta_end: float | None = None, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Build a named schedule: "linear", "scaled_linear" or "cosine" (alias "squaredcos_cap_v2"), optionally
        rescaled to zero terminal SNR (rescale_zero_terminal_snr)."""
        key = SCHEDULE_ALIASES.get(name, name)
        if key not in SCHEDULE_NAMES:
            allowed = ", ".join(SCHEDULE_NAMES + tuple(SCHEDULE_ALIASES))
            raise ValueError(f"schedule name must be one of {allowed}; got {name!r}")
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps!r}")
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(f"zero_terminal_snr must be true or false; got {zero_terminal_snr!r}")
        if key == "linear":
            betas = _linear_betas(num_timesteps, beta_start, beta_end)
        elif key == "scaled_linear":
            betas = _scaled_linear_betas(num_timesteps, beta_start, beta_end)
        else:
            betas = _cosine_betas(num_timesteps)
        if zero_terminal_snr:
            if num_timesteps < 2:
                raise ValueError("zero_terminal_snr needs num_timesteps >= 2")
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def __len__(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.num_timesteps}, alpha_bar[-1]={self.alpha_bar[-1].item():.3g})"

    def alpha_bar_at(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_bar at (a tensor of) integer timesteps, float64; t = -1 stands for the clean data (alpha_bar = 1).
        A noise level between timesteps has alpha_bar = process.alpha_bar_of_sigma(sigma)."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers (a noise level between them is a sigma); got {t.dtype}")
        t = t.long()
        if bool(((t < -1) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.num_timesteps - 1}]; got {t.tolist()}")
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        return table[t.cpu() + 1].to(t.device)

    def sigma_at(self, t: torch.Tensor | int) -> torch.Tensor:
        """The noise level sigma of (a tensor of) integer timesteps, float64; t = -1 is clean data (sigma 0)."""
        return process.sigma_of_alpha_bar(self.alpha_bar_at(t))

    def timestep_of(self, sigma) -> torch.Tensor:
        """The network's time input for noise levels `sigma` (float64, any shape): the training timestep where
        sigma is on the training grid, else interpolated linearly in log sigma between its two neighbours (as
        diffusers' _sigma_to_t and k-diffusion's sigma_to_t); clamped to [0, T - 1] outside the grid."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if bool(torch.isnan(sigma).any()) or bool((sigma < 0).any()):
            raise ValueError(f"noise levels must be >= 0 (inf allowed); got {sigma.tolist()}")
        table = self._log_sigmas
        if len(table) == 1:
            return torch.zeros_like(sigma)
        log_sigma = sigma.cpu().clamp(min=1e-300).log()
        low = (torch.searchsorted(table, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(table) - 2)
        low = low.reshape(log_sigma.shape)
        w = ((log_sigma - table[low]) / (table[low + 1] - table[low])).clamp(0, 1)
        return (low + w).to(sigma.device)


def check_num_steps(num_steps, num_timesteps: int) -> None:
    if not is_int(num_steps) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {num_timesteps}] (the schedule's T); got {num_steps!r}")
