"""Super-resolution (Ho et al. 2021; Saharia et al. 2022): a stage conditioned on a prompt and on a low-resolution
image, which it sees upsampled, concatenated to x_t and corrupted by noise-conditioning augmentation at a level
the network is told (ldm.diffusion.augmentation)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ldm.conditioning import Conditioning
from ldm.diffusion.grids import stop_at
from ldm.random import Generator, randn

from .base import DiffusionPipeline, PipelineOutput, Settings, check_prompts
from .image_to_image import ImageInput, image_to_tensor, per_image


class SuperResolutionPipeline(DiffusionPipeline):
    @property
    def low_res(self):
        if self.stage.low_res is None:
            raise ValueError("this model is not a super-resolution stage: its folder has no 'low_res' settings")
        return self.stage.low_res

    def __call__(self, prompt: Union[str, Sequence[str]], image: ImageInput, noise_level: Optional[int] = None,
                 negative_prompt: Union[None, str, Sequence[str]] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, sampler: Optional[str] = None, eta: float = 0.0,
                 sampler_options: Optional[dict] = None, thresholding=None, num_images_per_prompt: int = 1,
                 seed: Union[None, int, Sequence[int]] = None, generator: Generator = None,
                 output_type: str = "pil", callback: Optional[Callable] = None) -> PipelineOutput:
        """Draw an image `scale` times larger than `image` (one for all prompts or one per prompt; PIL, array or
        tensor in [0, 1], as image-to-image takes) under the prompt. noise_level: the augmentation level the
        image is corrupted with and the network told (None: the model's stored one; 0 is almost clean, higher
        levels trust the image less). Other arguments as for text-to-image."""
        low_res = self.low_res
        prompts = check_prompts(prompt)
        run = self.check_common(prompts, negative_prompt, num_inference_steps, guidance_scale, sampler, eta,
                                sampler_options, num_images_per_prompt, output_type)
        level = low_res.noise_level if noise_level is None else low_res.check_level(noise_level)
        pixels = image_to_tensor(image, 1).to(self.device, self.dtype)
        height, width = (low_res.scale * n for n in pixels.shape[-2:])
        if height % self.latent_factor or width % self.latent_factor:
            raise ValueError(f"the output, {low_res.scale}x the image ({height}x{width}), must be a multiple of "
                             f"{self.latent_factor} (the autoencoder's factor); resize the image")
        batch = len(prompts) * num_images_per_prompt
        if output_type != "latent":
            self.check_memory(batch, height, width)
        pixels = per_image(pixels, len(prompts), num_images_per_prompt)
        generators, seeds = self.generators(batch, seed, generator)
        x = self.upscale(prompts, run, num_images_per_prompt, pixels, level, False, thresholding, generators,
                         callback)
        return PipelineOutput(self.decode(x, output_type), seeds)

    def upscale(self, prompts: list[str], run: Settings, n: int, low: torch.Tensor, level: int, noised: bool,
                thresholding, generators, callback, sigma_stop: float = 0.0) -> torch.Tensor:
        """The sampled array for low-resolution inputs `low` [B, C, h, w] in [-1, 1]: corrupted here at `level`
        (non-truncated augmentation), or with noised=True already a sample at that level (truncated: the previous
        stage stopped there). sigma_stop > 0 stops this stage too (a truncated stage after it)."""
        low_res, f = self.low_res, self.latent_factor
        size = (low.shape[-2] * low_res.scale // f, low.shape[-1] * low_res.scale // f)
        levels = torch.full((low.shape[0],), level, dtype=torch.long)
        shape = (low.shape[0], self.stage.channels, *size)
        if low_res.noise_at == "high":  # the draw order of diffusers' pipelines for each convention
            x = randn(shape, generators, self.dtype, self.device)
            concat = low_res.condition(low, size, levels, generators, noised)
        else:
            concat = low_res.condition(low, size, levels, generators, noised)
            x = randn(shape, generators, self.dtype, self.device)
        extra = Conditioning({"concat": concat.to(self.dtype), "noise_level": levels.to(self.device)})
        sigmas = stop_at(self.sigmas(run.num_inference_steps), sigma_stop)
        return self.draw(prompts, run, n, x, sigmas, thresholding, generators, callback, extra)
