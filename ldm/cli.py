"""The `ldm` command."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _oracle_table(args: argparse.Namespace) -> int:
    """Sample Gaussian data with its closed-form optimal denoiser through every sampler and print how close
    each lands to the true mean and std: the diffusion core, checked end to end in a second."""
    from .diffusion import NoiseSchedule, gaussian_denoiser
    from .sampling import sample

    schedule = NoiseSchedule.from_name(args.schedule)
    mean, std = 0.3, 0.5
    denoise = gaussian_denoiser(schedule, mean, std)
    print(f"x0 ~ N({mean}, {std}^2), {args.samples} samples, {args.schedule} schedule, T={schedule.num_timesteps}")
    print(f"{'sampler':<36}{'mean':>8}{'std':>8}{'std/true':>10}{'seconds':>9}")
    runs = [("ddpm", 1000, {}), ("ddpm", 50, {}), ("ddpm", 50, {"variance": "fixed_large"}),
            ("ddim", 50, {}), ("ddim", 50, {"eta": 1.0}), ("langevin", 100, {}), ("dpmpp_2m", 20, {})]
    for name, steps, options in runs:
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(args.samples, 4, generator=g, dtype=torch.float64)
        start = time.perf_counter()
        x = sample(denoise, x_T, schedule, steps, name, generator=g, **options)
        elapsed = time.perf_counter() - start
        label = f"{name} {steps} steps" + "".join(f" {k}={v}" for k, v in options.items())
        s = (x - x.mean(0)).std().item()
        print(f"{label:<36}{x.mean().item():>8.3f}{s:>8.3f}{s / std:>10.3f}{elapsed:>9.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("oracle", "run every sampler on Gaussian data with the exact denoiser"),
                            ("demo", "what `make demo` runs (for now: the oracle table)")]:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--schedule", default="cosine", choices=["linear", "scaled_linear", "cosine"])
        cmd.add_argument("--samples", type=int, default=10_000)
        cmd.set_defaults(func=_oracle_table)
    args = parser.parse_args(argv)
    if getattr(args, "samples", 1) < 2:
        parser.error("--samples must be at least 2")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
