"""Image metrics used by the recipes and model cards."""
from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], measured on [0, 1] with 8-bit quantization of both (as saved images)."""
    a = ((x.clamp(-1, 1) + 1) * 127.5).round() / 255
    b = ((y.clamp(-1, 1) + 1) * 127.5).round() / 255
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))
