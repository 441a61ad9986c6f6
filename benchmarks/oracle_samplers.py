"""Every sampler and grid against the exact denoiser of Gaussian data: how far each lands from the data at 10, 20
and 50 steps. Prints the markdown tables of docs/core.md ("Samplers on the oracle").

Data: x0 ~ N(mu, diag(s^2)) in 8 dimensions, means evenly from -0.6 to 0.6 and stds from 0.15 to 0.6 (the
narrowest dimension is where the low-noise end of a grid shows); 20,000 samples, so one dimension's std has a
standard error of 0.5%. The errors are those of the narrowest and the widest dimension's std, in percent. Also a
comparison with diffusers' own DPMSolverMultistepScheduler for the SDE solvers on the same grid.

Run: `python benchmarks/oracle_samplers.py [--samples 20000]`.
"""
from __future__ import annotations

import argparse
import math

import torch
from diffusers import DPMSolverMultistepScheduler

from ldm.diffusion import NoiseSchedule, gaussian_denoiser, noise_levels
from ldm.sampling import SAMPLERS, sample

MEANS = torch.linspace(-0.6, 0.6, 8, dtype=torch.float64)
STDS = torch.linspace(0.15, 0.6, 8, dtype=torch.float64)
GRIDS = {"trailing": dict(spacing="trailing"), "leading": dict(spacing="leading", steps_offset=1),
         "linspace": dict(spacing="linspace"), "karras": dict(spacing="linspace", sigma_schedule="karras"),
         "exponential": dict(spacing="linspace", sigma_schedule="exponential"),
         "beta": dict(spacing="linspace", sigma_schedule="beta")}
STEPS = (10, 20, 50)


def narrowest_error(x: torch.Tensor) -> float:
    return 100 * (x[:, 0].std().item() / STDS[0].item() - 1)


def widest_error(x: torch.Tensor) -> float:
    return 100 * (x[:, -1].std().item() / STDS[-1].item() - 1)


def mean_error(x: torch.Tensor) -> float:
    return (x.mean(0) - MEANS).abs().max().item()


def run(schedule, sampler, n, grid, samples, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(samples, 8, generator=g, dtype=torch.float64)
    calls = [0]
    oracle = gaussian_denoiser(MEANS, STDS)

    def counted(x, sigma):
        calls[0] += 1
        return oracle(x, sigma)
    levels = noise_levels(schedule, n, **GRIDS[grid])
    x = sample(counted, x_T, schedule, None, sampler, g, sigmas=levels)
    return x, calls[0]


def table(schedule_name: str, samples: int) -> None:
    schedule = NoiseSchedule.from_name(schedule_name)
    print(f"\n{schedule_name} schedule: narrowest / widest std error (%) per grid; network calls; worst mean error\n")
    print("| sampler | steps | calls | " + " | ".join(GRIDS) + " | worst mean error |")
    print("|---|---|---|" + "---|" * len(GRIDS) + "---|")
    for name in SAMPLERS:
        for n in STEPS:
            cells, worst, calls = [], 0.0, 0
            for grid in GRIDS:
                x, calls = run(schedule, name, n, grid, samples)
                cells.append(f"{narrowest_error(x):+.1f} / {widest_error(x):+.1f}")
                worst = max(worst, mean_error(x))
            print(f"| {name} | {n} | {calls} | " + " | ".join(cells) + f" | {worst:.3f} |")


def diffusers_sde(schedule, order: int, n: int, samples: int, karras: bool, seed=0):
    """diffusers' SDE-DPM-Solver++ of the given order on the oracle, with its own noise draws."""
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", algorithm_type="sde-dpmsolver++",
                                            solver_order=order, use_karras_sigmas=karras)
    scheduler.alphas_cumprod = schedule.alpha_bar.clone()
    scheduler.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 8, generator=g, dtype=torch.float64)
    oracle = gaussian_denoiser(MEANS, STDS)
    for i, t in enumerate(scheduler.timesteps):
        sigma = torch.full((samples,), float(scheduler.sigmas[i]), dtype=torch.float64)
        x = scheduler.step(oracle(x, sigma).eps, t, x, generator=g).prev_sample.double()
    return x, scheduler.sigmas.double()


def sde_comparison(samples: int) -> None:
    schedule = NoiseSchedule.from_name("linear")
    print("\nSDE DPM-Solver++ on diffusers' grids (linear schedule, linspace or Karras): narrowest std error (%), "
          "ours against diffusers' DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')\n")
    print("| solver | grid | steps | ours | diffusers |")
    print("|---|---|---|---|---|")
    for order, name in ((2, "dpmpp_2m_sde"), (3, "dpmpp_3m_sde")):
        for karras in (False, True):
            for n in STEPS:
                theirs, levels = diffusers_sde(schedule, order, n, samples, karras)
                g = torch.Generator().manual_seed(1)
                x_T = torch.randn(samples, 8, generator=g, dtype=torch.float64)
                ours = sample(gaussian_denoiser(MEANS, STDS), x_T, schedule, None, name, g, sigmas=levels)
                print(f"| {name} | {'karras' if karras else 'linspace'} | {n} | {narrowest_error(ours):+.1f} | "
                      f"{narrowest_error(theirs):+.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    args = parser.parse_args()
    print(f"std standard error of one dimension: {100 / math.sqrt(2 * args.samples):.2f}%")
    for name in ("linear", "cosine"):
        table(name, args.samples)
    sde_comparison(args.samples)


if __name__ == "__main__":
    main()
