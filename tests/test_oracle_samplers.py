"""Every sampler against the closed-form optimal denoiser of Gaussian data.

x0 ~ N(mu, 0.5^2 I) in 4 dimensions, cosine schedule (T = 1000), 10,000 samples (40,000 values) per
sampler: the standard error of the pooled std is about 0.4 %, of each mean about 0.005. The std
tolerances are the discretization error each sampler is known to have at that step count (measured:
DDPM-50 with beta~ 0.94, DDPM-50 with beta 1.02, DDIM-50 0.97, PC-100 0.97, DPM-Solver++-20 1.00,
full DDPM 0.996), and `test_error_vanishes_with_steps` shows the gaps are discretization, not bias.
"""
import pytest
import torch

from ldm.diffusion import NoiseSchedule, gaussian_denoiser
from ldm.sampling import ddim_invert, resolve_sigmas, sample

MU = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64)
STD = 0.5
N = 10_000
SCHEDULE = NoiseSchedule.from_name("cosine")
ORACLE = gaussian_denoiser(MU, STD)


def pooled_std(x):
    """Std of the 40,000 values around their per-dimension means."""
    return (x - x.mean(0)).std().item()


def draw(sampler, steps, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(N, 4, generator=g, dtype=torch.float64)
    return sample(ORACLE, x_T, SCHEDULE, steps, sampler, generator=g, **options)


@pytest.mark.parametrize("sampler,steps,options,std_tol", [
    ("ddpm", 1000, {}, 0.02),
    ("ddpm", 50, {}, 0.08),
    ("ddpm", 50, {"variance": "fixed_large"}, 0.04),
    ("ddim", 50, {"eta": 0.0}, 0.04),
    ("ddim", 50, {"eta": 1.0}, 0.08),
    ("langevin", 100, {}, 0.04),
    ("dpmpp_2m", 20, {}, 0.02),
])
def test_sampler_reproduces_gaussian_data(sampler, steps, options, std_tol):
    x = draw(sampler, steps, **options)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.mean(0), MU, atol=0.02, rtol=0)
    assert abs(pooled_std(x) / STD - 1) < std_tol
    # per-dimension stds agree with each other: no dimension is treated differently
    assert (x.std(0) / pooled_std(x) - 1).abs().max() < 0.03


def test_error_vanishes_with_steps():
    """DDIM(eta=0) is a discretization of the probability-flow ODE: with every timestep it is exact."""
    errors = [abs(pooled_std(draw("ddim", n)) / STD - 1) for n in (20, 100, 1000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_strided_ddpm_every_spacing(spacing):
    x = draw("ddpm", 100, spacing=spacing, variance="fixed_large")
    torch.testing.assert_close(x.mean(0), MU, atol=0.02, rtol=0)
    assert abs(pooled_std(x) / STD - 1) < 0.04


def test_seeded_determinism_and_batch_independence():
    a = draw("ddpm", 20, seed=3)
    b = draw("ddpm", 20, seed=3)
    assert torch.equal(a, b)
    c = draw("ddpm", 20, seed=4)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("fixed_point_iters,max_tol,mean_tol", [(0, 0.2, 0.03), (3, 2e-3, 3e-4)])
def test_ddim_inversion_round_trip(fixed_point_iters, max_tol, mean_tol):
    """x0 -> DDIM inversion -> x_T -> DDIM sampling returns x0 (50 steps; data std 0.5). Classic inversion
    is approximate (measured max error 0.14, mean 0.024); fixed-point iterations make it exact."""
    g = torch.Generator().manual_seed(1)
    x0 = MU + STD * torch.randn(2000, 4, generator=g, dtype=torch.float64)
    sigmas = resolve_sigmas(SCHEDULE, 50)
    x_T = ddim_invert(ORACLE, x0, sigmas, fixed_point_iters=fixed_point_iters)
    # the inverted latents are distributed like the prior
    assert abs(x_T.std().item() - 1) < 0.05
    back = sample(ORACLE, x_T, None, None, "ddim", sigmas=sigmas)
    assert (back - x0).abs().max().item() < max_tol
    assert (back - x0).abs().mean().item() < mean_tol


def test_callback_sees_every_step():
    seen = []
    x_T = torch.randn(8, 4, dtype=torch.float64)
    sample(ORACLE, x_T, SCHEDULE, 10, "dpmpp_2m", callback=lambda i, sigma, x, pred: seen.append((i, sigma)))
    assert [i for i, _ in seen] == list(range(10))
    assert [sigma for _, sigma in seen] == resolve_sigmas(SCHEDULE, 10)[:-1].tolist()
