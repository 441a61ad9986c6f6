"""Samplers as pure functions over a denoiser and a descending array of noise levels (sigma, float64; see
ldm.diffusion.grids), as k-diffusion's. Each steps from sigmas[i] to sigmas[i + 1], so the array's last level is
where sampling ends (0: clean data), keeps its state in local variables, and calls `callback(i, sigma, x,
prediction)` after step i. x is variance-preserving, x = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps with
alpha_bar = 1 / (1 + sigma^2), in and out; no sampler needs the training schedule."""
from __future__ import annotations

from typing import Optional

import torch

from ..diffusion import parameterization as param
from ..diffusion import process
from ..diffusion.denoiser import DenoiseFn, Prediction, per_row
from .common import Callback, NoiseSource
from .common import ab as _ab
from .common import noise_like as _noise
from .common import pairs as _pairs

Tensor = torch.Tensor


def ddpm_step(x_t: Tensor, pred: Prediction, alpha_bar, alpha_bar_prev, variance: str = "fixed_small",
              noise: Optional[Tensor] = None) -> Tensor:
    """Ancestral step x_{t_prev} ~ N(mu~(x_t, x0), sigma^2) (Ho et al. Algorithm 2), on any pair of timesteps.

    sigma^2: beta~ (fixed_small), beta (fixed_large), or the prediction's learned variance; a learned-range
    prediction is re-applied to this pair's beta and beta~, so strided sampling stays correct."""
    mean = process.posterior_mean(pred.x0, x_t, alpha_bar, alpha_bar_prev)
    if noise is None:
        return mean
    if pred.var_frac is not None:
        log_var = param.interpolated_log_variance(
            pred.var_frac, param.fixed_log_variance("fixed_small", alpha_bar, alpha_bar_prev),
            param.fixed_log_variance("fixed_large", alpha_bar, alpha_bar_prev))
    elif pred.log_var is not None:
        log_var = pred.log_var
    else:
        log_var = process._bc(param.fixed_log_variance(variance, alpha_bar, alpha_bar_prev), x_t)
    return mean + torch.exp(0.5 * log_var) * noise


def ddpm(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
         callback: Callback = None, variance: str = "fixed_small") -> Tensor:
    """DDPM ancestral sampling over all or a strided subset of the levels; no noise on a step to sigma 0."""
    param.check_variance_type(variance, param.FIXED_VARIANCE_TYPES)
    x = x_T
    for i, (s, s_next) in enumerate(_pairs(sigmas)):
        pred = denoise(x, per_row(s, x.shape[0]))
        noise = _noise(x, generator) if s_next > 0 else None
        x = ddpm_step(x, pred, _ab(s), _ab(s_next), variance, noise)
        if callback is not None:
            callback(i, s, x, pred)
    return x


def ddim_sigma(alpha_bar, alpha_bar_prev, eta: float) -> Tensor:
    """sigma_t(eta) = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev) (Song et al. 2020, eq. 16)."""
    return eta * process.posterior_variance(alpha_bar, alpha_bar_prev).sqrt()


def ddim_step(x_t: Tensor, pred: Prediction, alpha_bar, alpha_bar_prev, eta: float = 0.0,
              noise: Optional[Tensor] = None) -> Tensor:
    """DDIM update, Song et al. 2020, eq. 12:
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z."""
    ab_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    sigma = ddim_sigma(alpha_bar, ab_prev, eta)
    direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
    x = process._bc(ab_prev.sqrt(), x_t) * pred.x0 + process._bc(direction, x_t) * pred.eps
    if noise is not None:
        x = x + process._bc(sigma, x_t) * noise
    return x


def ddim(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
         callback: Callback = None, eta: float = 0.0) -> Tensor:
    """DDIM sampling; eta = 0 is the deterministic probability-flow discretization, eta = 1 is DDPM-like.
    With eta > 0 noise is drawn at every step (zero-weighted on a step to sigma 0), as diffusers does."""
    x = x_T
    for i, (s, s_next) in enumerate(_pairs(sigmas)):
        pred = denoise(x, per_row(s, x.shape[0]))
        noise = _noise(x, generator) if eta > 0 else None
        x = ddim_step(x, pred, _ab(s), _ab(s_next), eta, noise)
        if callback is not None:
            callback(i, s, x, pred)
    return x


def ddim_invert(denoise: DenoiseFn, x0: Tensor, sigmas: Tensor, *, callback: Callback = None,
                fixed_point_iters: int = 0) -> Tensor:
    """DDIM inversion x0 -> x_T: the deterministic DDIM step run backwards up the same levels (sigmas as a
    sampler gets them, descending, ending at 0).

    The exact inverse of x_s = DDIM(x_t) needs eps(x_t, t) at the unknown x_t. Classic inversion uses
    eps(x_s, s) instead (eps(x_0, sigma_1) on the first step); `fixed_point_iters` iterations of
    x_t <- step(x_s, eps(x_t, t)) then solve for the exact inverse (measured on Gaussian data, 50 steps:
    round-trip max error 0.14 with none, 7e-4 with 3)."""
    x = x0
    for i, (s, s_low) in enumerate(reversed(_pairs(sigmas))):  # up from s_low to s
        ab, ab_prev = _ab(s), _ab(s_low)
        pred = denoise(x, per_row(s_low if s_low > 0 else s, x.shape[0]))
        x_next = _inversion_step(x, pred.eps, ab, ab_prev)
        for _ in range(fixed_point_iters):
            pred = denoise(x_next, per_row(s, x.shape[0]))
            x_next = _inversion_step(x, pred.eps, ab, ab_prev)
        x = x_next
        if callback is not None:
            callback(i, s, x, pred)
    return x


def _inversion_step(x_s: Tensor, eps: Tensor, alpha_bar, alpha_bar_prev) -> Tensor:
    """x_t = sqrt(a_t) (x_s - sqrt(1 - a_s) eps) / sqrt(a_s) + sqrt(1 - a_t) eps: eq. 12 solved for x_t."""
    x0 = process.x0_from_eps(x_s, eps, alpha_bar_prev) if float(alpha_bar_prev) < 1 else x_s
    return process.q_sample(x0, eps, alpha_bar)


def langevin(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
             callback: Callback = None, n_corrector: int = 1, snr: float = 0.16) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 5, with an ancestral predictor): at each
    noise level, `n_corrector` steps of annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1)
    x += delta * score + sqrt(2 delta) z with the score -eps / sqrt(1 - alpha_bar), then an ancestral step.

    delta = 2 alpha_t snr^2 (1 - alpha_bar_t): NCSN's step proportional to the noise variance, which is
    Song et al.'s 2 alpha (snr ||z|| / ||score||)^2 with ||score||^2 at its noise-only value dim / (1 - alpha_bar).
    Unlike a per-sample norm it does not depend on the sample, so low-dimensional data is not distorted."""
    x = x_T
    for i, (s, s_next) in enumerate(_pairs(sigmas)):
        level = per_row(s, x.shape[0])
        ab, ab_prev = _ab(s), _ab(s_next)
        alpha = 1 - process.step_beta(ab, ab_prev)
        delta = float(2 * alpha * snr**2 * (1 - ab))
        for _ in range(n_corrector):
            score = -denoise(x, level).eps * float((1 - ab).rsqrt())
            x = x + delta * score + (2 * delta) ** 0.5 * _noise(x, generator)
        pred = denoise(x, level)
        noise = _noise(x, generator) if s_next > 0 else None
        x = ddpm_step(x, pred, ab, ab_prev, "fixed_small", noise)
        if callback is not None:
            callback(i, s, x, pred)
    return x
