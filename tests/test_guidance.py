"""Guidance and thresholding against closed forms, with Gaussian and Gaussian-mixture oracles.

CFG: with cond N(mu_c, s^2) and uncond N(mu_u, s^2) the guided x0 estimate is affine in the mean, so the
guided denoiser is exactly the oracle of N(mu_u + w (mu_c - mu_u), s^2): samples must land there.
Classifier guidance: on a two-component mixture with the exact noisy classifier log p(y | x_t), w = 1 gives
the score of p(x_t | y), so samples follow component y alone; a linear log p(y|x_t) = c_t a.x_t with
c_t = sqrt(alpha_bar) s^2 / (alpha_bar s^2 + 1 - alpha_bar) exponentially tilts N(mu, s^2) into
N(mu + w s^2 a, s^2) at every noise level, so w = 2 must give that.
Tolerances: 10,000 2-d samples, mean atol 0.03, std within 4% (DDIM with 100 steps is within 2% unguided).
"""
import pytest
import torch

from ldm.diffusion import NoiseSchedule, Prediction, gaussian_denoiser, gaussian_mixture_denoiser
from ldm.diffusion import mixture_class_log_posterior
from ldm.diffusion.process import alpha_bar_of_sigma
from ldm.sampling import (classifier_free_guidance, classifier_guidance, dynamic_threshold, dynamic_thresholding,
                          sample, static_thresholding)

S = NoiseSchedule.from_name("cosine")
STD = 0.4
N = 10_000


def run(denoise, steps=100, sampler="ddim", seed=0, dim=2, n=N, **options):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return sample(denoise, x_T, S, steps, sampler, generator=g, **options)


def assert_gaussian(x, mean, std):
    torch.testing.assert_close(x.mean(0), torch.as_tensor(mean, dtype=x.dtype), atol=0.03, rtol=0)
    assert ((x.std(0) / std) - 1).abs().max() < 0.04


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_classifier_free_guidance_moves_the_mean_linearly(w):
    mu_u, mu_c = torch.tensor([0.0, 0.2]), torch.tensor([0.3, -0.1])
    uncond, cond = gaussian_denoiser(mu_u, STD), gaussian_denoiser(mu_c, STD)
    calls = []

    def pair(x, sigma):  # one network call on the batch [uncond; cond]
        calls.append(x.shape[0])
        b = x.shape[0] // 2
        pu, pc = uncond(x[:b], sigma[:b]), cond(x[b:], sigma[b:])
        return Prediction(torch.cat([pu.x0, pc.x0]), torch.cat([pu.eps, pc.eps]))

    x = run(classifier_free_guidance(pair, w))
    assert_gaussian(x, mu_u + w * (mu_c - mu_u), STD)
    assert calls == [2 * N] * 100


def test_classifier_guidance_with_exact_classifier_gives_the_class_conditional():
    means = torch.tensor([[1.0, 1.0], [-1.0, -0.5]])
    mixture = gaussian_mixture_denoiser(means, STD)
    unguided = run(mixture)
    assert 0.4 < (unguided[:, 0] > 0).double().mean() < 0.6  # both modes present without guidance
    for y in (0, 1):
        def log_prob(x_t, sigma, y=y):
            return mixture_class_log_posterior(means, STD, None, x_t, sigma)[:, y]
        x = run(classifier_guidance(mixture, log_prob, 1.0))
        assert_gaussian(x, means[y], STD)


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_classifier_guidance_linear_tilt(w):
    mu, a = torch.tensor([0.1, -0.2]), torch.tensor([1.0, -2.0])

    def log_prob(x_t, sigma):
        ab = alpha_bar_of_sigma(sigma).to(x_t.dtype)
        c = ab.sqrt() * STD**2 / (ab * STD**2 + 1 - ab)
        return c * (x_t * a.to(x_t.dtype)).sum(1)

    x = run(classifier_guidance(gaussian_denoiser(mu, STD), log_prob, w))
    assert_gaussian(x, mu + w * STD**2 * a, STD)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 50), ("langevin", 50), ("dpmpp_2m", 20)])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_thresholding_keeps_every_x0_in_range(sampler, steps, kind):
    """Data of std 2 lies mostly outside [-1, 1]; every x0 the sampler sees must be inside."""
    wide = gaussian_denoiser(0.0, 2.0)
    denoise = dynamic_thresholding(wide, percentile=0.9) if kind == "dynamic" else static_thresholding(wide)
    seen = []
    x = run(denoise, steps, sampler, dim=64, n=200, callback=lambda i, t, x, pred: seen.append(pred.x0.abs().max()))
    assert len(seen) == steps
    assert max(seen) <= 1.0
    assert x.abs().max() <= 1.0 + 1e-9
    raw = []
    run(wide, steps, sampler, dim=64, n=200, callback=lambda i, t, x, pred: raw.append(pred.x0.abs().max()))
    assert max(raw) > 2.0  # without thresholding the same run leaves [-1, 1]


def test_dynamic_threshold_formula():
    x0 = torch.linspace(-3, 3, 601).reshape(1, 601)
    s = torch.quantile(x0.abs(), 0.9).item()  # 2.7
    out = dynamic_threshold(x0, 0.9)
    torch.testing.assert_close(out, x0.clamp(-s, s) / s)
    inside = torch.tensor([[0.5, -0.9, 0.1]])
    torch.testing.assert_close(dynamic_threshold(inside, 0.9), inside)  # s = max(s, 1) = 1: untouched
    torch.testing.assert_close(dynamic_threshold(x0, 0.9, max_value=1.5), x0.clamp(-1.5, 1.5) / 1.5)


def test_thresholding_rederives_eps_consistently():
    wide = gaussian_denoiser(0.0, 2.0)
    x_t = torch.randn(16, 8, dtype=torch.float64) * 3
    sigma = S.sigma_at(torch.full((16,), 100))
    pred = dynamic_thresholding(wide, 0.8)(x_t, sigma)
    ab = alpha_bar_of_sigma(sigma)[:, None]
    torch.testing.assert_close(ab.sqrt() * pred.x0 + (1 - ab).sqrt() * pred.eps, x_t)
