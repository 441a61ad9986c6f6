"""k-diffusion (Crowson) as a second oracle for the k-style samplers and the SDE DPM-Solvers: on the exact denoiser
of Gaussian data, every step of ours equals k-diffusion's on the same levels, given the same noise.

k-diffusion is installed without its training dependencies (Makefile), so its sampling module is loaded alone.
Its samplers step on x = x0 + sigma eps; ours return variance-preserving x, so ours are scaled by
sqrt(1 + sigma^2) before comparing. k-diffusion's 2M solvers never lower the order at the end, so ours run with
lower_order_final=False; its 3M SDE takes the "heun" second-order form for its second step.
"""
import importlib.util
import math
import sys
import types

import pytest
import torch

from ldm.diffusion import NoiseSchedule, gaussian_denoiser, noise_levels
from ldm.sampling import sample

MEANS = torch.linspace(-0.6, 0.6, 8, dtype=torch.float64)
STDS = torch.linspace(0.15, 0.6, 8, dtype=torch.float64)
ORACLE = gaussian_denoiser(MEANS, STDS)


def k_sampling():
    """k_diffusion.sampling (and the utils it imports), without running the package's __init__."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.fail("k-diffusion is not installed: `make` installs it (--no-deps)")
    root = spec.submodule_search_locations[0]
    package = types.ModuleType("k_diffusion")
    package.__path__ = [root]
    sys.modules["k_diffusion"] = package
    for name in ("utils", "sampling"):
        sub = importlib.util.spec_from_file_location(f"k_diffusion.{name}", f"{root}/{name}.py")
        module = importlib.util.module_from_spec(sub)
        sys.modules[f"k_diffusion.{name}"] = module
        sub.loader.exec_module(module)
        setattr(package, name, module)
    return sys.modules["k_diffusion.sampling"]


def k_model(x, sigma):
    """k-diffusion's model: the x0 estimate at x = x0 + sigma eps."""
    return ORACLE(x / torch.sqrt(1 + sigma[:, None] ** 2), sigma).x0


CASES = {  # ours (name, options) -> k-diffusion's sampler and its options
    "euler": ({}, "sample_euler", {}),
    "euler_ancestral": ({}, "sample_euler_ancestral", {}),
    "heun": ({}, "sample_heun", {}),
    "lms": ({}, "sample_lms", {}),
    "dpmpp_2m": ({"lower_order_final": False}, "sample_dpmpp_2m", {}),
    "dpmpp_2m_sde": ({"lower_order_final": False}, "sample_dpmpp_2m_sde", {}),
    "dpmpp_3m_sde": ({"lower_order_final": False, "solver_type": "heun"}, "sample_dpmpp_3m_sde", {}),
}


@pytest.mark.parametrize("sampler", list(CASES))
@pytest.mark.parametrize("grid", [{"spacing": "linspace", "sigma_schedule": "karras"},
                                  {"spacing": "leading", "steps_offset": 1}, {"spacing": "trailing"}])
def test_every_step_equals_k_diffusion(sampler, grid):
    ours_options, their_name, their_options = CASES[sampler]
    schedule = NoiseSchedule.from_name("scaled_linear")
    levels = noise_levels(schedule, 15, **grid)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(64, 8, generator=g, dtype=torch.float64)
    noise = [torch.randn(64, 8, generator=g, dtype=torch.float64) for _ in range(len(levels))]

    theirs = []
    draws = iter(noise)
    kwargs = dict(their_options)
    if sampler in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        kwargs["noise_sampler"] = lambda sigma, sigma_next: next(draws)
    final = getattr(k_sampling(), their_name)(
        k_model, x_T * math.sqrt(1 + float(levels[0]) ** 2), levels, disable=True,
        callback=lambda d: theirs.append(d["x"]), **kwargs)
    theirs = theirs[1:] + [final]  # k-diffusion's callback sees x before each step; ours after

    ours = []
    draws_ours = iter(noise)
    sample(ORACLE, x_T, schedule, None, sampler, lambda x: next(draws_ours), sigmas=levels,
           callback=lambda i, s, x, pred: ours.append(x * math.sqrt(1 + float(levels[i + 1]) ** 2)),
           **ours_options)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m: f"step {i}: {m}")
