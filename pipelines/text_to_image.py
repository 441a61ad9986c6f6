"""pipe("a prompt").images[0]"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from ldm.random import Generator, randn

from .base import LatentDiffusionPipeline, PipelineOutput, _check_number, check_prompts


class TextToImagePipeline(LatentDiffusionPipeline):
    def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt: Union[None, str, Sequence[str]] = None,
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, sampler: Optional[str] = None,
                 eta: float = 0.0, thresholding=None, height: Optional[int] = None, width: Optional[int] = None,
                 num_images_per_prompt: int = 1, seed: Union[None, int, Sequence[int]] = None,
                 generator: Generator = None, output_type: str = "pil",
                 callback: Optional[Callable] = None) -> PipelineOutput:
        """Generate images for one prompt or a list of prompts.

        sampler: "ddim" (eta), "ddpm", "dpmpp_2m" or "langevin", None for the model's default (its folder's
        diffusion.sampler: "dpmpp_2m" for shapes-64, "ddim" where none is stored); guidance_scale > 1 turns on
        classifier-free guidance (negative_prompt replaces the empty prompt); thresholding: None, "static", "dynamic" or a dict
        like {"kind": "dynamic", "percentile": 0.995} (applied to the latent x0 estimate); height/width default
        to the model's native size and must be multiples of the autoencoder's factor; seed: an int (image k gets
        seed + k, so a seed gives the same image at any batch size) or one int per image.
        """
        prompts = check_prompts(prompt)
        negatives, sampler = self.check_common(prompts, negative_prompt, num_inference_steps, guidance_scale,
                                               sampler, eta, num_images_per_prompt, output_type)
        f = self.latent_factor
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            _check_number(name, value, f, integer=True)
            if value % f:
                raise ValueError(f"{name} must be a multiple of {f} (the autoencoder's downsampling factor); got {value}")
        batch = len(prompts) * num_images_per_prompt
        generators, seeds = self.generators(batch, seed, generator)
        cond, cond_mask, uncond, uncond_mask = self.conditioning(prompts, negatives, num_images_per_prompt,
                                                                 guidance_scale)
        denoise = self.denoiser(cond, cond_mask, uncond, uncond_mask, guidance_scale, thresholding)
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        latents = randn(shape, generators, self.dtype, self.device)
        latents = self.run_sampler(denoise, latents, self.timesteps(num_inference_steps), sampler, eta, generators,
                                   callback)
        return PipelineOutput(self.decode(latents, output_type), seeds)

    @property
    def default_size(self) -> int:
        """The image size the model was built for: the U-Net's sample size times the autoencoder factor."""
        return self.unet.config.sample_size * self.latent_factor
