"""Noise-conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models", sec. 4.2): a super-resolution
stage sees its low-resolution input corrupted, and is told how much, so that at sampling time the imperfect output
of the stage before looks like what it was trained on.

- Gaussian noise: z_s = sqrt(alpha_bar_s) z_0 + sqrt(1 - alpha_bar_s) eps at an integer level s of the augmentation
  schedule, applied at the low resolution, then upsampled; s is the network's `noise_level` input.
- Gaussian blur (the paper's augmentation for the higher resolutions), applied in training.
- At sampling, non-truncated: the previous stage runs to 0, its output is corrupted with q(z_s | z_0); truncated:
  the previous stage stops at the noise level of s and its sample z_s is fed as it is (a pixel-space stage whose
  samples are the images themselves), so the noise the input carries is the previous stage's own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import JsonConfig, check_number
from ..random import Generator, randint, randn
from . import process
from .schedule import SCHEDULE_ALIASES, NoiseSchedule

Tensor = torch.Tensor
UPSAMPLING = ("bicubic", "bilinear", "nearest")
MODES = ("non_truncated", "truncated")
NOISE_AT = ("low", "high")


@dataclass(frozen=True)
class LowResConditioning(JsonConfig):
    """How a super-resolution stage takes the image it refines: `scale` times smaller than its output, upsampled
    (`upsample`) to the size of the array it samples and given to the network as `concat`, after Gaussian noise at
    level `noise_level` of the augmentation schedule (`schedule`, `num_timesteps`, betas; the level is the
    network's `noise_level`). Training draws the level uniformly from [0, max_noise_level] and, with
    blur_sigma > 0, blurs the input with a Gaussian of std uniform in [0, blur_sigma] pixels (low resolution).

    noise_at "low" (Ho et al.; the x4 upscaler) corrupts the input before upsampling it, "high" (DeepFloyd IF's
    stage II) after; align_corners is the upsampling's (IF: bilinear with align_corners=True). The pipelines
    draw the augmentation noise as diffusers' do: before the starting noise at "low", after it at "high"."""

    scale: int = 2
    upsample: str = "bicubic"
    schedule: str = "cosine"
    num_timesteps: int = 1000
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    noise_level: int = 100
    max_noise_level: int = 999
    blur_sigma: float = 0.0
    noise_at: str = "low"
    align_corners: bool = False

    def __post_init__(self):
        object.__setattr__(self, "schedule", SCHEDULE_ALIASES.get(self.schedule, self.schedule))
        check_number("scale", self.scale, 1, integer=True)
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}; got {self.upsample!r}")
        self.build_schedule()
        check_number("max_noise_level", self.max_noise_level, 0, self.num_timesteps - 1, integer=True)
        self.check_level(self.noise_level)
        check_number("blur_sigma", self.blur_sigma, 0)
        if self.noise_at not in NOISE_AT:
            raise ValueError(f"noise_at must be one of {', '.join(NOISE_AT)}; got {self.noise_at!r}")
        if self.align_corners and self.upsample == "nearest":
            raise ValueError("align_corners applies to bilinear and bicubic upsampling, not nearest")

    def build_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_name(self.schedule, self.num_timesteps, beta_start=self.beta_start,
                                       beta_end=self.beta_end)

    def check_level(self, level, name: str = "noise_level") -> int:
        """A level the model was trained on: an int in [0, max_noise_level]."""
        check_number(name, level, 0, self.max_noise_level, integer=True)
        return int(level)

    def sigma_of(self, level: int) -> float:
        """The noise level sigma of augmentation level s (where a truncated previous stage stops)."""
        return 0.0 if level == 0 else float(self.build_schedule().sigma_at(torch.tensor([level]))[0])

    def resize(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """The (augmented) low-resolution input at the sampled array's size."""
        if tuple(image.shape[-2:]) == tuple(size):
            return image
        kwargs = {} if self.upsample == "nearest" else {"align_corners": self.align_corners}
        return F.interpolate(image.float(), size=size, mode=self.upsample, **kwargs).to(image.dtype)

    def noise(self, z0: Tensor, level: Tensor, generator: Generator = None) -> Tensor:
        """q(z_s | z_0) at integer levels s [B] (level 0 is alpha_bar_0, almost clean, as diffusers' add_noise)."""
        alpha_bar = self.build_schedule().alpha_bar_at(level.cpu())
        return process.q_sample(z0, randn(z0.shape, generator, z0.dtype, z0.device), alpha_bar)

    def condition(self, low: Tensor, size: tuple[int, int], level: Tensor, generator: Generator = None,
                  noised: bool = False) -> Tensor:
        """The network's `concat` input at the sampled array's size: the low-resolution image corrupted at
        `level` (at noise_at's resolution; noised=True: it already carries that noise) and upsampled."""
        if self.noise_at == "high":
            low = self.resize(low, size)
        if not noised:
            low = self.noise(low, level, generator)
        return self.resize(low, size)

    def sample_levels(self, batch: int, generator: Generator = None) -> Tensor:
        """Training: levels uniform in [0, max_noise_level]."""
        return randint(self.max_noise_level + 1, (batch,), generator)


def gaussian_blur(image: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image [B, C, H, W] with a Gaussian of its own std sigma [B] (pixels; 0 leaves it unchanged),
    separable, reflect-padded, kernel radius ceil(3 sigma_max)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    radius = int(math.ceil(3 * float(sigma.max()))) if len(sigma) else 0
    if radius == 0:
        return image
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x[None] / sigma.clamp(min=1e-6)[:, None]) ** 2)
    kernel = torch.where(sigma[:, None] > 0, kernel, (x[None] == 0).float())
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(image.dtype)
    b, c, h, w = image.shape
    if radius >= min(h, w):
        raise ValueError(f"blur std {float(sigma.max()):.3g} px is too wide for a {h}x{w} image")
    k = kernel.repeat_interleave(c, 0)  # one kernel per (image, channel), as a grouped convolution
    out = F.pad(image.reshape(1, b * c, h, w), (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, k[:, None, None, :], groups=b * c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    out = F.conv2d(out, k[:, None, :, None], groups=b * c)
    return out.reshape(b, c, h, w)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"augmentation must be one of {', '.join(MODES)}; got {mode!r}")
    return mode
