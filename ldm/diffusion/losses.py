"""Training losses and likelihood: L_simple, L_vlb, L_hybrid, SNR weights, timestep samplers, bits/dim.

Ho et al. 2020 (L_simple, eq. 14; L_vlb, eq. 5), Nichol & Dhariwal 2021 (L_hybrid, eq. 16; importance
sampling, eq. 18), Hang et al. 2023 (min-SNR-gamma weighting).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import random
from . import parameterization as param
from . import process
from .denoiser import Denoiser, DenoiseFn, Prediction
from .schedule import NoiseSchedule

Tensor = torch.Tensor
LOSS_TYPES = ("simple", "hybrid", "vlb")
LN2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def reverse_log_variance(pred: Prediction, schedule: NoiseSchedule, t: Tensor, variance_type: str) -> Tensor:
    """log variance of p(x_{t-1} | x_t) on the full schedule: learned if the prediction has one, else fixed.
    At t = 0 fixed_small uses beta~_1 (the clipped log variance), as the L_0 decoder needs a positive scale."""
    if pred.log_var is not None:
        return pred.log_var
    idx = t.cpu()
    if variance_type == "fixed_small":
        table = schedule.posterior_log_variance_clipped
    elif variance_type == "fixed_large":
        # improved DDPM: beta_t, except beta~_1 at t = 0 so the decoder is not wider than beta~ allows.
        table = torch.cat([schedule.posterior_log_variance_clipped[1:2], schedule.betas[1:].log()])
    else:
        raise ValueError(f"a prediction without log_var needs a fixed variance_type "
                         f"({', '.join(param.FIXED_VARIANCE_TYPES)}); got {variance_type!r}")
    return process._bc(table[idx], pred.x0).expand_as(pred.x0)


def vlb_terms(pred: Prediction, x0: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule,
              variance_type: str = "fixed_small") -> Tensor:
    """L_{t} in bits per dimension, one per sample: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
    and the discretized-Gaussian decoder NLL -log p(x_0 | x_1) for t = 0 (x0 on the 8-bit grid in [-1, 1])."""
    alpha_bar = schedule.alpha_bar_at(t)
    alpha_bar_prev = schedule.alpha_bar_at(t - 1)
    true_mean = process.posterior_mean(x0, x_t, alpha_bar, alpha_bar_prev)
    true_log_var = process._bc(schedule.posterior_log_variance_clipped[t.cpu()], x0)
    model_mean = process.posterior_mean(pred.x0, x_t, alpha_bar, alpha_bar_prev)
    model_log_var = reverse_log_variance(pred, schedule, t, variance_type)
    kl = mean_flat(process.normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / LN2
    nll = -mean_flat(process.discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / LN2
    return torch.where(t.to(kl.device) == 0, nll, kl)


def prior_bpd(x0: Tensor, schedule: NoiseSchedule) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per sample."""
    t_last = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.long)
    alpha_bar = schedule.alpha_bar_at(t_last)
    mean = process._bc(alpha_bar.sqrt(), x0) * x0
    log_var = process._bc((1 - alpha_bar).log(), x0).expand_as(x0)
    zero = torch.zeros_like(x0)
    return mean_flat(process.normal_kl(mean, log_var, zero, zero)) / LN2


@torch.no_grad()
def bits_per_dim(denoise: DenoiseFn, x0: Tensor, schedule: NoiseSchedule, variance_type: str = "fixed_small",
                 generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """The full variational bound in bits/dim, one stochastic pass over every timestep (improved DDPM's
    calc_bpd_loop): total = L_T + sum_t L_t. Returns per-sample tensors: total, prior, and terms [B, T]."""
    terms = []
    for step in range(schedule.num_timesteps):
        t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
        eps = random.randn(x0.shape, generator, x0.dtype, x0.device)
        x_t = process.q_sample(x0, eps, schedule.alpha_bar_at(t))
        terms.append(vlb_terms(denoise(x_t, schedule.sigma_at(t).cpu()), x0, x_t, t, schedule, variance_type))
    terms = torch.stack(terms, dim=1)
    prior = prior_bpd(x0, schedule)
    return {"total": terms.sum(1) + prior, "prior": prior, "terms": terms}


def snr_weight(alpha_bar: Tensor, prediction_type: str, gamma: float) -> Tensor:
    """Min-SNR-gamma weight of the MSE on the network's own target (Hang et al. 2023, sec. 3.4):
    min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR + 1) for v, min(SNR, gamma) for x0."""
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction_type]


def training_losses(denoiser: Denoiser, x0: Tensor, t: Tensor, noise: Optional[Tensor] = None,
                    loss_type: str = "simple", vlb_weight: float = 0.001, snr_gamma: Optional[float] = None,
                    **cond) -> dict[str, Tensor]:
    """Per-sample training losses at timesteps t.

    simple: MSE between the network output and its target (L_simple), min-SNR weighted if snr_gamma is set.
        With a learned variance the variance is still trained through the L_vlb term, as in improved DDPM.
    hybrid: L_simple + vlb_weight * T * L_t with the mean detached in L_t (Nichol & Dhariwal eq. 16; T * L_t
        is the one-sample estimate of L_vlb), so L_vlb trains only the variance.
    vlb: T * L_t alone, gradients through mean and variance.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if loss_type == "hybrid" and not denoiser.learns_variance:
        raise ValueError("loss_type='hybrid' needs variance_type 'learned' or 'learned_range'")
    schedule = denoiser.schedule
    noise = random.randn(x0.shape, None, x0.dtype, x0.device) if noise is None else noise
    alpha_bar = schedule.alpha_bar_at(t)
    x_t = process.q_sample(x0, noise, alpha_bar)
    output = denoiser.model(x_t, t, **cond)
    mean_out, _ = denoiser.split(output, x_t)
    target = param.training_target(x0, noise, alpha_bar, denoiser.prediction_type)
    mse = mean_flat((mean_out - target) ** 2)
    if snr_gamma is not None:
        mse = mse * snr_weight(alpha_bar, denoiser.prediction_type, snr_gamma).to(mse)
    losses = {"mse": mse}
    if loss_type == "vlb" or denoiser.learns_variance:
        pred = denoiser.prediction(output, x_t, t, detach_mean=loss_type != "vlb")
        losses["vlb"] = vlb_terms(pred, x0, x_t, t, schedule, denoiser.variance_type) * schedule.num_timesteps
    if loss_type == "vlb":
        losses["loss"] = losses["vlb"]
    elif "vlb" in losses:
        losses["loss"] = mse + vlb_weight * losses["vlb"]
    else:
        losses["loss"] = mse
    return losses


class UniformSampler:
    """t ~ U{0..T-1}; importance weights all 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probabilities(self) -> Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Returns (t [B] long, weights [B]) with E[weight * L_t] = mean_t L_t."""
        p = self.probabilities()
        t = random.multinomial(p, batch_size, generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t, weights.float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Uniform sampling learns nothing from losses."""


class LossAwareSampler(UniformSampler):
    """Importance sampling of L_vlb (Nichol & Dhariwal eq. 18): p_t proportional to sqrt(E[L_t^2]) over the
    last `history` losses seen at each t, mixed with `uniform_prob` of uniform; uniform until every t has
    a full history."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self._losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self._counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self._counts == self.history).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up():
            return super().probabilities()
        p = self._losses.pow(2).mean(1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the per-sample L_t of a batch (detached)."""
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self._counts[ti] == self.history:
                self._losses[ti, :-1] = self._losses[ti, 1:].clone()
                self._losses[ti, -1] = loss
            else:
                self._losses[ti, self._counts[ti]] = loss
                self._counts[ti] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"losses": self._losses.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._losses = state["losses"].clone().double()
        self._counts = state["counts"].clone().long()
