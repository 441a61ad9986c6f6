"""The forward process and its posterior as pure functions of alpha_bar (Ho et al. 2020; Nichol & Dhariwal 2021).

alpha_bar arguments are float64 tensors of shape [B] (one value per sample), 0-dim tensors or floats;
coefficients are computed in float64 and cast to the data's dtype at use.
"""
from __future__ import annotations


import torch

Tensor = torch.Tensor


def _bc(coef, like: Tensor) -> Tensor:
    """Cast a per-sample coefficient to like's dtype/device and shape it to broadcast over like."""
    coef = torch.as_tensor(coef, dtype=torch.float64)
    if coef.ndim == 1:
        coef = coef.reshape(-1, *([1] * (like.ndim - 1)))
    return coef.to(device=like.device, dtype=like.dtype)


def _f64(a) -> Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def alpha_bar_of_sigma(sigma) -> Tensor:
    """alpha_bar = 1 / (1 + sigma^2): the variance-preserving level of the noise level sigma (inf -> 0)."""
    return 1 / (1 + _f64(sigma) ** 2)


def sigma_of_alpha_bar(alpha_bar) -> Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar), 0 for clean data, inf at alpha_bar = 0."""
    ab = _f64(alpha_bar)
    return ((1 - ab) / ab).sqrt()


def q_sample(x0: Tensor, eps: Tensor, alpha_bar) -> Tensor:
    """x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps (Ho et al. eq. 4)."""
    ab = _f64(alpha_bar)
    return _bc(ab.sqrt(), x0) * x0 + _bc((1 - ab).sqrt(), eps) * eps


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar) -> Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    ab = _f64(alpha_bar)
    return _bc(ab.rsqrt(), x_t) * x_t - _bc(((1 - ab) / ab).sqrt(), eps) * eps


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar) -> Tensor:
    """eps = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar)."""
    ab = _f64(alpha_bar)
    return _bc((1 - ab).rsqrt(), x_t) * x_t - _bc((ab / (1 - ab)).sqrt(), x0) * x0


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar) -> Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, sec. 4)."""
    ab = _f64(alpha_bar)
    return _bc(ab.sqrt(), eps) * eps - _bc((1 - ab).sqrt(), x0) * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar) -> Tensor:
    """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
    ab = _f64(alpha_bar)
    return _bc(ab.sqrt(), x_t) * x_t - _bc((1 - ab).sqrt(), v) * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar) -> Tensor:
    """eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t."""
    ab = _f64(alpha_bar)
    return _bc(ab.sqrt(), v) * v + _bc((1 - ab).sqrt(), x_t) * x_t


def step_beta(alpha_bar, alpha_bar_prev) -> Tensor:
    """beta of the step t_prev -> t: 1 - alpha_bar_t / alpha_bar_prev (equal to beta_t on the full schedule)."""
    return 1 - _f64(alpha_bar) / _f64(alpha_bar_prev)


def posterior_variance(alpha_bar, alpha_bar_prev) -> Tensor:
    """beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t (Ho et al. eq. 7)."""
    ab, ab_prev = _f64(alpha_bar), _f64(alpha_bar_prev)
    return (1 - ab_prev) / (1 - ab) * step_beta(ab, ab_prev)


def posterior_mean(x0: Tensor, x_t: Tensor, alpha_bar, alpha_bar_prev) -> Tensor:
    """mu~_t(x_t, x_0) = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x_0
    + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t (Ho et al. eq. 7)."""
    ab, ab_prev = _f64(alpha_bar), _f64(alpha_bar_prev)
    beta = step_beta(ab, ab_prev)
    coef_x0 = ab_prev.sqrt() * beta / (1 - ab)
    coef_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    return _bc(coef_x0, x0) * x0 + _bc(coef_xt, x_t) * x_t


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def _log_normal_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails (uses the mirror image when lo > 0)."""
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    return log_b + torch.log(-torch.expm1((log_a - log_b).clamp(max=-1e-30)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int = 256) -> Tensor:
    """log p(x) for x on the grid of `bins` levels in [-1, 1] under N(mean, exp(log_scale)^2) integrated over
    each bin, the edge bins extended to +-inf (Ho et al. sec. 3.3, the L_0 decoder). Exact normal CDF."""
    half_bin = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scale)
    lo = (x - half_bin - mean) * inv_std
    hi = (x + half_bin - mean) * inv_std
    # Every branch is finite, so gradients stay finite whichever one torch.where picks.
    inner = _log_normal_mass(lo, hi)
    left_edge = torch.special.log_ndtr(hi)
    right_edge = torch.special.log_ndtr(-lo)
    return torch.where(x <= -1 + half_bin, left_edge, torch.where(x >= 1 - half_bin, right_edge, inner))
