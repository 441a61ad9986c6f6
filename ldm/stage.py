"""A stage: one diffusion model of a pipeline. Its network, how it samples (the DiffusionConfig: schedule,
parameterization, grid, default sampler, steps and guidance) and, for a latent model, the autoencoder whose
latents it denoises; a pixel-space model has none. Text-to-image, image-to-image, super-resolution and cascades
are compositions of stages (pipelines/), and all of them sample through `Stage.sample`."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .conditioning import Conditioning, guided
from .diffusion.augmentation import LowResConditioning
from .diffusion.config import DiffusionConfig
from .diffusion.denoiser import Denoiser, DenoiseFn
from .diffusion.grids import noise_levels
from .random import Generator
from .sampling import get_sampler
from .sampling.transforms import with_thresholding

Tensor = torch.Tensor
@dataclass
class Stage:
    """unet: the denoising network; diffusion: how it samples; vae: the autoencoder of a latent model (None:
    the network denoises pixels in [-1, 1]); low_res: for a super-resolution stage, how it takes the image it
    refines (ldm.diffusion.augmentation)."""

    unet: torch.nn.Module
    diffusion: DiffusionConfig
    vae: Optional[torch.nn.Module] = None
    low_res: Optional[LowResConditioning] = None

    def __post_init__(self):
        self._schedule = None

    @property
    def schedule(self):
        if self._schedule is None or self._schedule[0] != self.diffusion:
            self._schedule = (self.diffusion, self.diffusion.build_schedule())
        return self._schedule[1]

    def replace(self, **changes) -> "Stage":
        return replace(self, **changes)

    @property
    def factor(self) -> int:
        """Pixels per position of the sampled array: the autoencoder's downsampling factor, 1 in pixel space."""
        return 1 if self.vae is None else self.vae.downsample_factor

    @property
    def channels(self) -> int:
        """Channels of the sampled array (the network's mean output)."""
        learned = self.diffusion.variance_type in ("learned", "learned_range")
        return self.unet.config.out_channels // (2 if learned else 1)

    @property
    def native_size(self) -> int:
        """The image size the model was built for: the U-Net's sample size times the autoencoder factor."""
        return self.unet.config.sample_size * self.factor

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet] + ([] if self.vae is None else [self.vae])

    def sigmas(self, num_inference_steps: int) -> Tensor:
        """The model's inference grid (its spacing, sigma schedule and final level): num_inference_steps noise
        levels, then the one sampling ends at."""
        return noise_levels(self.schedule, num_inference_steps, **self.diffusion.grid)

    def denoiser(self, cond: Conditioning, uncond: Optional[Conditioning], guidance_scale: float,
                 thresholding=None) -> DenoiseFn:
        """The DenoiseFn the samplers walk: the network bound to the conditioning pair (classifier-free guidance in
        one batched call when uncond is given), then thresholding of x0: None is the model's own (its
        DiffusionConfig's), False none, else "static", "dynamic" or a dict (ldm.sampling.transforms)."""
        d = self.diffusion
        network = Denoiser(self.unet, self.schedule, d.prediction_type, d.variance_type, d.timestep_rounding)
        return with_thresholding(guided(network, cond, uncond, guidance_scale),
                                 d.thresholding if thresholding is None else thresholding)

    def sample(self, denoise: DenoiseFn, x: Tensor, sigmas: Tensor, sampler: str, options: dict,
               generator: Generator = None, callback: Optional[Callable] = None, progress: bool = True) -> Tensor:
        """Walk the noise levels `sigmas` (the last one included) from x with a registered sampler, with a progress
        bar and a check for non-finite values after every step; callback(i, sigma, x, prediction)."""
        bar = tqdm(total=len(sigmas) - 1, disable=not progress, desc=sampler, leave=False)

        def on_step(i, sigma, x, pred):
            if not bool(torch.isfinite(x).all()):
                bar.close()
                raise FloatingPointError(
                    f"non-finite {'latents' if self.vae is not None else 'pixels'} after step {i} "
                    f"(sigma={sigma:.4g}) of {sampler}; in float16/bfloat16 try float32, or a smaller guidance_scale")
            bar.update(1)
            if callback is not None:
                callback(i, sigma, x, pred)

        with torch.no_grad():
            out = get_sampler(sampler).fn(denoise, x, sigmas, generator=generator, callback=on_step, **options)
        bar.close()
        return out

    def encode(self, pixels: Tensor, generator: Generator = None) -> Tensor:
        """Images in [-1, 1] -> the array this stage samples (latents, or the pixels themselves)."""
        if self.vae is None:
            return pixels
        with torch.no_grad():
            return self.vae.encode(pixels, generator=generator)

    def decode(self, x: Tensor) -> Tensor:
        """The sampled array -> images in [-1, 1] (float32)."""
        if self.vae is None:
            return x.float()
        with torch.no_grad():
            return self.vae.decode(x.to(next(self.vae.parameters()).dtype)).float()


@dataclass
class PipelineParts:
    """What a checkpoint holds: a text encoder and one or more stages (a cascade's base first). unet, vae and
    diffusion are the first stage's."""

    text_encoder: torch.nn.Module
    stages: list[Stage]

    @classmethod
    def single(cls, unet, vae, text_encoder, diffusion: DiffusionConfig) -> "PipelineParts":
        return cls(text_encoder, [Stage(unet, diffusion, vae)])

    unet = property(lambda self: self.stages[0].unet)
    vae = property(lambda self: self.stages[0].vae)
    diffusion = property(lambda self: self.stages[0].diffusion)
