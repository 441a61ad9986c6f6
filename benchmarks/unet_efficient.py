"""Imagen's Efficient U-Net layout against the plain one at the same widths: seconds per training step and per
sampling call of the shapes cascade's super-resolution U-Net (ldm.train.shapes_sr's SR_UNET and EFFICIENT_SR_UNET),
timed alternately in one process, median of --repeats, with the ratio.

    python benchmarks/unet_efficient.py [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm.nn.unet import UNetModel
from ldm.train.shapes_common import hardware
from ldm.train.shapes_sr import EFFICIENT_SR_UNET, SR_UNET


def inputs(batch: int, size: int):
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(batch, 3, size, size, generator=g), t=torch.randint(0, 1000, (batch,), generator=g),
                context=torch.randn(batch, 12, 384, generator=g), concat=torch.randn(batch, 3, size, size, generator=g),
                noise_level=torch.randint(0, 500, (batch,), generator=g))


def train_step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    model(**batch).square().mean().backward()
    opt.step()


def sample_call(model, batch):
    with torch.no_grad():
        model(**batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"plain": UNetModel(SR_UNET), "efficient": UNetModel(EFFICIENT_SR_UNET)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    train, sample = inputs(16, 64), inputs(8, 128)  # the recipe's batch of 64-px windows; a 128-px sampling call
    times = {(k, w): [] for k in models for w in ("train", "sample")}
    for r in range(args.repeats + 1):  # the first round warms up
        for k, m in models.items():
            for what, fn in (("train", lambda: train_step(m.train(), opts[k], train)),
                             ("sample", lambda: sample_call(m.eval(), sample))):
                start = time.perf_counter()
                fn()
                if r:
                    times[(k, what)].append(time.perf_counter() - start)
    print(f"{hardware()}; median of {args.repeats}\n")
    print("| U-Net | parameters | s / training step (16 x 64 px) | s / sampling call (8 x 128 px) |\n|---|---|---|---|")
    med = {key: statistics.median(v) for key, v in times.items()}
    for k, m in models.items():
        print(f"| {k} | {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M | {med[(k, 'train')]:.3f} | "
              f"{med[(k, 'sample')]:.3f} |")
    print(f"\nefficient / plain: training {med[('efficient', 'train')] / med[('plain', 'train')]:.2f}, sampling "
          f"{med[('efficient', 'sample')] / med[('plain', 'sample')]:.2f}")


if __name__ == "__main__":
    main()
