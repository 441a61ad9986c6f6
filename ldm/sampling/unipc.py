"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and a corrector (UniC) that reuses the network call the
next step makes anyway, so order p + 1 costs no extra evaluation.

Time is lambda = -log(sigma) (sigma = sigma_vp / alpha), as in DPM-Solver. With data prediction (predict_x0, the
default) m is the network's x0; with noise prediction m is its eps. A step from level s to t, h = lambda_t -
lambda_s, hh = -h (data) or h (noise), writes

    x_t = c_x x_s - c_m ((e^hh - 1) m_s + B(hh) sum_k rho_k D_k),

c_x = sigma_vp,t / sigma_vp,s and c_m = alpha_t for data prediction (alpha_t / alpha_s and sigma_vp,t for noise),
D_k = (m_k - m_s) / r_k the outputs at earlier levels k as divided differences with r_k = (lambda_k - lambda_s)
/ h, and B(hh) = hh (bh1) or e^hh - 1 (bh2). The rho solve the paper's order conditions R rho = b, R_ik = r_k^i,
b_i = i! phi_{i+1}(hh) / B(hh) (Algorithms 1-3; UniP-2 takes rho = 1/2). The corrector repeats the step from
x_s once m_t is known, adding m_t as the point r = 1 (UniC-1 takes rho = 1/2), and the next step starts from the
corrected x_t; the network is never called on the corrected sample, as in the paper and diffusers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..diffusion.denoiser import DenoiseFn, per_row
from .common import Callback, NoiseSource, ab, finite, pairs

Tensor = torch.Tensor


def unipc(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
          callback: Callback = None, order: int = 2, solver_type: str = "bh2", predict_x0: bool = True,
          corrector: bool = True, lower_order_final: bool = True) -> Tensor:
    """UniPC-p with B(h) = solver_type ("bh1" or "bh2"), orders 1 to 3. The first steps use the orders their
    history allows; with lower_order_final (diffusers' default) the last steps use at most the number of steps
    left; a last step to sigma 0 returns the x0 prediction. corrector=False is UniP alone. A step between equal
    levels leaves x as it is."""
    del generator
    x = x_T
    history: list[tuple[Tensor, float]] = []  # (m, lambda) of the levels evaluated, newest last
    last: Optional[tuple[Tensor, float, float, int]] = None  # (x_s, s, t, order) of the last predictor step
    steps = pairs(finite(sigmas))
    for i, (s, s_next) in enumerate(steps):
        pred = denoise(x, per_row(s, x.shape[0]))
        m, lam = (pred.x0 if predict_x0 else pred.eps), -math.log(s)
        if corrector and last is not None:
            x_s, s_prev, _, p = last
            x = _update(x_s, history, s_prev, s, p, solver_type, predict_x0, m_t=m)
        if history and history[-1][1] == lam:  # a repeated level: its newest output replaces the old
            history[-1] = (m, lam)
        else:
            history = (history + [(m, lam)])[-order:]
        last = None
        if s_next == 0:
            x = pred.x0
        elif s_next < s:
            p = min(order, len(steps) - i if lower_order_final else order, len(history))
            last = (x, s, s_next, p)
            x = _update(x, history, s, s_next, p, solver_type, predict_x0)
        if callback is not None:
            callback(i, s, x, pred)
    return x


def _update(x: Tensor, history: list[tuple[Tensor, float]], s: float, t: float, order: int, solver_type: str,
            predict_x0: bool, m_t: Optional[Tensor] = None) -> Tensor:
    """UniP-order from level s (history's newest) to t, or, given m_t (the output at t), UniC-order."""
    ab_s, ab_t = float(ab(s)), float(ab(t))
    alpha_s, alpha_t, sig_s, sig_t = math.sqrt(ab_s), math.sqrt(ab_t), math.sqrt(1 - ab_s), math.sqrt(1 - ab_t)
    m0, lam_s = history[-1]
    h = -math.log(t) - lam_s
    hh = -h if predict_x0 else h
    c_x, c_m = (sig_t / sig_s, alpha_t) if predict_x0 else (alpha_t / alpha_s, sig_t)
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else h_phi_1
    n = order if m_t is not None else order - 1  # unknowns: earlier points (+ m_t for the corrector)
    earlier = history[-order:-1][::-1]  # (m_k, lambda_k), nearest first
    rks = [(lam_k - lam_s) / h for _, lam_k in earlier]
    diffs = [(m_k - m0) / r for (m_k, _), r in zip(earlier, rks)]
    if m_t is not None:
        rks, diffs = rks + [1.0], diffs + [m_t - m0]
    out = c_x * x - (c_m * h_phi_1) * m0
    if n == 0:
        return out
    rhos = [0.5] if n == 1 else _solve_rhos(rks, hh, b_h)
    res = sum(rho * d for rho, d in zip(rhos, diffs))
    return out - (c_m * b_h) * res


def _solve_rhos(rks: list[float], hh: float, b_h: float) -> list[float]:
    """rho from sum_k r_k^i rho_k = i! phi_{i+1}(hh) / B(hh), i = 0 .. len(rks) - 1."""
    b, h_phi_k, factorial = [], math.expm1(hh) / hh - 1, 1
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.tensor([[rk**i for rk in rks] for i in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(r, torch.tensor(b, dtype=torch.float64)).tolist()
