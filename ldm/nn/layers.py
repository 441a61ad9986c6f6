"""U-Net building blocks: sinusoidal timestep embedding, ResBlock (optional scale-shift norm and
up/down sampling inside), Upsample, Downsample. Parameter names follow the original SD checkpoints."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, sec. 3.5) as [cos, sin] of t * max_period^(-i/half), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


ACTIVATIONS = ("silu", "gelu")


def activation(name: str) -> nn.Module:
    """The U-Net's nonlinearity: SiLU (Stable Diffusion, improved DDPM) or exact GELU (DeepFloyd IF)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"act_fn must be one of {', '.join(ACTIVATIONS)}; got {name!r}")
    return nn.SiLU() if name == "silu" else nn.GELU()


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to an explicit size) then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else \
            F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (or 2x2 average pooling)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1) if use_conv \
            else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the timestep embedding added in between (Ho et al. 2020, App. B), or
    applied as scale and shift of the second norm (Dhariwal & Nichol 2021, AdaGN); optional up/down sampling
    of both paths (BigGAN-style); 1x1 conv skip when the channel count changes. DeepFloyd IF's options: GELU for
    SiLU (act_fn), the embedding projected without a nonlinearity first (skip_time_act), and the sum of both paths
    divided by output_scale (sqrt(2) in IF's super-resolution U-Nets)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: Optional[int] = None,
                 dropout: float = 0.0, use_scale_shift_norm: bool = False, up: bool = False, down: bool = False,
                 num_groups: int = 32, act_fn: str = "silu", skip_time_act: bool = False,
                 output_scale: float = 1.0):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.output_scale = output_scale
        self.in_layers = nn.Sequential(nn.GroupNorm(num_groups, channels), activation(act_fn),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, use_conv=False), Upsample(channels, use_conv=False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, use_conv=False), Downsample(channels, use_conv=False)
        self.emb_layers = nn.Sequential(
            nn.Identity() if skip_time_act else activation(act_fn),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(num_groups, out_channels), activation(act_fn),
                                        nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        out = self.skip_connection(x) + h
        return out if self.output_scale == 1 else out / self.output_scale
