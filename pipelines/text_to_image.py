"""pipe("a prompt").images[0]"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from ldm.config import check_number
from ldm.random import Generator, randn

from .base import LatentDiffusionPipeline, PipelineOutput, check_prompts


class TextToImagePipeline(LatentDiffusionPipeline):
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
        (negative_prompt replaces the empty prompt); thresholding: None, "static", "dynamic" or a dict
        like {"kind": "dynamic", "percentile": 0.995} (applied to the latent x0 estimate); height/width default
        to the model's native size and must be multiples of the autoencoder's factor; seed: an int (image k gets
        seed + k, so a seed gives the same image at any batch size) or one int per image.
        """
        prompts = check_prompts(prompt)
        run = self.check_common(prompts, negative_prompt, num_inference_steps, guidance_scale, sampler, eta,
                                sampler_options, num_images_per_prompt, output_type)
        f = self.latent_factor
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            check_number(name, value, f, integer=True)
            if value % f:
                raise ValueError(f"{name} must be a multiple of {f} (the autoencoder's downsampling factor); "
                                 f"got {value}")
        batch = len(prompts) * num_images_per_prompt
        if output_type != "latent":
            self.check_memory(batch, height, width)
        generators, seeds = self.generators(batch, seed, generator)
        cond, cond_mask, uncond, uncond_mask = self.conditioning(prompts, run.negatives, num_images_per_prompt,
                                                                 run.guidance_scale)
        denoise = self.denoiser(cond, cond_mask, uncond, uncond_mask, run.guidance_scale, thresholding)
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        latents = randn(shape, generators, self.dtype, self.device)
        latents = self.run_sampler(denoise, latents, self.sigmas(run.num_inference_steps), run, generators, callback)
        return PipelineOutput(self.decode(latents, output_type), seeds)

    @property
    def default_size(self) -> int:
        """The image size the model was built for: the U-Net's sample size times the autoencoder factor."""
        return self.unet.config.sample_size * self.latent_factor
