"""Where the shapes-64 sampling time goes, and what a narrower U-Net would buy: the forward time of the shipped
U-Net configuration (read from weights/shapes-64) at its 64 and at 32 base channels (random weights: speed does
not depend on them), at batch 2 (one image with classifier-free guidance) and batch 64 (32 images with guidance),
and the shipped decoder at batch 1 and 32. Median of --repeats timed calls after one warm-up, in milliseconds,
with the threads torch uses. Not a test: run `python benchmarks/shapes_sampling_speed.py [--repeats 20] [--threads 2]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from ldm.nn.unet import UNetModel


def milliseconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines import TextToImagePipeline

    shipped = TextToImagePipeline.from_pretrained()
    vae, c = shipped.vae, shipped.unet.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, c.in_channels, c.sample_size, c.sample_size, generator=g)
    context = torch.randn(64, 24, c.context_dim, generator=g)
    t = torch.full((64,), 500.0)
    with torch.inference_mode():
        for width in (c.model_channels, 32):
            unet = UNetModel(dataclasses.replace(c, model_channels=width)).eval()
            params = sum(p.numel() for p in unet.parameters()) / 1e6
            times = [milliseconds(lambda: unet(z[:b], t[:b], context[:b]), args.repeats) for b in (2, 64)]
            print(f"U-Net {width} base channels ({params:.2f} M): batch 2 {times[0]:.1f} ms, batch 64 {times[1]:.1f} ms")
        latents = z[:32, :vae.latent_channels]
        times = [milliseconds(lambda: vae.decode(latents[:b]), args.repeats) for b in (1, 32)]
        print(f"decoder: batch 1 {times[0]:.1f} ms, batch 32 {times[1]:.1f} ms  ({args.threads} threads)")


if __name__ == "__main__":
    main()
