"""The noise-level axis: sigma tables, the map from a level to the network's time input, zero-terminal-SNR
rescaling and the inference grids, against diffusers' schedulers (which compute the same things in float32 or
NumPy float64) and against their definitions."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from ldm.diffusion import Denoiser, NoiseSchedule, karras_sigmas, noise_levels, process
from ldm.diffusion.grids import levels_of_timesteps, spaced_timesteps
from ldm.sampling import sample

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
S = NoiseSchedule.from_name("scaled_linear")


def test_sigmas_are_the_variance_exploding_levels_of_the_table():
    torch.testing.assert_close(S.sigmas, ((1 - S.alpha_bar) / S.alpha_bar).sqrt(), rtol=0, atol=0)
    t = torch.tensor([-1, 0, 500, 999])
    assert S.sigma_at(t)[0] == 0
    torch.testing.assert_close(process.alpha_bar_of_sigma(S.sigma_at(t)), S.alpha_bar_at(t), rtol=1e-14, atol=0)


def test_levels_on_the_grid_map_to_their_own_timestep_exactly():
    t = torch.arange(1000)
    assert torch.equal(S.timestep_of(S.sigmas), t.double())
    assert S.timestep_of(torch.tensor([0.0, math.inf])).tolist() == [0.0, 999.0]  # clamped at both ends


def test_levels_between_are_interpolated_in_log_sigma_as_diffusers():
    theirs = EulerDiscreteScheduler(**SD)
    log_sigmas = theirs.sigmas.flip(0)[1:].double().log().numpy()  # their float32 table, ascending
    ours = NoiseSchedule.from_name("scaled_linear")
    ours._log_sigmas = torch.from_numpy(log_sigmas)  # the same table, so the interpolation itself is compared
    for sigma in (0.05, 0.7, 3.3, 14.0):
        assert ours.timestep_of(torch.tensor(sigma, dtype=torch.float64)).item() == pytest.approx(
            float(theirs._sigma_to_t(np.float64(sigma), log_sigmas)), abs=1e-9)
    mid = S.timestep_of((S.sigmas[400] * S.sigmas[401]).sqrt())  # the geometric midpoint: halfway
    assert mid.item() == pytest.approx(400.5, abs=1e-9)


def test_zero_terminal_snr_rescaling():
    """Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) is 0 at the last step, unchanged at the first."""
    zs = NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True)
    torch.testing.assert_close(zs.betas, diffusers_rescale(S.betas.clone()).double(), rtol=1e-9, atol=1e-12)
    assert zs.alpha_bar[-1] == 0 and zs.alpha_bar[0].item() == pytest.approx(S.alpha_bar[0].item(), rel=1e-12)
    assert zs.sigmas[-1] == math.inf and zs.timestep_of(torch.tensor(math.inf)).item() == 999
    assert bool((zs.alpha_bar[1:] < zs.alpha_bar[:-1]).all())


def test_spacings():
    assert spaced_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert spaced_timesteps(1000, 4, "leading", steps_offset=1).tolist() == [751, 501, 251, 1]
    assert spaced_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert spaced_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert spaced_timesteps(10, 10, "trailing").tolist() == list(range(9, -1, -1))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spaced_grids_are_the_levels_of_the_spaced_timesteps(spacing):
    levels = noise_levels(S, 7, spacing, steps_offset=1 if spacing == "leading" else 0)
    ts = spaced_timesteps(1000, 7, spacing, 1 if spacing == "leading" else 0)
    assert torch.equal(levels, torch.cat([S.sigma_at(ts), torch.zeros(1, dtype=torch.float64)]))
    assert torch.equal(S.timestep_of(levels[:-1]), ts.double())
    assert torch.equal(levels_of_timesteps(S, ts), levels)


@pytest.mark.parametrize("flag,name", [("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
                                       ("use_beta_sigmas", "beta")])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_sigma_schedules_equal_diffusers_euler(flag, name, spacing):
    """Euler's sigmas redistributed between the levels of its first and last spaced timesteps."""
    theirs = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
                                    **{flag: True})
    theirs.set_timesteps(12)
    ours = noise_levels(S, 12, spacing, 1 if spacing == "leading" else 0, sigma_schedule=name)
    torch.testing.assert_close(ours.float(), theirs.sigmas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S.timestep_of(ours[:-1]).float(), theirs.timesteps, rtol=0, atol=2e-3)


def test_karras_is_eq_5():
    s = karras_sigmas(80.0, 0.002, 5, rho=7.0)
    expected = [(80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(5)]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_final_sigma_min_is_ddim_without_alpha_one_and_dpm_sigma_min():
    levels = noise_levels(S, 10, "leading", 1, final="sigma_min")
    assert levels[-1] == S.sigmas[0]
    ddim = DDIMScheduler(**SD, set_alpha_to_one=False, steps_offset=1)
    assert process.alpha_bar_of_sigma(levels[-1]).item() == pytest.approx(float(ddim.final_alpha_cumprod), rel=1e-6)
    dpm = DPMSolverMultistepScheduler(**SD, final_sigmas_type="sigma_min", timestep_spacing="leading", steps_offset=1)
    dpm.set_timesteps(10)
    assert levels[-1].item() == pytest.approx(dpm.sigmas[-1].item(), rel=1e-4)  # their float32 alpha_bar


def test_the_network_sees_fractional_timesteps_between_grid_levels():
    seen = []

    def net(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    levels = noise_levels(S, 6, "linspace", sigma_schedule="karras")
    sample(Denoiser(net, S), torch.randn(3, 2, dtype=torch.float64), None, None, "ddim", sigmas=levels)
    assert len(seen) == 6 and all(t.dtype == torch.float32 and t.shape == (3,) for t in seen)
    torch.testing.assert_close(torch.stack([t[0] for t in seen]).double(), S.timestep_of(levels[:-1]),
                               rtol=0, atol=1e-4)
    assert seen[0][0].item() == 999 and seen[1][0].item() != round(seen[1][0].item())


@pytest.mark.parametrize("n", [1, 7, 20, 50])
def test_family_spacings_are_diffusers_own(n):
    """Each diffusers family's meaning of a spacing name has its own name here: DPM-Solver's and UniPC's leading
    and linspace leave the lowest of n + 1 points out; Euler's linspace is fractional."""
    from diffusers import UniPCMultistepScheduler
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        for theirs, ours in (("leading", "leading_open"), ("linspace", "linspace_open"), ("trailing", "trailing")):
            scheduler = cls(**SD, timestep_spacing=theirs, steps_offset=1 if theirs == "leading" else 0)
            scheduler.set_timesteps(n)
            expected = spaced_timesteps(1000, n, ours, 1 if theirs == "leading" else 0)
            assert scheduler.timesteps.tolist() == expected.tolist(), (cls.__name__, theirs)
    euler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    euler.set_timesteps(n)
    torch.testing.assert_close(euler.timesteps.double(), spaced_timesteps(1000, n, "linspace_float"), atol=1e-4,
                               rtol=0)
    # diffusers' float32 alpha_bar cumprod: up to 1.3e-5 relative at sigma_min
    torch.testing.assert_close(euler.sigmas[:-1].double(), noise_levels(S, n, "linspace_float")[:-1], rtol=2e-5,
                               atol=0)
