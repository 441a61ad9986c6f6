"""Samplers as pure functions over a denoiser. Each walks a descending list of timesteps of the original
schedule, pairing every t with the next one (t_prev; -1 after the last, meaning the clean data), keeps its
state in local variables, and calls `callback(i, t, x, prediction)` after step i."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..diffusion import parameterization as param
from ..diffusion import process
from ..diffusion.denoiser import DenoiseFn, Prediction
from ..diffusion.schedule import NoiseSchedule
from ..random import Generator, randn

Tensor = torch.Tensor
Callback = Optional[Callable[[int, int, Tensor, Prediction], None]]


def _pairs(timesteps: Tensor) -> list[tuple[int, int]]:
    ts = [int(t) for t in timesteps]
    return list(zip(ts, ts[1:] + [-1]))


def _t(value: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.long, device=x.device)


def _noise(x: Tensor, generator: Generator) -> Tensor:
    return randn(x.shape, generator, x.dtype, x.device)


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


def ddpm(denoise: DenoiseFn, x_T: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
         generator: Generator = None, callback: Callback = None,
         variance: str = "fixed_small") -> Tensor:
    """DDPM ancestral sampling over all or a strided subset of timesteps; no noise on the final step."""
    param.check_variance_type(variance, param.FIXED_VARIANCE_TYPES)
    x = x_T
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        pred = denoise(x, _t(t, x))
        noise = _noise(x, generator) if t_prev >= 0 else None
        x = ddpm_step(x, pred, schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev), variance, noise)
        if callback is not None:
            callback(i, t, x, pred)
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
    x = process._bc(ab_prev.sqrt(), x_t) * pred.x0 + process._bc((1 - ab_prev - sigma**2).clamp(min=0).sqrt(), x_t) * pred.eps
    if noise is not None:
        x = x + process._bc(sigma, x_t) * noise
    return x


def ddim(denoise: DenoiseFn, x_T: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
         generator: Generator = None, callback: Callback = None, eta: float = 0.0) -> Tensor:
    """DDIM sampling; eta = 0 is the deterministic probability-flow discretization, eta = 1 is DDPM-like.
    With eta > 0 noise is drawn at every step (zero-weighted on the last), as diffusers does."""
    x = x_T
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        pred = denoise(x, _t(t, x))
        noise = _noise(x, generator) if eta > 0 else None
        x = ddim_step(x, pred, schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev), eta, noise)
        if callback is not None:
            callback(i, t, x, pred)
    return x


def ddim_invert(denoise: DenoiseFn, x0: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
                callback: Callback = None, fixed_point_iters: int = 0) -> Tensor:
    """DDIM inversion x0 -> x_T: the deterministic DDIM step run backwards over the same timesteps.

    The exact inverse of x_s = DDIM(x_t) needs eps(x_t, t) at the unknown x_t. Classic inversion uses
    eps(x_s, s) instead (eps(x_0, t_1) on the first step); `fixed_point_iters` iterations of
    x_t <- step(x_s, eps(x_t, t)) then solve for the exact inverse (measured on Gaussian data, 50 steps:
    round-trip max error 0.14 with none, 7e-4 with 3)."""
    x = x0
    ascending = [int(t) for t in torch.as_tensor(timesteps).flip(0)]
    for i, (t_prev, t) in enumerate(zip([-1] + ascending[:-1], ascending)):
        ab, ab_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
        pred = denoise(x, _t(t_prev if t_prev >= 0 else t, x))
        x_next = _inversion_step(x, pred.eps, ab, ab_prev)
        for _ in range(fixed_point_iters):
            pred = denoise(x_next, _t(t, x))
            x_next = _inversion_step(x, pred.eps, ab, ab_prev)
        x = x_next
        if callback is not None:
            callback(i, t, x, pred)
    return x


def _inversion_step(x_s: Tensor, eps: Tensor, alpha_bar, alpha_bar_prev) -> Tensor:
    """x_t = sqrt(a_t) (x_s - sqrt(1 - a_s) eps) / sqrt(a_s) + sqrt(1 - a_t) eps: eq. 12 solved for x_t."""
    x0 = process.x0_from_eps(x_s, eps, alpha_bar_prev) if float(alpha_bar_prev) < 1 else x_s
    return process.q_sample(x0, eps, alpha_bar)


def langevin(denoise: DenoiseFn, x_T: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
             generator: Generator = None, callback: Callback = None, n_corrector: int = 1,
             snr: float = 0.16) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 5, with an ancestral predictor): at each
    noise level, `n_corrector` steps of annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1)
    x += delta * score + sqrt(2 delta) z with the score -eps / sqrt(1 - alpha_bar), then an ancestral step.

    delta = 2 alpha_t snr^2 (1 - alpha_bar_t): NCSN's step proportional to the noise variance, which is
    Song et al.'s 2 alpha (snr ||z|| / ||score||)^2 with ||score||^2 at its noise-only value dim / (1 - alpha_bar).
    Unlike a per-sample norm it does not depend on the sample, so low-dimensional data is not distorted."""
    if n_corrector < 0 or snr <= 0:
        raise ValueError(f"langevin needs n_corrector >= 0 and snr > 0; got n_corrector={n_corrector}, snr={snr}")
    x = x_T
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        tt = _t(t, x)
        ab, ab_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
        alpha = 1 - process.step_beta(ab, ab_prev)
        delta = float(2 * alpha * snr**2 * (1 - ab))
        for _ in range(n_corrector):
            score = -denoise(x, tt).eps * float((1 - ab).rsqrt())
            x = x + delta * score + (2 * delta) ** 0.5 * _noise(x, generator)
        pred = denoise(x, tt)
        noise = _noise(x, generator) if t_prev >= 0 else None
        x = ddpm_step(x, pred, ab, ab_prev, "fixed_small", noise)
        if callback is not None:
            callback(i, t, x, pred)
    return x


def dpmpp_2m(denoise: DenoiseFn, x_T: Tensor, schedule: NoiseSchedule, timesteps: Tensor, *,
             generator: Generator = None, callback: Callback = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (data prediction, multistep second order), in
    lambda = log(alpha / sigma) with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar). The first step is
    first order, and so is the last, which lands on sigma = 0 where it returns the x0 prediction."""
    del generator  # deterministic; accepted so every sampler has the same signature
    x = x_T
    x0_prev: Optional[Tensor] = None
    h_prev: Optional[Tensor] = None
    for i, (t, t_prev) in enumerate(_pairs(timesteps)):
        pred = denoise(x, _t(t, x))
        if t_prev < 0:
            x = pred.x0
        else:
            ab, ab_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
            alpha_s, sigma_s = ab.sqrt(), (1 - ab).sqrt()
            alpha_t, sigma_t = ab_prev.sqrt(), (1 - ab_prev).sqrt()
            h = torch.log(alpha_t / sigma_t) - torch.log(alpha_s / sigma_s)
            if x0_prev is None:
                d = pred.x0
            else:
                r = h_prev / h
                d = (1 + 0.5 / r).to(x.dtype) * pred.x0 - (0.5 / r).to(x.dtype) * x0_prev
            x = float(sigma_t / sigma_s) * x - float(alpha_t * torch.expm1(-h)) * d
            h_prev = h
        x0_prev = pred.x0
        if callback is not None:
            callback(i, t, x, pred)
    return x
