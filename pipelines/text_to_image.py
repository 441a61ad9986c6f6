"""pipe("a prompt").images[0]"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ldm.config import check_number
from ldm.diffusion.grids import stop_at
from ldm.random import Generator, randn

from .base import DiffusionPipeline, PipelineOutput, Settings, check_prompts


class TextToImagePipeline(DiffusionPipeline):
    def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt: Union[None, str, Sequence[str]] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 sampler: Optional[str] = None, eta: float = 0.0, sampler_options: Optional[dict] = None,
                 thresholding=None, height: Optional[int] = None,
                 width: Optional[int] = None, num_images_per_prompt: int = 1,
                 seed: Union[None, int, Sequence[int]] = None, generator: Generator = None, output_type: str = "pil",
                 callback: Optional[Callable] = None) -> PipelineOutput:
        """Generate images for one prompt or a list of prompts ("" draws unconditional samples).

        sampler: a name in ldm.sampling.SAMPLERS ("ddim", "euler", "dpmpp_2m", "unipc", ...), with its options in
        sampler_options (e.g. {"eta": 1.0} for ddim; eta= is the same); sampler, num_inference_steps and guidance_scale
        default (None) to the model's own, stored in its folder (shapes-64: dpmpp_2m, 20 steps, guidance 3;
        where none is stored: ddim, 50, 7.5); guidance_scale > 1 turns on classifier-free guidance
        (negative_prompt replaces the empty prompt); thresholding of the x0 estimate: "static", "dynamic", a dict
        like {"kind": "dynamic", "percentile": 0.995}, False (none) or None (the model's own: none, or the
        scheduler's clip_sample / thresholding of a diffusers folder, DeepFloyd IF's dynamic); height/width default
        to the model's native size and must be multiples of the autoencoder's factor; seed: an int (image k gets
        seed + k, so a seed gives the same image at any batch size) or one int per image.
        """
        prompts = check_prompts(prompt)
        run = self.check_common(prompts, negative_prompt, num_inference_steps, guidance_scale, sampler, eta,
                                sampler_options, num_images_per_prompt, output_type)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self.check_size(height, width)
        batch = len(prompts) * num_images_per_prompt
        if output_type != "latent":
            self.check_memory(batch, height, width)
        generators, seeds = self.generators(batch, seed, generator)
        x = self.generate(prompts, run, num_images_per_prompt, height, width, thresholding, generators, callback)
        return PipelineOutput(self.decode(x, output_type), seeds)

    def check_size(self, height, width) -> None:
        f = self.latent_factor
        for name, value in (("height", height), ("width", width)):
            check_number(name, value, f, integer=True)
            if value % f:
                raise ValueError(f"{name} must be a multiple of {f} (the autoencoder's downsampling factor); "
                                 f"got {value}")

    def generate(self, prompts: list[str], run: Settings, n: int, height: int, width: int, thresholding,
                 generators, callback, sigma_stop: float = 0.0) -> torch.Tensor:
        """The sampled array of n images per prompt from noise; with sigma_stop > 0 sampling stops at that noise
        level (a truncated cascade's base) and returns x there."""
        f = self.latent_factor
        x = randn((len(prompts) * n, self.stage.channels, height // f, width // f), generators, self.dtype,
                  self.device)
        sigmas = stop_at(self.sigmas(run.num_inference_steps), sigma_stop)
        return self.draw(prompts, run, n, x, sigmas, thresholding, generators, callback)
