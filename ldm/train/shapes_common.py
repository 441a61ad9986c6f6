"""What the shapes recipe's runs share: the shipped configurations, a run folder with its time budget, log and
atomic checkpoints, where a run starts from, the learning-rate decay and the loss curves."""
from __future__ import annotations

import csv
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoints import PIPELINE_FILE, resolve
from ..data.images import to_model_range
from ..data.shapes_dataset import ShapesDataset
from ..diffusion.config import DiffusionConfig
from ..nn.autoencoder import AutoencoderConfig
from ..nn.unet import UNetConfig
from .state import save_training_state
from .trainer_utils import cosine_decay

# 64x64x3 -> 8x8x8 latents (f=8): small enough that the U-Net runs at 8x8, which is what makes CPU sampling fast.
AE_CONFIGS = {
    "kl": AutoencoderConfig(kind="kl", ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=8, embed_dim=8,
                            num_groups=8, resolution=64, scaling_factor=1.0),
    "vq": AutoencoderConfig(kind="vq", ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=8, embed_dim=8,
                            num_groups=8, resolution=64, scaling_factor=1.0, n_embed=4096, beta=0.25),
}
UNET_CONFIG = UNetConfig(in_channels=8, out_channels=8, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(1, 2), num_heads=4, context_dim=384, sample_size=8,
                         mask_context=True)
# The sampling defaults a folder stores, with which the benchmark is measured: DPM-Solver++(2M) (it drew more prompts
# right than DDIM at 20 steps; the model cards' history), 20 steps, guidance 3.
DIFFUSION = DiffusionConfig(schedule="cosine", prediction_type="v", spacing="trailing", sampler="dpmpp_2m",
                            num_inference_steps=20, guidance_scale=3.0)
TEXT_MAX_LENGTH = 24  # the longest shapes caption is 20 MiniLM tokens


def scenes(seed: int, n: int) -> torch.Tensor:
    """The first n scenes of the 64x64 stream `seed` (ShapesDataset) as tensors [n, 3, 64, 64] in [-1, 1]: the
    recipe's batches, validation and test sets are such streams."""
    return to_model_range(ShapesDataset(64, n, seed).batch()[0])


def hardware() -> str:
    """CPU model and the threads torch uses (or the CUDA device), for logs and the model card."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} thread" + ("s" if torch.get_num_threads() != 1 else "")


class Run:
    """A run folder: log.csv, state.pt (resume) and the time budget."""

    def __init__(self, folder: str, minutes: float, every_minutes: float = 3.0, program: str = "ldm.train.shapes",
                 argv: Optional[list[str]] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.deadline = time.time() + 60 * minutes
        self.every = 60 * every_minutes
        self.last_save = time.time()
        self.state_path = self.folder / "state.pt"
        with open(self.folder / "commands.txt", "a") as f:  # every invocation, for the model card
            f.write(f"{time.strftime('%Y-%m-%d %H:%M')}  python -m {program} "
                    f"{' '.join(sys.argv[1:] if argv is None else argv)}"
                    f"  # {hardware()}\n")

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


def training_source(flag: str, folder: str) -> Path:
    """What a run starts from, checked before anything is written: a run folder (its state.pt), or a model folder
    in this project's format (a path, or the name of a shipped model such as shapes-64), so training can go on from
    the shipped weights when the run folders are gone."""
    state = Path(folder) / "state.pt"
    if state.is_file():
        return state
    try:
        model = resolve(folder)
    except FileNotFoundError:
        model = None
    if model is not None and (model / PIPELINE_FILE).is_file():
        return model
    raise SystemExit(f"{flag} {folder!r}: no run there (expected {state}) and no model folder ({PIPELINE_FILE})")


def lr_decay(step: int, total_steps) -> float:
    """Cosine from 1 down to 0.1 over total_steps, then 0.1 (1 throughout when total_steps is None): ending a run
    on a low rate is what lets the weights settle."""
    return 1.0 if total_steps is None else cosine_decay(step / total_steps, floor=0.1)


def training_parts(config: UNetConfig, diffusion: DiffusionConfig, lr: float, ema_decay: float):
    """A fresh U-Net and what trains it: (model, denoiser, AdamW, EMA, uniform timestep sampler)."""
    from ..diffusion import Denoiser, UniformSampler
    from ..nn.unet import UNetModel
    from .ema import EMA

    model = UNetModel(config)
    schedule = diffusion.build_schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return (model, Denoiser(model, schedule, diffusion.prediction_type), opt, EMA(model, ema_decay),
            UniformSampler(schedule.num_timesteps))


def set_lr(opt: torch.optim.Optimizer, lr: float, step: int, total_steps) -> float:
    """The recipes' schedule: linear warm-up over 500 steps, then lr_decay; set on every group and returned."""
    lr = lr * min(1.0, (step + 1) / 500) * lr_decay(step, total_steps)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def optimize(model: torch.nn.Module, opt: torch.optim.Optimizer, ema, loss: torch.Tensor) -> None:
    """One step: gradients of loss, clipped to norm 1, the optimizer, then the EMA of the weights."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema.update(model)


def log_step(run: "Run", step: int, loss: torch.Tensor, lr: float, seconds: float) -> None:
    """Every 100th step: a row of the run's log.csv and a line on stdout."""
    if step % 100 == 0:
        run.log({"step": step, "loss": f"{loss.item():.5f}", "lr": f"{lr:.2e}", "seconds": f"{seconds:.0f}"})
        print(f"step {step} loss {loss.item():.4f} ({seconds:.0f} s)", flush=True)


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
