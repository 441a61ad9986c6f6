"""The shapes cascade's super-resolution stage: a pixel-space U-Net that draws a 128x128 scene from its 64x64
render and caption, trained with noise-conditioning augmentation (Ho et al. 2021) on random crops, then exported
behind the shipped shapes-64 base as one cascade folder.

    python -m ldm.train.shapes_sr train --run runs/sr --minutes 50       # resumable; --no-augmentation: control
    python -m ldm.train.shapes_sr export --run runs/sr --out weights/shapes-cascade
    python -m ldm.train.shapes_sr card --model weights/shapes-cascade --results results.json
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoints import read_json, resolve, write_json
from ..files import write_text
from ..data.images import to_model_range
from ..data.shapes_dataset import ShapesDataset
from ..diffusion import training_losses
from ..diffusion.augmentation import LowResConditioning
from ..diffusion.config import DiffusionConfig
from ..nn.unet import UNetConfig, UNetModel
from ..random import rand, randint
from ..text import HFTextEncoder
from .cascade_card import render_cascade_card
from .ema import EMA
from .shapes_common import TEXT_MAX_LENGTH, Run, log_step, optimize, set_lr, training_parts
from .shapes_unet import prepare_text
from .state import load_training_state, rng_state, set_rng_state

SIZE = 128
# 128x128x3 (+3 concatenated) at 32 channels, down to 16x16 where it cross-attends to the caption. 8 norm groups,
# not 32: GroupNorm(32) over 32 channels is an instance norm, which takes each channel's mean over the image away
# and with it the color of a flat background (trained so, the stage shifted grounds' colors: 23 dB fed ground truth).
SR_UNET = UNetConfig(in_channels=6, out_channels=3, concat_channels=3, model_channels=32, channel_mult=(1, 2, 2, 4),
                     num_res_blocks=1, attention_resolutions=(8,), num_heads=4, context_dim=384, sample_size=SIZE,
                     mask_context=True, noise_level_embed="timestep", num_groups=8)
# Imagen's Efficient U-Net layout of the same widths: every level downsamples first (no block at 128 px), more
# blocks at the low resolutions, skips scaled by 1/sqrt(2) (`train --efficient`)
EFFICIENT_SR_UNET = dataclasses.replace(SR_UNET, num_res_blocks=(1, 1, 2, 2), skip_scale=2**-0.5,
                                        resample_first=True)
SR_DIFFUSION = DiffusionConfig(schedule="cosine", prediction_type="v", spacing="trailing", sampler="dpmpp_2m",
                               num_inference_steps=20, guidance_scale=1.0)
# levels up to 500 of the cosine schedule (alpha_bar 0.49): above it the 64-px input says little
LOW_RES = LowResConditioning(scale=2, upsample="bicubic", schedule="cosine", noise_level=100, max_noise_level=500)


def renders(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's scenes at 128 and at 64 px (uint8 [N, H, W, 3]): the same scenes of stream args.seed, so the
    64-px input is what the base model learned to draw."""
    t0 = time.time()
    high = torch.from_numpy(ShapesDataset(SIZE, args.num_images, args.seed).batch()[0])
    low = torch.from_numpy(ShapesDataset(SIZE // LOW_RES.scale, args.num_images, args.seed).batch()[0])
    print(f"rendered {args.num_images} scenes at {SIZE} and {SIZE // LOW_RES.scale} px in {time.time() - t0:.0f} s",
          flush=True)
    return high, low


def crops(high: torch.Tensor, low: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random size x size window of each target and of its upsampled input (the U-Net is convolutional
    and attends at 1/8 scale, so it samples the full image after training on windows)."""
    if size >= high.shape[-1]:
        return high, low
    b, span = high.shape[0], high.shape[-1] - size + 1
    ys, xs = randint(span, (b,)), randint(span, (b,))
    pick = [(slice(None), slice(int(y), int(y) + size), slice(int(x), int(x) + size)) for y, x in zip(ys, xs)]
    return (torch.stack([h[p] for h, p in zip(high, pick)]), torch.stack([v[p] for v, p in zip(low, pick)]))


def augmented_input(low: torch.Tensor, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 64-px input corrupted at a level drawn uniformly in [0, max_noise_level] and upsampled, the levels);
    without augmentation the level is always 0 (alpha_bar_0: almost clean)."""
    levels = LOW_RES.sample_levels(low.shape[0]) if augment else torch.zeros(low.shape[0], dtype=torch.long)
    return LOW_RES.condition(low, (SIZE, SIZE), levels), levels


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    run = Run(args.run, args.minutes, program="ldm.train.shapes_sr", argv=args.argv)
    text = HFTextEncoder.minilm(max_length=TEXT_MAX_LENGTH)
    captions = prepare_text(args, run.folder, text)
    high, low = renders(args)
    st = load_training_state(run.state_path) if run.state_path.exists() else None
    config = EFFICIENT_SR_UNET if args.efficient else SR_UNET
    model, denoiser, opt, ema, sampler = training_parts(config, SR_DIFFUSION, args.lr, args.ema)
    step, elapsed = 0, 0.0
    if st is not None:
        if st["augment"] != (not args.no_augmentation):
            raise SystemExit(f"{args.run} was trained {'with' if st['augment'] else 'without'} augmentation; a run "
                             "keeps its setting")
        if UNetConfig.from_dict(st.get("unet", SR_UNET.to_dict())) != config:  # configs saved before new fields
            raise SystemExit(f"{args.run} was trained with{'out' if args.efficient else ''} --efficient; a run "
                             "keeps its U-Net")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        step, elapsed = st["step"], st["elapsed"]
        set_rng_state(st["rng"])
        print(f"resumed at step {step}", flush=True)
    start = time.time()
    model.train()
    while not run.out_of_time() and (args.max_steps is None or step < args.max_steps):
        idx = randint(len(high), (args.batch,))  # the global generator, saved and restored with the run
        target = to_model_range(high[idx].numpy())
        cond, levels = augmented_input(to_model_range(low[idx].numpy()), not args.no_augmentation)
        target, cond = crops(target, cond, args.crop)
        cap = captions["caption_ids"][idx]
        cap = torch.where(rand((args.batch,)) < args.cfg_dropout, torch.full_like(cap, captions["empty_id"]), cap)
        t, weights = sampler.sample(args.batch)
        lr = set_lr(opt, args.lr, step, args.total_steps)
        losses = training_losses(denoiser, target, t, context=captions["embeddings"][cap].float(),
                                 context_mask=captions["masks"][cap], concat=cond, noise_level=levels)
        loss = (losses["loss"] * weights).mean()
        optimize(model, opt, ema, loss)
        step += 1
        log_step(run, step, loss, lr, elapsed + time.time() - start)
        if run.due() or run.out_of_time() or step == args.max_steps:
            run.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "step": step,
                      "elapsed": elapsed + time.time() - start, "rng": rng_state(),
                      "augment": not args.no_augmentation, "unet": config.to_dict()})


def sr_model(run: Path) -> UNetModel:
    """The EMA weights of a run."""
    st = load_training_state(Path(run) / "state.pt")
    model = UNetModel(UNetConfig.from_dict(st["unet"]) if "unet" in st else SR_UNET)
    model.load_state_dict(st["model"])
    ema = EMA(model)
    ema.load_state_dict(st["ema"])
    ema.copy_to(model)
    return model.eval()


def export(args: argparse.Namespace) -> None:
    """The shipped base and the run's super-resolution stage (EMA weights) as one cascade folder."""
    from pipelines import CascadePipeline, SuperResolutionPipeline, TextToImagePipeline

    base = TextToImagePipeline.from_pretrained(args.base)
    st = load_training_state(Path(args.run) / "state.pt")
    # a stage trained without augmentation saw level 0 only, and its folder says so
    low_res = LOW_RES if st["augment"] else dataclasses.replace(LOW_RES, noise_level=0, max_noise_level=0)
    sr = SuperResolutionPipeline(sr_model(args.run), None, base.text_encoder, SR_DIFFUSION, low_res)
    CascadePipeline(base, [sr]).save_pretrained(args.out)
    write_json({"sr_steps": st["step"], "sr_minutes": round(st["elapsed"] / 60, 1), "augment": st["augment"],
                "sr_parameters": sum(p.numel() for p in sr.unet.parameters()), "base": str(args.base),
                "commands": (Path(args.run) / "commands.txt").read_text().splitlines()},
               Path(args.out) / "training.json")
    write_text(Path(args.out) / "MODEL_CARD.md", render_cascade_card(Path(args.out)))
    print(f"wrote {args.out} (super-resolution stage: {st['step']} steps, {st['elapsed'] / 60:.0f} min)")


def card(args: argparse.Namespace) -> None:
    """Merge benchmarks/shapes_cascade.py's --json figures (if given) into training.json and render the card."""
    folder = resolve(args.model)
    if args.results:
        record = read_json(folder / "training.json")
        record["measurements"] = read_json(args.results)
        write_json(record, folder / "training.json")
    write_text(folder / "MODEL_CARD.md", render_cascade_card(folder))
    print(folder / "MODEL_CARD.md")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.train.shapes_sr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--run", required=True)
    tr.add_argument("--minutes", type=float, default=50)
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--total-steps", type=int, default=None, help="cosine learning-rate decay to 0 at this step")
    tr.add_argument("--num-images", type=int, default=20000)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--crop", type=int, default=64)
    tr.add_argument("--lr", type=float, default=2e-4)
    tr.add_argument("--ema", type=float, default=0.999)
    tr.add_argument("--cfg-dropout", type=float, default=0.1)
    tr.add_argument("--no-augmentation", action="store_true")
    tr.add_argument("--efficient", action="store_true", help="Imagen's Efficient U-Net layout (EFFICIENT_SR_UNET)")
    ex = sub.add_parser("export")
    ex.add_argument("--run", required=True)
    ex.add_argument("--base", default="shapes-64")
    ex.add_argument("--out", required=True)
    cd = sub.add_parser("card")
    cd.add_argument("--model", default="shapes-cascade")
    cd.add_argument("--results", default=None)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    {"train": train, "export": export, "card": card}[args.command](args)


if __name__ == "__main__":
    main()
