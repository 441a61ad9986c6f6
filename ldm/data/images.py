"""Image <-> tensor conversions between 8-bit images and the networks' range, once for the package."""
from __future__ import annotations

import numpy as np
import torch


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 images [..., H, W, 3] (one or a batch) -> float32 tensors [..., 3, H, W] in [-1, 1] (x / 127.5 - 1)."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [H, W, 3] or [B, H, W, 3]; got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Tensors [B, 3, H, W] in [-1, 1] -> uint8 images [B, H, W, 3], clamped and rounded."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
