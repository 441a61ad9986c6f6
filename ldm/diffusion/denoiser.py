"""The one place that knows what a network outputs: network + schedule + parameterization -> Prediction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import parameterization as param
from . import process
from .schedule import NoiseSchedule

Tensor = torch.Tensor


@dataclass(frozen=True)
class Prediction:
    """A denoiser's estimate at (x_t, t).

    x0, eps: the clean-data and noise estimates (each derivable from the other given x_t).
    log_var: learned log variance of p(x_{t-1} | x_t) on the full schedule, or None for fixed variances.
    var_frac: for learned-range variances, the interpolation v in [0, 1] between log beta~ and log beta,
        which samplers on a respaced subset of timesteps apply to their own beta and beta~.
    """

    x0: Tensor
    eps: Tensor
    log_var: Optional[Tensor] = None
    var_frac: Optional[Tensor] = None


# denoise(x_t, sigma) -> Prediction: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps at the noise levels sigma
# (float64, shape [B], on the CPU; alpha_bar = 1 / (1 + sigma^2)). Conditioning is bound in by closure or partial.
DenoiseFn = Callable[[Tensor, Tensor], Prediction]
TIMESTEP_ROUNDINGS = (None, "nearest", "floor")


def per_row(sigma, batch: int) -> Tensor:
    """Noise levels as the float64 CPU tensor [batch] a DenoiseFn takes (a number or 0-dim tensor is repeated)."""
    if isinstance(sigma, int) or (isinstance(sigma, Tensor) and not sigma.is_floating_point()):
        raise TypeError("sigma: expected noise levels (floats; schedule.sigma_at(t) for training timesteps t), "
                        "got integers")
    sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
    return sigma.expand(batch).clone() if sigma.ndim == 0 else sigma


class Denoiser:
    """Binds a network to a schedule: `denoiser(x_t, sigma, **cond) -> Prediction`, a DenoiseFn.

    The one place a noise level becomes the network's time input: schedule.timestep_of(sigma), the training
    timestep on the grid and a fractional one between (float32; rounded to the nearest or the one below with
    timestep_rounding "nearest" or "floor", as diffusers' multistep solvers feed integer timesteps). The
    network is called as `model(x_t, t, **cond)` and returns C channels (fixed variance) or 2C channels
    (learned / learned_range: the second half is the log variance or the range logit v in [-1, 1]). Training
    calls the network at integer timesteps itself and turns its output into a Prediction with `prediction`.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, prediction_type: str = "eps",
                 variance_type: str = "fixed_small", timestep_rounding: Optional[str] = None):
        self.model = model
        self.schedule = schedule
        if timestep_rounding not in TIMESTEP_ROUNDINGS:
            raise ValueError(f"timestep_rounding must be one of None, 'nearest', 'floor'; got {timestep_rounding!r}")
        self.timestep_rounding = timestep_rounding
        self.prediction_type = param.check_prediction_type(prediction_type)
        self.variance_type = param.check_variance_type(variance_type)

    @property
    def learns_variance(self) -> bool:
        return self.variance_type in ("learned", "learned_range")

    def __call__(self, x_t: Tensor, sigma: Tensor, **cond) -> Prediction:
        sigma = per_row(sigma, x_t.shape[0])
        t = self.schedule.timestep_of(sigma)
        if self.timestep_rounding == "nearest":
            t = t.round()
        elif self.timestep_rounding == "floor":
            t = t.floor()
        output = self.model(x_t, t.to(device=x_t.device, dtype=torch.float32), **cond)
        return self._predict(output, x_t, process.alpha_bar_of_sigma(sigma), t.round().long())

    def split(self, output: Tensor, x_t: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Separate the mean output from the variance output (channel dim 1)."""
        if not self.learns_variance:
            return output, None
        channels = x_t.shape[1]
        if output.shape[1] != 2 * channels:
            raise ValueError(f"variance_type={self.variance_type!r} needs a network output with 2x{channels} "
                             f"channels; got {output.shape[1]}")
        return output[:, :channels], output[:, channels:]

    def prediction(self, output: Tensor, x_t: Tensor, t: Tensor, detach_mean: bool = False) -> Prediction:
        """Network output at integer timesteps t -> Prediction. detach_mean stops gradients through x0/eps (the
        L_vlb term of L_hybrid)."""
        return self._predict(output, x_t, self.schedule.alpha_bar_at(t), t, detach_mean)

    def _predict(self, output: Tensor, x_t: Tensor, alpha_bar: Tensor, t: Tensor,
                 detach_mean: bool = False) -> Prediction:
        """t: the integer timesteps whose beta and beta~ bound a learned-range variance (the nearest ones)."""
        mean_out, var_out = self.split(output, x_t)
        if detach_mean:
            mean_out = mean_out.detach()
        x0, eps = param.to_x0_eps(mean_out, x_t, alpha_bar, self.prediction_type)
        if var_out is None:
            return Prediction(x0, eps)
        if self.variance_type == "learned":
            return Prediction(x0, eps, log_var=var_out)
        frac = (var_out + 1) / 2
        idx = t.cpu()
        min_log = self.schedule.posterior_log_variance_clipped[idx]
        max_log = self.schedule.betas[idx].log()
        log_var = param.interpolated_log_variance(frac, min_log, max_log)
        return Prediction(x0, eps, log_var=log_var, var_frac=frac)
