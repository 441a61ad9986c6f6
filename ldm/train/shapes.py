"""The recipe that trains the shipped shapes-64 model on the CPU: a KL (or VQ) autoencoder on rendered shapes
scenes, then a cross-attention U-Net on its latents conditioned on frozen MiniLM token embeddings, with
classifier-free caption dropout and EMA. Runs against a time budget, checkpoints atomically every few
minutes and resumes from the last checkpoint, so it can be spread over several sessions.

    python -m ldm.train.shapes autoencoder --run runs/ae --minutes 20
    python -m ldm.train.shapes unet --run runs/unet --ae runs/ae --minutes 60
    python -m ldm.train.shapes export --ae runs/ae --unet runs/unet --out weights/shapes-64
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import save_pipeline
from ..data.shapes import make_batch
from ..diffusion import Denoiser, UniformSampler, training_losses
from ..diffusion.config import DiffusionConfig
from ..nn.autoencoder import Autoencoder, AutoencoderConfig
from ..nn.unet import UNetConfig, UNetModel
from ..text import HFTextEncoder
from .ema import EMA
from .state import load_training_state, rng_state, save_training_state, set_rng_state

AE_CONFIGS = {
    "kl": AutoencoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                            resolution=64, scaling_factor=1.0),
    "vq": AutoencoderConfig(kind="vq", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                            resolution=64, scaling_factor=1.0, n_embed=512, beta=0.25),
}
UNET_CONFIG = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                         attention_resolutions=(2, 4), num_heads=4, context_dim=384, sample_size=16,
                         mask_context=True)
DIFFUSION = DiffusionConfig(schedule="cosine", prediction_type="v", spacing="trailing")
TEXT_MAX_LENGTH = 32


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], measured on [0, 1] with 8-bit quantization of the reconstruction."""
    a = ((x.clamp(-1, 1) + 1) * 127.5).round() / 255
    b = ((y.clamp(-1, 1) + 1) * 127.5).round() / 255
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


class Run:
    """A run folder: log.csv, state.pt (resume) and the time budget."""

    def __init__(self, folder: str, minutes: float, every_minutes: float = 3.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.deadline = time.time() + 60 * minutes
        self.every = 60 * every_minutes
        self.last_save = time.time()
        self.state_path = self.folder / "state.pt"

    def log(self, row: dict) -> None:
        path = self.folder / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def due(self) -> bool:
        return time.time() - self.last_save > self.every

    def out_of_time(self) -> bool:
        return time.time() > self.deadline

    def save(self, state: dict) -> None:
        save_training_state(state, self.state_path)
        self.last_save = time.time()


def train_autoencoder(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    run = Run(args.run, args.minutes)
    model = Autoencoder(AE_CONFIGS[args.kind])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if run.state_path.exists():
        st = load_training_state(run.state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
        set_rng_state(st["rng"])
        print(f"resumed at step {step}")
    val_images, _ = make_batch(256, seed=10**6, size=64)
    val = to_tensor(val_images)
    start = time.time()
    while not run.out_of_time():
        images, _ = make_batch(args.batch, seed=args.seed * 10**7 + step, size=64)
        x = to_tensor(images)
        out = model(x)
        rec = out.reconstruction
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + args.reg_weight * out.reg_loss
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.5 * (1 + math.cos(math.pi * min(1.0, step / args.total_steps))))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or run.due() or run.out_of_time():
            model.eval()
            with torch.no_grad():
                val_psnr = psnr(model.decode(model.encode(val[:64], sample=False)), val[:64])
            model.train()
            now = elapsed + time.time() - start
            run.log({"step": step, "loss": f"{loss.item():.5f}", "reg": f"{out.reg_loss.item():.4f}",
                     "val_psnr": f"{val_psnr:.2f}", "lr": f"{lr:.2e}", "seconds": f"{now:.0f}"})
            print(f"step {step} loss {loss.item():.4f} val PSNR {val_psnr:.2f} dB ({now:.0f} s)", flush=True)
        if run.due() or run.out_of_time():
            run.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                      "elapsed": elapsed + time.time() - start, "rng": rng_state()})


def load_autoencoder(run_folder: str) -> Autoencoder:
    """The trained autoencoder of a run, with its latent scale set to 1/std of the latents (Rombach et al. 4.3.2)."""
    st = load_training_state(Path(run_folder) / "state.pt")
    kind = "vq" if any(k.startswith("quantize.") for k in st["model"]) else "kl"
    model = Autoencoder(AE_CONFIGS[kind])
    model.load_state_dict(st["model"])
    model.eval()
    images, _ = make_batch(512, seed=2 * 10**6, size=64)
    with torch.no_grad():
        z = model.encode(to_tensor(images), sample=False)
    config = AutoencoderConfig.from_dict({**model.config.to_dict(), "scaling_factor": round(1 / z.std().item(), 5)})
    scaled = Autoencoder(config)
    scaled.load_state_dict(model.state_dict())
    return scaled.eval()


def _text_cache(text: HFTextEncoder, captions: list[str]) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """Token embeddings of every distinct caption (and of "", the unconditional one), computed once."""
    unique = sorted(set(captions) | {""})
    embs, masks = [], []
    with torch.no_grad():
        for i in range(0, len(unique), 256):
            chunk = unique[i:i + 256]
            enc = text.encode(chunk)
            embs.append(enc.embeddings.half())
            masks.append(enc.mask)
    return {c: i for i, c in enumerate(unique)}, torch.cat(embs), torch.cat(masks)


def train_unet(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    run = Run(args.run, args.minutes)
    ae = load_autoencoder(args.ae)
    text = HFTextEncoder.minilm(max_length=TEXT_MAX_LENGTH)
    data_path = run.folder / "data.pt"
    if data_path.exists():
        data = load_training_state(data_path)
    else:
        t0 = time.time()
        images, captions = make_batch(args.num_images, seed=args.seed, size=64)
        latents = []
        with torch.no_grad():
            for i in range(0, len(images), 512):
                latents.append(ae.encode(to_tensor(images[i:i + 512]), sample=False))
        index, embs, masks = _text_cache(text, captions)
        data = {"latents": torch.cat(latents), "caption_ids": torch.tensor([index[c] for c in captions]),
                "embeddings": embs, "masks": masks, "empty_id": index[""]}
        save_training_state(data, data_path)
        print(f"encoded {len(images)} images and {len(index)} captions in {time.time() - t0:.0f} s", flush=True)
    model = UNetModel(UNET_CONFIG)
    schedule = DIFFUSION.build_schedule()
    denoiser = Denoiser(model, schedule, DIFFUSION.prediction_type)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ema = EMA(model, args.ema)
    sampler = UniformSampler(schedule.num_timesteps)
    step, elapsed = 0, 0.0
    if run.state_path.exists():
        st = load_training_state(run.state_path)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        step, elapsed = st["step"], st["elapsed"]
        set_rng_state(st["rng"])
        print(f"resumed at step {step}", flush=True)
    n = len(data["latents"])
    start = time.time()
    model.train()
    while not run.out_of_time():
        idx = torch.randint(0, n, (args.batch,))
        z0 = data["latents"][idx]
        cap = data["caption_ids"][idx]
        drop = torch.rand(args.batch) < args.cfg_dropout
        cap = torch.where(drop, torch.full_like(cap, data["empty_id"]), cap)
        context, mask = data["embeddings"][cap].float(), data["masks"][cap]
        t, weights = sampler.sample(args.batch)
        lr = args.lr * min(1.0, (step + 1) / 500)
        for group in opt.param_groups:
            group["lr"] = lr
        losses = training_losses(denoiser, z0, t, context=context, context_mask=mask)
        loss = (losses["loss"] * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        step += 1
        if step % 100 == 0:
            now = elapsed + time.time() - start
            run.log({"step": step, "loss": f"{loss.item():.5f}", "lr": f"{lr:.2e}", "seconds": f"{now:.0f}"})
            print(f"step {step} loss {loss.item():.4f} ({now:.0f} s)", flush=True)
        if run.due() or run.out_of_time():
            run.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "step": step,
                      "elapsed": elapsed + time.time() - start, "rng": rng_state()})


def plot_curve(log_csv: Path, column: str, png: Path, title: str) -> None:
    """A loss curve as a small PNG, drawn with PIL (no plotting library needed): log-scale y over steps."""
    from PIL import Image, ImageDraw

    rows = list(csv.DictReader(open(log_csv)))
    steps = np.array([float(r["step"]) for r in rows])
    values = np.array([float(r[column]) for r in rows])
    if len(rows) > 20:  # smooth over ~2 % of the run
        k = max(1, len(rows) // 50)
        values = np.convolve(values, np.ones(k) / k, mode="valid")
        steps = steps[k - 1:]
    w, h, m = 640, 360, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    logv = np.log10(np.maximum(values, 1e-12))
    lo, hi = logv.min(), logv.max() + 1e-9
    xs = m + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (w - 2 * m)
    ys = h - m - (logv - lo) / (hi - lo) * (h - 2 * m)
    draw.rectangle([m, m, w - m, h - m], outline="black")
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(30, 80, 200), width=2)
    draw.text((m, 15), title, fill="black")
    draw.text((m, h - m + 8), f"step {int(steps.min())}", fill="black")
    draw.text((w - m - 80, h - m + 8), f"step {int(steps.max())}", fill="black")
    draw.text((5, m - 12), f"{10 ** hi:.3g}", fill="black")
    draw.text((5, h - m), f"{10 ** lo:.3g}", fill="black")
    img.save(png)


def export(args: argparse.Namespace) -> None:
    """Write the EMA U-Net, the autoencoder and MiniLM as a pipeline folder in our format."""
    ae = load_autoencoder(args.ae)
    st = load_training_state(Path(args.unet) / "state.pt")
    model = UNetModel(UNET_CONFIG)
    ema = EMA(model)
    ema.load_state_dict(st["ema"])
    ema.copy_to(model)
    text = HFTextEncoder.minilm(max_length=TEXT_MAX_LENGTH)
    save_pipeline(model.eval(), ae, text, DIFFUSION, args.out)
    out = Path(args.out)
    plot_curve(Path(args.unet) / "log.csv", "loss", out / "unet_loss.png", "U-Net training loss (v-prediction MSE)")
    plot_curve(Path(args.ae) / "log.csv", "loss", out / "autoencoder_loss.png", "autoencoder loss (L1 + MSE)")
    print(f"wrote {args.out} (U-Net step {st['step']}, {st['elapsed'] / 60:.0f} min)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.train.shapes")
    sub = parser.add_subparsers(dest="command", required=True)
    ae = sub.add_parser("autoencoder")
    ae.add_argument("--run", required=True)
    ae.add_argument("--kind", default="kl", choices=list(AE_CONFIGS))
    ae.add_argument("--minutes", type=float, default=20)
    ae.add_argument("--batch", type=int, default=32)
    ae.add_argument("--lr", type=float, default=4e-4)
    ae.add_argument("--total-steps", type=int, default=20000)
    ae.add_argument("--reg-weight", type=float, default=1e-6)
    ae.add_argument("--seed", type=int, default=0)
    ae.set_defaults(func=train_autoencoder)
    un = sub.add_parser("unet")
    un.add_argument("--run", required=True)
    un.add_argument("--ae", required=True)
    un.add_argument("--minutes", type=float, default=60)
    un.add_argument("--batch", type=int, default=128)
    un.add_argument("--lr", type=float, default=3e-4)
    un.add_argument("--ema", type=float, default=0.999)
    un.add_argument("--cfg-dropout", type=float, default=0.1)
    un.add_argument("--num-images", type=int, default=100_000)
    un.add_argument("--seed", type=int, default=0)
    un.set_defaults(func=train_unet)
    ex = sub.add_parser("export")
    ex.add_argument("--ae", required=True)
    ex.add_argument("--unet", required=True)
    ex.add_argument("--out", required=True)
    ex.set_defaults(func=export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
