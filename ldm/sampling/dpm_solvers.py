"""DPM-Solver++ multistep samplers (Lu et al. 2022), deterministic and stochastic, as one solver.

Time is lambda = log(alpha / sigma_vp) = -log(sigma), with alpha = sqrt(alpha_bar) and sigma_vp = sqrt(1 - alpha_bar);
the network's x0 predictions at the last levels are extrapolated as a polynomial in lambda (order 1, 2 or 3).
The stochastic variant (eta > 0) integrates the SDE whose eta = 1 case is the reverse-time SDE
(SDE-DPM-Solver++, Lu et al. 2022, sec. 5; k-diffusion's dpmpp_2m_sde / dpmpp_3m_sde):

    x_t = (sigma_vp_t / sigma_vp_s) e^{-eta h} x_s + alpha_t (1 - e^{-(1+eta) h}) D0 + alpha_t phi_2 D1
          - alpha_t phi_3 D2 + sigma_vp_t sqrt(1 - e^{-2 eta h}) z,

h = lambda_t - lambda_s, D0 the newest x0, D1 and D2 its scaled first and second divided differences in lambda,
phi_2(z) = (e^{-z} - 1) / z + 1 and phi_3(z) = phi_2(z) / z - 1/2 at z = (1 + eta) h (the exact integrals of the
polynomial against the solver's exponential weight). Second order uses the midpoint form 0.5 (1 - e^{-z}) D1
(solver_type "midpoint", diffusers' default and k-diffusion's 2M) or the integral's phi_2 D1 ("heun", which
k-diffusion's 3M SDE takes for its second step). diffusers' third-order SDE update writes -phi_3 - 1 where the
integral gives -phi_3 (its D2 term's constant has the wrong sign); ours is the integral's.
"""
from __future__ import annotations

import math
import torch

from ..diffusion.denoiser import DenoiseFn, per_row
from .common import Callback, NoiseSource, ab, finite, noise_like, pairs

Tensor = torch.Tensor


def _phi2(z: float) -> float:
    return math.expm1(-z) / z + 1


def multistep(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, order: int, eta: float = 0.0,
              generator: NoiseSource = None, callback: Callback = None, lower_order_final: bool = True,
              solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++ of the given order (1 to 3) with stochasticity eta (0: the probability-flow ODE). The first
    steps use the lower orders their history allows; a last step to sigma 0 is first order (it returns the x0
    prediction); with lower_order_final and under 15 steps, as diffusers, the last step is first order and the
    one before at most second order. A step between equal levels leaves x as it is. A grid starting at
    sigma = inf starts at the clamped level common.MAX_SIGMA."""
    steps = pairs(finite(sigmas))
    x = x_T
    history: list[tuple[Tensor, float]] = []  # (x0, lambda) of the levels evaluated, newest last
    for i, (s, s_next) in enumerate(steps):
        pred = denoise(x, per_row(s, x.shape[0]))
        lam = -math.log(s)
        if history and history[-1][1] == lam:  # a repeated level: its newest prediction replaces the old
            history[-1] = (pred.x0, lam)
        else:
            history = (history + [(pred.x0, lam)])[-3:]
        if s_next == 0:
            x = pred.x0
        elif s_next < s:
            x = _step(x, history, s, s_next, _order_at(i, len(steps), order, len(history), lower_order_final),
                      eta, generator, solver_type)
        if callback is not None:
            callback(i, s, x, pred)
    return x


def _order_at(i: int, n: int, order: int, available: int, lower_order_final: bool) -> int:
    if lower_order_final and n < 15:
        order = 1 if i == n - 1 else min(order, 2) if i == n - 2 else order
    return min(order, available)


def _step(x: Tensor, history: list[tuple[Tensor, float]], s: float, s_next: float, order: int, eta: float,
          generator: NoiseSource, solver_type: str) -> Tensor:
    ab_s, ab_t = float(ab(s)), float(ab(s_next))
    alpha_t, sig_s, sig_t = math.sqrt(ab_t), math.sqrt(1 - ab_s), math.sqrt(1 - ab_t)
    lam_s, lam_t = history[-1][1], -math.log(s_next)
    h = lam_t - lam_s
    z = (1 + eta) * h
    m0 = history[-1][0]
    out = (sig_t / sig_s * math.exp(-eta * h)) * x - (alpha_t * math.expm1(-z)) * m0
    if order >= 2:
        (m1, lam_1) = history[-2]
        r0 = (lam_s - lam_1) / h
        d1_0 = (m0 - m1) / r0
        if order == 2 and solver_type == "heun":
            out = out + (alpha_t * _phi2(z)) * d1_0
        elif order == 2:
            out = out - (0.5 * alpha_t * math.expm1(-z)) * d1_0
        else:
            (m2, lam_2) = history[-3]
            r1 = (lam_1 - lam_2) / h
            d1_1 = (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = _phi2(z)
            out = out + (alpha_t * phi2) * d1 - (alpha_t * (phi2 / z - 0.5)) * d2
    if eta > 0:
        out = out + (sig_t * math.sqrt(-math.expm1(-2 * eta * h))) * noise_like(x, generator)
    return out


def dpmpp_2m(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
             callback: Callback = None, lower_order_final: bool = True, solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: deterministic, multistep second order."""
    return multistep(denoise, x_T, sigmas, order=2, eta=0.0, generator=generator, callback=callback,
                     lower_order_final=lower_order_final, solver_type=solver_type)


def dpmpp_2m_sde(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
                 callback: Callback = None, eta: float = 1.0, lower_order_final: bool = True,
                 solver_type: str = "midpoint") -> Tensor:
    """SDE-DPM-Solver++(2M): second order, fresh noise at every step (eta = 1: the reverse SDE)."""
    return multistep(denoise, x_T, sigmas, order=2, eta=eta, generator=generator, callback=callback,
                     lower_order_final=lower_order_final, solver_type=solver_type)


def dpmpp_3m_sde(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
                 callback: Callback = None, eta: float = 1.0, lower_order_final: bool = True,
                 solver_type: str = "midpoint") -> Tensor:
    """SDE-DPM-Solver++(3M): third order, fresh noise at every step."""
    return multistep(denoise, x_T, sigmas, order=3, eta=eta, generator=generator, callback=callback,
                     lower_order_final=lower_order_final, solver_type=solver_type)


