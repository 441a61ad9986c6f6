"""Pseudo linear multistep (PLMS; Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", eq. 12 with
the DDIM transfer of eq. 9): the sampler of the latent-diffusion paper and Stable Diffusion 1.x's default
(diffusers' PNDMScheduler with skip_prk_steps=True).

The noise estimates of the last steps are combined by the Adams-Bashforth weights of equal steps (1; 3/2, -1/2;
23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24) and the combined eps is moved with a deterministic DDIM step.
The first step has no history: it is a second-order pseudo-improved-Euler step (an eps at the start, a trial DDIM
step, an eps there, the average of both), so n steps take n + 1 network calls, as diffusers'.
"""
from __future__ import annotations

import torch

from ..diffusion import process
from ..diffusion.denoiser import DenoiseFn, Prediction, per_row
from .common import Callback, NoiseSource, ab, finite, pairs
from .samplers import ddim_step

Tensor = torch.Tensor

_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _transfer(x: Tensor, eps: Tensor, s: float, s_next: float) -> Tensor:
    """PNDM's transfer phi(x_t, eps, t, t'): the DDIM step with this eps."""
    a = ab(s)
    return ddim_step(x, Prediction(process.x0_from_eps(x, eps, a), eps), a, ab(s_next))


def plms(denoise: DenoiseFn, x_T: Tensor, sigmas: Tensor, *, generator: NoiseSource = None,
         callback: Callback = None) -> Tensor:
    del generator
    x = x_T
    history: list[Tensor] = []  # eps at the start of each step, newest last
    for i, (s, s_next) in enumerate(pairs(finite(sigmas))):
        pred = denoise(x, per_row(s, x.shape[0]))
        if not history:
            trial = _transfer(x, pred.eps, s, s_next)
            eps = (pred.eps + denoise(trial, per_row(s_next, x.shape[0])).eps) / 2
        else:
            recent = (history + [pred.eps])[-4:]
            eps = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(recent)], reversed(recent)))
        history = (history + [pred.eps])[-3:]
        x = _transfer(x, eps, s, s_next)
        if callback is not None:
            callback(i, s, x, pred)
    return x
