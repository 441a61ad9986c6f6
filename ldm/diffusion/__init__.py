"""The diffusion core: schedules, the forward process, parameterizations, denoisers and losses."""
from .denoiser import Denoiser, DenoiseFn, Prediction
from .losses import LossAwareSampler, UniformSampler, bits_per_dim, training_losses, vlb_terms
from .grids import karras_sigmas, noise_levels, spaced_timesteps
from .oracle import gaussian_denoiser, gaussian_mixture_denoiser, mixture_class_log_posterior
from .schedule import NoiseSchedule

__all__ = [
    "Denoiser", "DenoiseFn", "Prediction", "NoiseSchedule", "spaced_timesteps", "noise_levels", "karras_sigmas",
    "training_losses",
    "vlb_terms", "bits_per_dim", "UniformSampler", "LossAwareSampler", "gaussian_denoiser",
    "gaussian_mixture_denoiser", "mixture_class_log_posterior",
]
