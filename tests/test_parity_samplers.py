"""Step-by-step parity of PLMS, the k-diffusion family and the SDE DPM-Solvers with their diffusers schedulers,
on identical model outputs (the FakeNet of test_parity_diffusers), across grids and parameterizations.

diffusers' k-style schedulers (Euler, Euler ancestral, Heun, LMS) step on x0 + sigma eps and keep float32 sigmas;
ours step on the same quantity inside and return variance-preserving x, so each diffusers sample is divided by
sqrt(1 + sigma^2) before comparing. Both start from the same x_T (diffusers' own start, init_noise_sigma, is
sigma_max rather than sqrt(1 + sigma_max^2) for linspace and trailing spacing: see docs/diffusers-compat.md).
Stochastic samplers get the same noise: the same seeded generator (ancestral Euler draws as diffusers does) or
one list of draws handed to both (diffusers' variance_noise).
"""
import math

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)
from test_parity_diffusers import FakeNet, assert_same, with_our_table, x_T

from ldm.diffusion import Denoiser, NoiseSchedule, noise_levels
from ldm.diffusion.config import DiffusionConfig
from ldm.diffusion.parameterization import check_prediction_type
from ldm.sampling import sample

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
GRIDS = {"none": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
         "beta": {"use_beta_sigmas": True}}


def diffusers_k_trajectory(scheduler, net, x, num_steps, seed=1):
    """Run a k-style diffusers scheduler from the variance-preserving x; the variance-preserving sample after each
    completed step (Heun's two calls are one step)."""
    scheduler.set_timesteps(num_steps)
    levels = [float(s) for s in scheduler.sigmas.double().unique_consecutive()]
    x = x * math.sqrt(1 + levels[0] ** 2)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(scheduler.timesteps):
        kwargs = {"generator": g} if isinstance(scheduler, EulerAncestralDiscreteScheduler) else {}
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
        if getattr(scheduler, "state_in_first_order", True) or i == len(scheduler.timesteps) - 1:
            out.append(x / math.sqrt(1 + levels[len(out) + 1] ** 2))
    return out


def read(scheduler):
    """Our DiffusionConfig of a diffusers scheduler, as a diffusers folder is read."""
    return DiffusionConfig.from_diffusers(dict(scheduler.config, _class_name=type(scheduler).__name__))


def our_run(config, net, schedule, x, num_steps, noise, sampler=None, **options):
    """Our sampler on the grid and time input the config reads off the diffusers scheduler: (levels, the sample
    after each step)."""
    levels = noise_levels(schedule, num_steps, **config.grid)
    denoise = Denoiser(net, schedule, config.prediction_type, timestep_rounding=config.timestep_rounding)
    out = []
    sample(denoise, x, schedule, None, sampler or config.sampler, noise, sigmas=levels,
           callback=lambda i, s, x, pred: out.append(x), **options)
    return levels, out


def our_k_trajectory(net, schedule, prediction_type, x, num_steps, sampler, grid, spacing, seed=1, **options):
    config = read(EulerDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing=spacing,
                                         **GRIDS[grid]))  # the family shares its grids
    return our_run(config, net, schedule, x, num_steps, torch.Generator().manual_seed(seed), sampler, **options)


K_SCHEDULERS = {"euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler,
                "heun": HeunDiscreteScheduler, "lms": LMSDiscreteScheduler}


K_GRIDS = [("linspace", "none", "epsilon"), ("leading", "none", "v_prediction"), ("trailing", "none", "epsilon"),
           ("leading", "karras", "epsilon"), ("linspace", "karras", "v_prediction"),
           ("trailing", "exponential", "epsilon"), ("linspace", "beta", "epsilon")]


# diffusers' EulerAncestralDiscreteScheduler has no Karras, exponential or beta sigmas
@pytest.mark.parametrize("sampler,spacing,grid,prediction_type", [
    (sampler, *case) for sampler in K_SCHEDULERS for case in K_GRIDS
    if sampler != "euler_ancestral" or case[1] == "none"])
def test_k_samplers_step_by_step(sampler, spacing, grid, prediction_type):
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    theirs = with_our_table(K_SCHEDULERS[sampler](**SD, prediction_type=prediction_type, timestep_spacing=spacing,
                                                  **GRIDS[grid]), schedule)
    expected = diffusers_k_trajectory(theirs, net, x_T(), 12)
    levels, ours = our_k_trajectory(net, schedule, prediction_type, x_T(), 12, sampler, grid, spacing)
    their_levels = theirs.sigmas.double().unique_consecutive()
    torch.testing.assert_close(levels, their_levels, rtol=1e-6, atol=0)  # the same grid (float32 there)
    assert_same(ours, expected)


def test_lms_orders_and_ancestral_eta_zero():
    """LMS of order 1 and ancestral Euler with eta = 0 are both plain Euler; LMS order 2 is not."""
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    _, euler = our_k_trajectory(net, schedule, "epsilon", x_T(), 10, "euler", "karras", "leading")
    _, lms1 = our_k_trajectory(net, schedule, "epsilon", x_T(), 10, "lms", "karras", "leading", order=1)
    _, lms2 = our_k_trajectory(net, schedule, "epsilon", x_T(), 10, "lms", "karras", "leading", order=2)
    _, anc0 = our_k_trajectory(net, schedule, "epsilon", x_T(), 10, "euler_ancestral", "karras", "leading", eta=0.0)
    assert_same(lms1, euler)
    assert_same(anc0, euler)
    assert (lms2[-1] - euler[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("num_steps", [4, 20])
def test_plms_step_by_step(num_steps, prediction_type="epsilon"):
    """SD 1.5's scheduler: PNDM with skip_prk_steps, leading spacing, steps_offset 1, set_alpha_to_one False; n
    steps are n + 1 diffusers calls (the first timestep repeats). Noise predictions only: with v-prediction
    diffusers combines the raw v outputs of different timesteps and converts the mix at one of them; ours
    combines the noise estimates, as PNDM's equations do (docs/diffusers-compat.md)."""
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    theirs = with_our_table(PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                          prediction_type=prediction_type), schedule)
    theirs.final_alpha_cumprod = schedule.alpha_bar[0]
    theirs.set_timesteps(num_steps)
    x, expected = x_T(), []
    for i, t in enumerate(theirs.timesteps):
        x = theirs.step(net(x, t), t, x).prev_sample
        if i != 0:  # the first call is the trial half of the first step
            expected.append(x)
    levels = noise_levels(schedule, num_steps, "leading", 1, None, "sigma_min")
    ours = []
    sample(Denoiser(net, schedule, check_prediction_type(prediction_type)), x_T(), schedule, None, "plms",
           sigmas=levels, callback=lambda i, s, x, pred: ours.append(x))
    assert_same(ours, expected)


@pytest.mark.parametrize("sampler,order", [("dpmpp_2m_sde", 2), ("dpmpp_3m_sde", 3)])
@pytest.mark.parametrize("spacing,grid,prediction_type", [
    ("linspace", "none", "epsilon"), ("trailing", "none", "v_prediction"), ("leading", "karras", "epsilon")])
def test_sde_dpm_solvers_step_by_step(sampler, order, spacing, grid, prediction_type):
    """Given the same noise. diffusers' third-order SDE update writes the D2 term's constant with the opposite
    sign to the integral (dpm_solvers' docstring); the comparison patches that one coefficient back, so every
    other term is checked against diffusers."""
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    theirs = with_our_table(DPMSolverMultistepScheduler(
        **SD, prediction_type=prediction_type, algorithm_type="sde-dpmsolver++", solver_order=order,
        timestep_spacing=spacing, **GRIDS[grid]), schedule)
    if order == 3:
        _patch_third_order_sde(theirs)
    if order == 3:  # diffusers' 3M SDE is the nearest to ours, not equal (its D2 term): read with a warning
        with pytest.warns(UserWarning, match="with dpmpp_3m_sde, which differs from it: .* D2"):
            config = read(theirs)
    else:
        config = read(theirs)
    assert config.sampler == sampler
    expected, noises = diffusers_with_noise(theirs, net, 25)
    draws = iter(noises)
    levels, ours = our_run(config, net, schedule, x_T(), 25, lambda x: next(draws), sampler)
    torch.testing.assert_close(levels, theirs.sigmas.double(), rtol=1e-6, atol=0)
    assert_same(ours, expected)


def diffusers_with_noise(scheduler, net, num_steps, seed=3):
    """A DPM-Solver scheduler's samples after each step, and the noise it was handed (variance_noise)."""
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x_T().shape, generator=g, dtype=torch.float64) for _ in scheduler.timesteps]
    x, out = x_T(), []
    for t, z in zip(scheduler.timesteps, noises):
        x = scheduler.step(net(x, t), t, x, variance_noise=z).prev_sample
        out.append(x)
    return out, noises


def _patch_third_order_sde(scheduler):
    """diffusers' multistep_dpm_solver_third_order_update with the D2 coefficient phi_2 / (2h) - 1/2 (the
    integral), instead of diffusers' -(phi_2 / (2h)) - 1/2: the same update plus D2."""
    original = scheduler.multistep_dpm_solver_third_order_update

    def fixed(model_output_list, *args, sample=None, noise=None, **kwargs):
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        i = scheduler.step_index
        sig = [scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        lam = [torch.log(a) - torch.log(s) for a, s in sig]
        h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        r0, r1 = h_0 / h, h_1 / h
        d2 = (1.0 / (r0 + r1)) * ((1.0 / r0) * (m0 - m1) - (1.0 / r1) * (m1 - m2))
        return original(model_output_list, *args, sample=sample, noise=noise, **kwargs) + sig[0][0] * d2

    scheduler.multistep_dpm_solver_third_order_update = fixed


UNIPC_CASES = [  # (spacing, grid, prediction type, UniPC settings)
    ("linspace", "none", "epsilon", {}), ("leading", "none", "v_prediction", {}), ("trailing", "none", "epsilon", {}),
    ("linspace", "karras", "epsilon", {}), ("trailing", "exponential", "v_prediction", {}),
    ("linspace", "beta", "epsilon", {}), ("linspace", "none", "epsilon", {"solver_order": 3}),
    ("leading", "karras", "epsilon", {"solver_order": 3, "solver_type": "bh1"}),
    ("linspace", "none", "epsilon", {"solver_order": 1}), ("linspace", "none", "v_prediction", {"predict_x0": False}),
    ("trailing", "none", "epsilon", {"solver_type": "bh1", "predict_x0": False, "solver_order": 3}),
    ("linspace", "none", "epsilon", {"disable_corrector": list(range(12))}),
    ("linspace", "none", "epsilon", {"lower_order_final": False, "final_sigmas_type": "sigma_min"})]
OUR_UNIPC_OPTIONS = {"solver_order": "order", "solver_type": "solver_type", "predict_x0": "predict_x0",
                     "lower_order_final": "lower_order_final"}


@pytest.mark.parametrize("spacing,grid,prediction_type,settings", UNIPC_CASES)
def test_unipc_step_by_step(spacing, grid, prediction_type, settings):
    """UniPC against diffusers' UniPCMultistepScheduler: orders 1-3, B(h) = bh1 / bh2, data or noise prediction,
    without the corrector, every grid (Karras sigmas feed rounded timesteps, exponential and beta truncated).
    diffusers' step to sigma 0 is NaN with bh1 (B(h) = -inf times a zero sum) and with noise prediction (0 times
    e^inf); ours returns the x0 prediction there, as every multistep solver here, so those cases compare the
    steps before the last."""
    from diffusers import UniPCMultistepScheduler
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    grid_settings = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing, **GRIDS[grid])
    if "final_sigmas_type" in settings:
        grid_settings["final_sigmas_type"] = settings.pop("final_sigmas_type")
    theirs = with_our_table(UniPCMultistepScheduler(**grid_settings, **settings), schedule)
    config = read(with_our_table(UniPCMultistepScheduler(**grid_settings), schedule))
    assert config.sampler == "unipc"
    options = {OUR_UNIPC_OPTIONS[k]: v for k, v in settings.items() if k in OUR_UNIPC_OPTIONS}
    if "disable_corrector" in settings:
        options["corrector"] = False
    theirs.set_timesteps(12)
    x, expected = x_T(), []
    for t in theirs.timesteps:
        x = theirs.step(net(x, t), t, x).prev_sample
        expected.append(x)
    levels, ours = our_run(config, net, schedule, x_T(), 12, None, "unipc", **options)
    torch.testing.assert_close(levels, theirs.sigmas.double(), rtol=1e-6, atol=0)
    if settings.get("solver_type") == "bh1" or settings.get("predict_x0") is False:
        assert torch.isnan(expected[-1]).all() and torch.isfinite(ours[-1]).all()
        ours, expected = ours[:-1], expected[:-1]
    assert_same(ours, expected)


@pytest.mark.parametrize("grid,beta_schedule", [("exponential", "scaled_linear"), ("beta", "scaled_linear"),
                                                ("karras", "squaredcos_cap_v2")])
def test_dpm_solver_timestep_truncation(grid, beta_schedule):
    """diffusers' DPM-Solver feeds integer timesteps: Karras sigmas' rounded (except on the cosine schedule),
    exponential and beta sigmas' truncated by its int64 cast; the folder reader reproduces each. On the cosine
    schedule (sigma up to 20,291) diffusers' float32 levels drift from ours by up to 2.5e-5 over 12 steps
    (measured), hence atol 5e-5 there."""
    net = FakeNet()
    kwargs = dict(SD) if beta_schedule == "scaled_linear" else {"beta_schedule": beta_schedule}
    schedule = NoiseSchedule.from_name(beta_schedule, **{k: v for k, v in kwargs.items() if k != "beta_schedule"})
    theirs = with_our_table(DPMSolverMultistepScheduler(**kwargs, **GRIDS[grid]), schedule)
    config = read(theirs)
    assert (config.sampler, config.timestep_rounding) == ("dpmpp_2m", "floor")
    theirs.set_timesteps(12)
    x, expected = x_T(), []
    for t in theirs.timesteps:
        x = theirs.step(net(x, t), t, x).prev_sample
        expected.append(x)
    levels, ours = our_run(config, net, schedule, x_T(), 12, None)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5 if beta_schedule == "squaredcos_cap_v2" else 1e-5, rtol=0)


@pytest.mark.parametrize("algorithm_type,sampler", [("dpmsolver++", "dpmpp_2m"), ("sde-dpmsolver++", "dpmpp_2m_sde")])
def test_dpm_solver_heun_form(algorithm_type, sampler):
    """solver_type="heun" (the second-order term phi_2 D1 instead of the midpoint 0.5 (1 - e^-z) D1) equals
    diffusers' DPMSolverMultistepScheduler(solver_type="heun"), ODE and SDE."""
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    theirs = with_our_table(DPMSolverMultistepScheduler(**SD, algorithm_type=algorithm_type, solver_type="heun"),
                            schedule)
    config = read(with_our_table(DPMSolverMultistepScheduler(**SD, algorithm_type=algorithm_type), schedule))
    expected, noises = diffusers_with_noise(theirs, net, 20)
    draws = iter(noises)
    _, ours = our_run(config, net, schedule, x_T(), 20, lambda x: next(draws), sampler, solver_type="heun")
    assert_same(ours, expected)
