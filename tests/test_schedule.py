"""Schedules and the closed-form process (the noise-level axis and grids: test_grids.py)."""
import math

import pytest
import torch

from ldm.diffusion import NoiseSchedule
from ldm.diffusion import process


def test_named_schedules_follow_the_papers():
    lin = NoiseSchedule.from_name("linear")
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    sl = NoiseSchedule.from_name("scaled_linear")
    assert sl.betas[0].item() == pytest.approx(0.00085) and sl.betas[-1].item() == pytest.approx(0.012)
    cos = NoiseSchedule.from_name("cosine")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert cos.alpha_bar[499].item() == pytest.approx(f(500 / 1000) / f(0), rel=1e-9)
    assert cos.betas.max().item() == pytest.approx(0.999)
    assert NoiseSchedule.from_name("squaredcos_cap_v2").betas.equal(cos.betas)
    for s in (lin, sl, cos):
        assert s.betas.dtype == torch.float64 and (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()


def test_conversions_round_trip():
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    ab = torch.rand(5, dtype=torch.float64) * 0.98 + 0.01
    x_t = process.q_sample(x0, eps, ab)
    torch.testing.assert_close(process.x0_from_eps(x_t, eps, ab), x0)
    torch.testing.assert_close(process.eps_from_x0(x_t, x0, ab), eps)
    v = process.v_from_x0_eps(x0, eps, ab)
    torch.testing.assert_close(process.x0_from_v(x_t, v, ab), x0)
    torch.testing.assert_close(process.eps_from_v(x_t, v, ab), eps)


def test_posterior_is_the_gaussian_conditional():
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on scalars: precision-weighted mean and 1/(sum of precisions)."""
    s = NoiseSchedule.from_name("linear")
    t = 300
    ab, ab_prev, beta = s.alpha_bar[t], s.alpha_bar[t - 1], s.betas[t]
    x0, x_t = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
    # prior x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood x_t ~ N(sqrt(1 - beta) x_{t-1}, beta)
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * x_t / beta) / prec
    torch.testing.assert_close(process.posterior_mean(x0, x_t, ab, ab_prev), mean)
    torch.testing.assert_close(process.posterior_variance(ab, ab_prev), 1 / prec)
