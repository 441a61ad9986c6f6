"""Bad arguments fail early with a ValueError that names the argument and what it accepts."""
import pytest
import torch

from ldm.diffusion import Denoiser, NoiseSchedule, gaussian_denoiser, training_losses
from ldm.sampling import dynamic_thresholding, sample, classifier_free_guidance

S = NoiseSchedule.from_name("linear", 100)
ORACLE = gaussian_denoiser(0.0, 0.5)
X = torch.randn(4, 2, dtype=torch.float64)


@pytest.mark.parametrize("call,words", [
    (lambda: NoiseSchedule.from_name("quadratic"), ["schedule name", "linear", "scaled_linear", "cosine"]),
    (lambda: NoiseSchedule.from_name("linear", 0), ["num_timesteps"]),
    (lambda: sample(ORACLE, X, S, 10, "euler_a"), ["sampler", "ddpm", "ddim", "euler", "heun", "lms", "dpmpp_2m"]),
    (lambda: sample(ORACLE, X, S, 0), ["num_steps", "[1, 100]"]),
    (lambda: sample(ORACLE, X, S, 101), ["num_steps", "[1, 100]"]),
    (lambda: sample(ORACLE, X, S, 2.5), ["num_steps"]),
    (lambda: sample(ORACLE, X, S, 10, "ddim", eta=-0.1), ["eta", ">= 0"]),
    (lambda: sample(ORACLE, X, S, 10, spacing="uniform"), ["spacing", "leading", "trailing", "linspace"]),
    (lambda: sample(ORACLE, X, S, None, timesteps=[5, 7]), ["timesteps", "decreasing"]),
    (lambda: sample(ORACLE, X, S, 10, "ddpm", variance="huge"), ["variance", "fixed_small", "fixed_large", "ddpm"]),
    (lambda: sample(ORACLE, X, S, 10, "dpmpp_2m", eta=1.0), ["dpmpp_2m", "no option 'eta'", "lower_order_final"]),
    (lambda: sample(ORACLE, X, S, 10, "langevin", snr=0), ["snr", "> 0"]),
    (lambda: sample(ORACLE, X, S, 10, "lms", order=5), ["order", "1, 2, 3 or 4", "lms"]),
    (lambda: sample(ORACLE, X, S, 10, "euler_ancestral", eta=-1), ["eta", ">= 0", "euler_ancestral"]),
    (lambda: sample(ORACLE, X, S, 10, "heun", eta=0.5), ["heun", "no option 'eta'", "none"]),
    (lambda: sample(ORACLE, X, S, 10, "dpmpp_2m_sde", generator=lambda x: torch.zeros(1)), ["noise source", "shape"]),
    (lambda: sample(ORACLE, X, S, 10, sigma_schedule="polynomial"), ["sigma_schedule", "karras", "exponential"]),
    (lambda: sample(ORACLE, X, S, 10, final="one"), ["final", "zero", "sigma_min"]),
    (lambda: sample(ORACLE, X, S, None, sigmas=[1.0, 2.0, 0.0]), ["sigmas", "non-increasing"]),
    (lambda: sample(ORACLE, X, S, None, timesteps=[9, 5], sigmas=[1.0, 0.0]), ["timesteps or sigmas"]),
    (lambda: sample(ORACLE, X, S, 3, timesteps=[9, 5]), ["num_steps=3", "2 steps"]),
    (lambda: S.alpha_bar_at(torch.tensor([2.5])), ["timesteps must be integers", "sigma"]),
    (lambda: S.timestep_of(torch.tensor([-1.0])), ["noise levels", ">= 0"]),
    (lambda: NoiseSchedule.from_name("linear", 100, zero_terminal_snr=1), ["zero_terminal_snr", "true or false"]),
    (lambda: dynamic_thresholding(ORACLE, percentile=0.0), ["percentile", "(0, 1]"]),
    (lambda: dynamic_thresholding(ORACLE, percentile=1.5), ["percentile", "(0, 1]"]),
    (lambda: classifier_free_guidance(ORACLE, -1.0), ["guidance_scale", ">= 0"]),
    (lambda: Denoiser(None, S, "noise"), ["prediction_type", "eps", "x0", "v"]),
    (lambda: Denoiser(None, S, "eps", "learned_big"), ["variance_type", "learned_range"]),
    (lambda: training_losses(Denoiser(lambda x, t: x, S), torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long),
                             loss_type="l1"), ["loss_type", "simple", "hybrid", "vlb"]),
    (lambda: training_losses(Denoiser(lambda x, t: x, S), torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long),
                             loss_type="hybrid"), ["hybrid", "learned_range"]),
    (lambda: Denoiser(lambda x, t: x, S, "eps", "learned_range")(torch.zeros(1, 3, 2, 2), torch.ones(1)),
     ["variance_type", "2x3 channels"]),
])
def test_clear_errors(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for word in words:
        assert word in str(info.value)
