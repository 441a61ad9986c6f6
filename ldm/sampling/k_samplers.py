"""The k-diffusion family (Karras et al. 2022; Crowson's k-diffusion): ODE and ancestral solvers on
x = x0 + sigma eps, whose probability-flow ODE is dx/dsigma = (x - x0(x, sigma)) / sigma = eps.

They take and return variance-preserving x, as every sampler here, and step on x0 + sigma eps inside. A grid
starting at sigma = inf (zero terminal SNR) starts at common.MAX_SIGMA, as diffusers' Euler schedulers do.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..diffusion.denoiser import DenoiseFn
from .common import Callback, NoiseSource, denoise_ve, finite, noise_like, pairs, to_ve, to_vp

Tensor = torch.Tensor


def euler(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
          callback: Callback = None) -> Tensor:
    """Euler's method on the ODE (Karras et al. 2022, Algorithm 1 without churn): x += (sigma' - sigma) eps.
    On the variance-preserving scale this is DDIM with eta = 0."""
    del generator
    levels = finite(sigmas)
    x = to_ve(x_T, float(levels[0]))
    for i, (s, s_next) in enumerate(pairs(levels)):
        pred = denoise_ve(denoise, x, s)
        x = x + (s_next - s) * ((x - pred.x0) / s)
        if callback is not None:
            callback(i, s, to_vp(x, s_next), pred)
    return to_vp(x, float(levels[-1]))


def euler_ancestral(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
                    callback: Callback = None, eta: float = 1.0) -> Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up, with
    sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)) and sigma_down^2 = sigma'^2 -
    sigma_up^2 (eta = 1: the ancestral step of DDPM, diffusers' EulerAncestralDiscreteScheduler)."""
    levels = finite(sigmas)
    x = to_ve(x_T, float(levels[0]))
    for i, (s, s_next) in enumerate(pairs(levels)):
        pred = denoise_ve(denoise, x, s)
        up = min(s_next, eta * math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
        down = math.sqrt(s_next**2 - up**2)
        x = x + (down - s) * ((x - pred.x0) / s)
        if up > 0:
            x = x + up * noise_like(x, generator)
        if callback is not None:
            callback(i, s, to_vp(x, s_next), pred)
    return to_vp(x, float(levels[-1]))


def heun(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
         callback: Callback = None) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1): an Euler step, then the average of the slopes
    at both ends; the last step to sigma 0 is an Euler step. 2n - 1 network calls for n steps."""
    del generator
    levels = finite(sigmas)
    x = to_ve(x_T, float(levels[0]))
    for i, (s, s_next) in enumerate(pairs(levels)):
        pred = denoise_ve(denoise, x, s)
        d = (x - pred.x0) / s
        x_euler = x + (s_next - s) * d
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise_ve(denoise, x_euler, s_next).x0) / s_next
            x = x + (s_next - s) * ((d + d_next) / 2)
        if callback is not None:
            callback(i, s, to_vp(x, s_next), pred)
    return to_vp(x, float(levels[-1]))


def lms_coefficients(nodes: list[float], start: float, end: float) -> list[float]:
    """Linear multistep weights for the step start -> end: the integrals over it of the Lagrange basis
    polynomials through `nodes` (the levels of the stored slopes, newest first), computed exactly."""
    weights = []
    for j, node in enumerate(nodes):
        basis = np.polynomial.Polynomial([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * np.polynomial.Polynomial([-other, 1.0]) / (node - other)
        integral = basis.integ()
        weights.append(float(integral(end) - integral(start)))
    return weights


def lms(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
        callback: Callback = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma with the grid's own spacing; k-diffusion's sample_lms and
    diffusers' LMSDiscreteScheduler): x += sum_j c_j eps_j over the slopes at the last min(order, i + 1)
    levels. A step between equal levels leaves x as it is."""
    del generator
    levels = finite(sigmas)
    x = to_ve(x_T, float(levels[0]))
    slopes: list[tuple[float, Tensor]] = []  # (level, slope), oldest first
    for i, (s, s_next) in enumerate(pairs(levels)):
        pred = denoise_ve(denoise, x, s)
        slopes = [(lv, d) for lv, d in slopes if lv != s][-(order - 1):] if order > 1 else []
        slopes.append((s, (x - pred.x0) / s))
        coeffs = lms_coefficients([lv for lv, _ in reversed(slopes)], s, s_next)
        x = x + sum(c * d for c, (_, d) in zip(coeffs, reversed(slopes)))
        if callback is not None:
            callback(i, s, to_vp(x, s_next), pred)
    return to_vp(x, float(levels[-1]))
