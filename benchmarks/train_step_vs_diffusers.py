"""One fine-tuning step of our trainer against a plain diffusers UNet2DConditionModel + accelerate loop: the same
U-Net configuration and weights (converted with ldm.nn.unet_diffusers), the same batch of latents, text embeddings,
padding mask, timesteps and noise, AdamW, gradient clipping at 1.0 and the same MSE loss (eps or v target). Prints
time per step (best of --repeats, the two sides alternating), the ratio ours / diffusers (< 1 is faster), peak
memory, and the first step's loss on both sides (equal up to float rounding: proof that both train the same thing).

Our side is the Trainer's step: DiffusionModel (ldm/train/trainer_utils.py) prepared by accelerate, training_losses
on a Denoiser, accelerator.backward, clip_grad_norm_, step, zero_grad. The Trainer's per-sample seeded draws of t and
noise are left out: both sides get the same precomputed ones. Each side runs in its own subprocess, so that on the
CPU its peak RSS (ru_maxrss, reset once the model is loaded) is its own; on CUDA peak memory is
torch.cuda.max_memory_allocated.
Not a test: run `python benchmarks/train_step_vs_diffusers.py [--config shapes|sd15-tiny|sd15] [--batch-size 8]
[--steps 20] [--repeats 3] [--bf16]`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ldm.diffusion import Denoiser, training_losses
from ldm.diffusion.config import DiffusionConfig
from ldm.nn.unet import UNetConfig, UNetModel
from ldm.nn.unet_diffusers import config_to_diffusers, state_dict_to_diffusers
from ldm.train.shapes_common import DIFFUSION, TEXT_MAX_LENGTH, UNET_CONFIG
from ldm.train.trainer_utils import DiffusionModel

SD_DIFFUSION = DiffusionConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="eps")
# name: (U-Net, diffusion, text tokens); sd15 is the real 860M-parameter U-Net (random weights): a GPU setting
CONFIGS = {
    "shapes": (UNET_CONFIG, DIFFUSION, TEXT_MAX_LENGTH),
    "sd15-tiny": (UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                             num_heads=8, context_dim=64, sample_size=8), SD_DIFFUSION, 77),
    "sd15": (UNetConfig.sd1(), SD_DIFFUSION, 77),
}
MiB = 2**20


def reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark (what ru_maxrss reports) to the current RSS, so that the peak of
    the imports does not hide that of training (Linux >= 4.0; elsewhere it stays); returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_inputs(args, folder: Path) -> int:
    """Our weights, the same weights under diffusers' names, and one batch, for both workers to load; returns the
    U-Net's parameter count."""
    unet_config, diffusion, tokens = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    unet = UNetModel(unet_config)
    with torch.no_grad():  # the zero-initialized output layers would make the first steps trivially alike
        for p in unet.parameters():
            if not p.any():
                p.normal_(std=0.02)
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(sd, folder / "ours.safetensors")
    save_file(state_dict_to_diffusers(sd, unet_config), folder / "diffusers.safetensors")
    b, size = args.batch_size, args.latent_size or unet_config.sample_size
    lengths = torch.randint(4, tokens + 1, (b,))
    save_file({"x0": torch.randn(b, unet_config.in_channels, size, size),
               "context": torch.randn(b, tokens, unet_config.context_dim),
               "mask": torch.arange(tokens)[None] < lengths[:, None],
               "t": torch.randint(0, diffusion.num_timesteps, (b,)),
               "noise": torch.randn(b, unet_config.in_channels, size, size)}, folder / "batch.safetensors")
    return sum(p.numel() for p in unet.parameters())


def ours_step(unet_config, diffusion, batch, acc):
    """The Trainer's model, optimizer and loss: returns (model, step function)."""
    unet = UNetModel(unet_config)
    unet.load_state_dict(load_file(Path(batch["folder"]) / "ours.safetensors"))
    model = DiffusionModel(unet, torch.nn.Identity(), train_text_encoder=False)  # cached context: no encoder run
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    model, optimizer = acc.prepare(model, optimizer)
    denoiser = Denoiser(model, diffusion.build_schedule(), diffusion.prediction_type, diffusion.variance_type)
    mask = batch["mask"] if unet_config.mask_context else None

    def step() -> float:
        with acc.accumulate(model):
            loss = training_losses(denoiser, batch["x0"], batch["t"], batch["noise"], loss_type="simple",
                                   context=batch["context"], context_mask=mask)["loss"].mean()
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def diffusers_step(unet_config, diffusion, batch, acc):
    """The loop of diffusers' train_text_to_image.py example, on precomputed latents and text embeddings."""
    unet = UNet2DConditionModel(**{k: v for k, v in config_to_diffusers(unet_config).items() if k[0] != "_"})
    unet.load_state_dict(load_file(Path(batch["folder"]) / "diffusers.safetensors"))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    unet, optimizer = acc.prepare(unet, optimizer)
    scheduler = DDPMScheduler(num_train_timesteps=diffusion.num_timesteps,
                              trained_betas=diffusion.build_schedule().betas.tolist(),
                              prediction_type={"eps": "epsilon", "v": "v_prediction"}[diffusion.prediction_type])
    x0, noise, t = batch["x0"], batch["noise"], batch["t"]
    mask = batch["mask"] if unet_config.mask_context else None

    def step() -> float:
        with acc.accumulate(unet):
            noisy = scheduler.add_noise(x0, noise, t)
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=batch["context"], encoder_attention_mask=mask).sample
            loss = F.mse_loss(pred.float(), target.float())
            acc.backward(loss)
            acc.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def worker(args) -> None:
    """One side, in this process: warm up, time args.steps steps, print a JSON line."""
    cuda = torch.cuda.is_available()
    acc = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not cuda)
    unet_config, diffusion, _ = CONFIGS[args.config]
    batch = {k: v.to(acc.device) for k, v in load_file(Path(args.worker_dir) / "batch.safetensors").items()}
    batch["folder"] = args.worker_dir
    step = (ours_step if args.worker == "ours" else diffusers_step)(unet_config, diffusion, batch, acc)
    loaded = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "first_loss": first_loss, "peak_rss": peak, "rss_delta": peak - loaded,
                      "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None}))


def run_side(side: str, folder: Path) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", side, "--worker-dir", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{side} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="training step: ours vs diffusers + accelerate")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="shapes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--latent-size", type=int, help="latent height = width (default: the config's sample_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="accelerate's bf16 autocast (weights stay fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    if args.worker:
        return worker(args)

    unet_config, diffusion, tokens = CONFIGS[args.config]
    size = args.latent_size or unet_config.sample_size
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {torch.get_num_threads()} threads of {os.cpu_count()} cpus"
    with tempfile.TemporaryDirectory() as tmp:
        params = write_inputs(args, Path(tmp))
        results = {"diffusers": [], "ours": []}
        for _ in range(args.repeats):  # alternate, so neither side gets the quieter moments of the machine
            for side in results:
                results[side].append(run_side(side, Path(tmp)))
    best = {side: min(runs, key=lambda r: r["seconds"]) for side, runs in results.items()}
    print(f"config {args.config} ({params / 1e6:.1f}M U-Net parameters, {diffusion.prediction_type}-prediction), "
          f"batch {args.batch_size} x {unet_config.in_channels}x{size}x{size} latents, context {tokens}x"
          f"{unet_config.context_dim}{' masked' if unet_config.mask_context else ''}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, AdamW; {args.steps} steps after {args.warmup} warm-up, "
          f"best of {args.repeats}; torch {torch.__version__}, {device}\n")
    cuda = best["ours"]["cuda_peak"] is not None
    memory = "peak CUDA alloc MiB" if cuda else "peak RSS MiB"
    print(f"| side | ms / step | {memory} | {'' if cuda else 'RSS growth while training MiB | '}step-1 loss |")
    print(f"|---|---|---|{'' if cuda else '---|'}---|")
    for side, r in best.items():
        mem = f"{r['cuda_peak'] / MiB:.1f}" if cuda else f"{r['peak_rss'] / MiB:.1f} | {r['rss_delta'] / MiB:.1f}"
        print(f"| {side} | {r['seconds'] * 1e3:.2f} | {mem} | {r['first_loss']:.6f} |")
    ratio = best["ours"]["seconds"] / best["diffusers"]["seconds"]
    gap = abs(best["ours"]["first_loss"] - best["diffusers"]["first_loss"])
    print(f"\ntime ours / diffusers: {ratio:.3f} (< 1: ours is faster); |step-1 loss difference|: {gap:.2e}")


if __name__ == "__main__":
    main()
