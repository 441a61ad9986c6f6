"""Transforms DenoiseFn -> DenoiseFn. Each changes x0 and/or eps consistently at the given x_t and noise level
(alpha_bar = 1 / (1 + sigma^2)), so it works with every sampler and needs no schedule."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import is_number
from ..diffusion import process
from ..diffusion.denoiser import DenoiseFn, Prediction

Tensor = torch.Tensor


def classifier_free_guidance(denoise_pair: DenoiseFn, guidance_scale: float) -> DenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps~ = eps_u + w (eps_c - eps_u), in one batched call.

    `denoise_pair` sees a batch of 2B: the first B rows carry the unconditional (or negative-prompt)
    conditioning, the last B the conditional one. x0 is combined with the same weights, which is the same
    thing because x0 is affine in eps at fixed x_t. The variance, if learned, is the conditional one."""
    check_guidance_scale(guidance_scale)

    def denoise(x_t: Tensor, sigma: Tensor) -> Prediction:
        pred = denoise_pair(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]))
        b = x_t.shape[0]

        def mix(v: Tensor) -> Tensor:
            return v[:b] + guidance_scale * (v[b:] - v[:b])

        log_var = None if pred.log_var is None else pred.log_var[b:]
        var_frac = None if pred.var_frac is None else pred.var_frac[b:]
        return Prediction(mix(pred.x0), mix(pred.eps), log_var, var_frac)
    return denoise


def check_guidance_scale(guidance_scale) -> None:
    if not is_number(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a number >= 0; got {guidance_scale!r}")


def _with_x0(pred: Prediction, x_t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Prediction:
    return Prediction(x0, process.eps_from_x0(x_t, x0, alpha_bar), pred.log_var, pred.var_frac)


def classifier_guidance(denoise: DenoiseFn, log_prob: Callable[[Tensor, Tensor], Tensor],
                        scale: float) -> DenoiseFn:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 in eps form):
    eps~ = eps - sqrt(1 - alpha_bar) * scale * grad_x log p(y | x_t, sigma); x0 re-derived from eps~.
    `log_prob(x_t, sigma)` returns one log-probability per sample and must be differentiable in x_t (a
    classifier trained on timesteps gets them from schedule.timestep_of(sigma))."""
    check_guidance_scale(scale)

    def guided(x_t: Tensor, sigma: Tensor) -> Prediction:
        pred = denoise(x_t, sigma)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            grad, = torch.autograd.grad(log_prob(x, sigma).sum(), x)
        alpha_bar = process.alpha_bar_of_sigma(sigma)
        eps = pred.eps - process._bc((1 - alpha_bar).sqrt() * scale, grad) * grad
        return Prediction(process.x0_from_eps(x_t, eps, alpha_bar), eps, pred.log_var, pred.var_frac)
    return guided


def static_thresholding(denoise: DenoiseFn, limit: float = 1.0) -> DenoiseFn:
    """Clip x0 to [-limit, limit] (Saharia et al. 2022, sec. 2.3) and re-derive eps."""
    if not is_number(limit) or limit <= 0:
        raise ValueError(f"limit must be a number > 0; got {limit!r}")

    def thresholded(x_t: Tensor, sigma: Tensor) -> Prediction:
        pred = denoise(x_t, sigma)
        return _with_x0(pred, x_t, pred.x0.clamp(-limit, limit), process.alpha_bar_of_sigma(sigma))
    return thresholded


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, max_value: Optional[float] = None) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): s = the `percentile` quantile of |x0|
    per sample, s = max(s, 1) (and min(s, max_value) if given, as diffusers' sample_max_value), then
    x0 = clip(x0, -s, s) / s."""
    check_percentile(percentile)
    flat = x0.flatten(1)
    s = torch.quantile(flat.abs().float(), percentile, dim=1).to(x0.dtype).clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s.unsqueeze(1)
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)


def check_percentile(percentile) -> None:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 1:
        raise ValueError(f"percentile must be a number in (0, 1]; got {percentile!r}")


def dynamic_thresholding(denoise: DenoiseFn, percentile: float = 0.995,
                         max_value: Optional[float] = None) -> DenoiseFn:
    """Dynamic thresholding of x0 (see dynamic_threshold), eps re-derived."""
    check_percentile(percentile)

    def thresholded(x_t: Tensor, sigma: Tensor) -> Prediction:
        pred = denoise(x_t, sigma)
        x0 = dynamic_threshold(pred.x0, percentile, max_value)
        return _with_x0(pred, x_t, x0, process.alpha_bar_of_sigma(sigma))
    return thresholded


THRESHOLDING = ("static", "dynamic")


def check_thresholding(thresholding) -> Optional[dict]:
    """None or False (none), "static", "dynamic" or a dict {"kind": ..., options} (static: limit; dynamic:
    percentile, max_value) -> None or the dict, its options checked."""
    if thresholding is None or thresholding is False:
        return None
    if isinstance(thresholding, str):
        spec = {"kind": thresholding}
    elif isinstance(thresholding, dict):
        spec = dict(thresholding)
    else:
        spec = {"kind": None}
    if spec.get("kind") not in THRESHOLDING:
        raise ValueError(f"thresholding must be None, False, 'static', 'dynamic' or a dict with kind in "
                         f"{THRESHOLDING}; got {thresholding!r}")
    max_value = spec.get("max_value")
    if max_value is not None and (not is_number(max_value) or max_value < 1):
        raise ValueError(f"dynamic thresholding's max_value must be None or a number >= 1; got {max_value!r}")
    try:
        _thresholded(lambda x_t, sigma: None, spec)  # checks the options' names and values
    except TypeError:
        known = "limit" if spec["kind"] == "static" else "percentile, max_value"
        raise ValueError(f"{spec['kind']} thresholding takes {known}; got {thresholding!r}") from None
    return spec


def _thresholded(denoise: DenoiseFn, spec: dict) -> DenoiseFn:
    options = {k: v for k, v in spec.items() if k != "kind"}
    return (static_thresholding if spec["kind"] == "static" else dynamic_thresholding)(denoise, **options)


def with_thresholding(denoise: DenoiseFn, thresholding) -> DenoiseFn:
    """The DenoiseFn thresholded as `thresholding` says (see check_thresholding); None or False: unchanged."""
    spec = check_thresholding(thresholding)
    return denoise if spec is None else _thresholded(denoise, spec)
