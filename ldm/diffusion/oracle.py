"""Closed-form optimal denoisers for Gaussian and Gaussian-mixture data: the ground truth the samplers,
guidance and likelihood code are tested against, and a way to study the math without training anything.

For x0 ~ N(mu, s^2 I) and x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha_bar = 1 / (1 + sigma^2)):
    E[x0 | x_t]   = mu + sqrt(a) s^2 / (a s^2 + 1 - a) * (x_t - sqrt(a) mu)
    Var[x0 | x_t] = s^2 (1 - a) / (a s^2 + 1 - a)
"""
from __future__ import annotations

import torch

from . import process
from .denoiser import DenoiseFn, Prediction
from .schedule import NoiseSchedule

Tensor = torch.Tensor


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _gaussian_posterior(x_t: Tensor, alpha_bar: Tensor, mean: Tensor, std) -> tuple[Tensor, Tensor]:
    a = _per_sample(alpha_bar, x_t)
    var_t = a * std**2 + (1 - a)
    x0 = mean + a.sqrt() * std**2 / var_t * (x_t - a.sqrt() * mean)
    return x0, std**2 * (1 - a) / var_t


def gaussian_denoiser(mean, std, exact_variance: bool = False,
                      schedule: NoiseSchedule | None = None) -> DenoiseFn:
    """E[x0 | x_t] for x0 ~ N(mean, diag(std^2)); `mean` and `std` (a number or a tensor) broadcast against one
    sample (e.g. shape [D]).

    With exact_variance, log_var is the true variance of q(x_{t-1} | x_t) on the full schedule,
    beta~_t + c_t^2 Var[x0 | x_t] with c_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t); this reverse
    process is then exact step by step, so only discretization and the decoder separate its VLB from the NLL;
    only that variance needs the `schedule` (the levels' nearest training timesteps give t - 1).
    """
    if exact_variance and schedule is None:
        raise ValueError("exact_variance needs the schedule whose steps it is exact on")

    def denoise(x_t: Tensor, sigma: Tensor) -> Prediction:
        alpha_bar = process.alpha_bar_of_sigma(sigma)
        mu = torch.as_tensor(mean, dtype=x_t.dtype, device=x_t.device)
        x0, var_x0 = _gaussian_posterior(x_t, alpha_bar, mu, torch.as_tensor(std, dtype=x_t.dtype, device=x_t.device))
        eps = process.eps_from_x0(x_t, x0, alpha_bar)
        if not exact_variance:
            return Prediction(x0, eps)
        alpha_bar_prev = schedule.alpha_bar_at(schedule.timestep_of(sigma).round().long() - 1)
        coef = alpha_bar_prev.sqrt() * process.step_beta(alpha_bar, alpha_bar_prev) / (1 - alpha_bar)
        var = (_per_sample(process.posterior_variance(alpha_bar, alpha_bar_prev), x_t)
               + _per_sample(coef, x_t) ** 2 * var_x0)
        return Prediction(x0, eps, log_var=torch.log(var).expand_as(x_t))
    return denoise


def mixture_class_log_posterior(means: Tensor, std: float, weights: Tensor | None, x_t: Tensor,
                                sigma: Tensor) -> Tensor:
    """log p(k | x_t, sigma) for the K components of sum_k w_k N(means[k], std^2 I): the exact noisy classifier.
    Returns [B, K]."""
    means = means.to(x_t.dtype)
    k = means.shape[0]
    w = torch.full((k,), 1.0 / k) if weights is None else torch.as_tensor(weights)
    a = _per_sample(process.alpha_bar_of_sigma(sigma), x_t).unsqueeze(1)                        # [B, 1, 1...]
    var_t = a * std**2 + (1 - a)
    diff = x_t.unsqueeze(1) - a.sqrt() * means.unsqueeze(0)                            # [B, K, ...]
    log_lik = -0.5 * (diff**2 / var_t).flatten(2).sum(-1)                              # shared normalizer cancels
    return torch.log_softmax(log_lik + torch.log(w.to(x_t)), dim=1)


def gaussian_mixture_denoiser(means: Tensor, std: float, weights: Tensor | None = None) -> DenoiseFn:
    """E[x0 | x_t] for a mixture of Gaussians with a shared isotropic std: sum_k p(k | x_t) E[x0 | x_t, k]."""
    def denoise(x_t: Tensor, sigma: Tensor) -> Prediction:
        alpha_bar = process.alpha_bar_of_sigma(sigma)
        resp = mixture_class_log_posterior(means, std, weights, x_t, sigma).exp()   # [B, K]
        x0 = torch.zeros_like(x_t)
        for k in range(means.shape[0]):
            x0_k, _ = _gaussian_posterior(x_t, alpha_bar, means[k].to(x_t.dtype), std)
            x0 = x0 + _per_sample(resp[:, k], x_t) * x0_k
        return Prediction(x0, process.eps_from_x0(x_t, x0, alpha_bar))
    return denoise
