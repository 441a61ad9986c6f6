"""Our text-to-image pipeline against diffusers' StableDiffusionPipeline on the same SD 1.5-size random weights:
same sampler (DDIM), steps, CFG and seeds, at 256x256, in float32 and bfloat16, in one run. Prints the wall-time
ratio (ours / diffusers; < 1 is faster) and the U-Net's achieved GFLOP/s against this machine's measured matmul
peak. Not a test: run `python benchmarks/sd_pipeline_vs_diffusers.py [--steps 10] [--size 256]`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.text.tokenizers import clip_tokenizer
from pipelines import TextToImagePipeline


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def sd15_diffusers(folder: str) -> None:
    """SD 1.5 configuration with random weights (the real architecture; no pretrained weights exist offline)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=768))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--bf16-size", type=int, default=64,
                        help="bfloat16 image size: CPUs without native bf16 (no AVX-512-BF16/AMX) run it ~100x slower")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    prompt, negative = "a red circle above a blue square", "blurry"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"SD 1.5 config, DDIM {args.steps} steps, CFG 7.5, batch 1, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as folder:
        sd15_diffusers(folder)
        rows = []
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            size = args.bf16_size if dtype == torch.bfloat16 else args.size
            theirs = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
            theirs.set_progress_bar_config(disable=True)
            ours = TextToImagePipeline.from_pretrained(folder, dtype=dtype)
            ours.progress = False
            common = dict(negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=7.5,
                          height=size, width=size, output_type="np")
            with torch.inference_mode():
                # alternate the two so that neither pays the warm-up or gains from a quieter machine
                t_theirs = t_ours = float("inf")
                for _ in range(args.repeats):
                    elapsed, img_theirs = timed(lambda: theirs(prompt, generator=torch.Generator().manual_seed(0),
                                                               **common).images, 1)
                    t_theirs = min(t_theirs, elapsed)
                    elapsed, img_ours = timed(lambda: ours(prompt, seed=0, **common).images, 1)
                    t_ours = min(t_ours, elapsed)
                lat = size // 8
                x = torch.randn(2, 4, lat, lat, dtype=dtype)
                ctx = torch.randn(2, 77, 768, dtype=dtype)
                t = torch.tensor([500, 500])
                with FlopCounterMode(display=False) as counter:
                    ours.unet(x, t, ctx)
                flops = counter.get_total_flops()
                t_unet = t_unet_theirs = float("inf")
                for _ in range(2):
                    t_unet_theirs = min(t_unet_theirs, timed(lambda: theirs.unet(x, t, encoder_hidden_states=ctx), 1)[0])
                    t_unet = min(t_unet, timed(lambda: ours.unet(x, t, ctx), 1)[0])
            peak = matmul_peak_gflops(dtype, n=2048 if dtype == torch.float32 else 512)
            diff = float(np.abs(img_ours.astype(np.float64) - img_theirs).max())
            rows.append((f"{name}@{size}", t_theirs, t_ours, t_ours / t_theirs, t_unet_theirs, t_unet, flops / t_unet / 1e9, peak,
                         diff))
            print(rows[-1], flush=True)
    print(f"{'dtype@px':<15}{'diffusers s':>12}{'ours s':>9}{'ratio':>7}{'unet-cfg diffusers s':>22}{'unet-cfg ours s':>17}"
          f"{'ours GFLOP/s':>14}{'matmul peak':>13}{'max |diff|':>12}")
    for r in rows:
        print(f"{r[0]:<15}{r[1]:>12.2f}{r[2]:>9.2f}{r[3]:>7.3f}{r[4]:>22.3f}{r[5]:>17.3f}{r[6]:>14.1f}{r[7]:>13.1f}"
              f"{r[8]:>12.2e}")


if __name__ == "__main__":
    main()
