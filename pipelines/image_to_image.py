"""Image-to-image (SDEdit, Meng et al. 2022): noise the encoded image to a timestep set by `strength`,
then denoise it under the prompt."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ldm.config import check_number
from ldm.diffusion import process
from ldm.random import Generator, randn

from .base import DiffusionPipeline, PipelineOutput, check_prompts

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, Sequence[Image.Image]]


def image_to_tensor(image: ImageInput, factor: int) -> torch.Tensor:
    """PIL image(s), a uint8/float array [H, W, 3] or [B, H, W, 3] (floats in [0, 1]) or a tensor [B, 3, H, W]
    in [0, 1] -> a tensor in [-1, 1]. Sizes that are not multiples of `factor` are resized down to the nearest
    multiple (PIL: Lanczos; arrays and tensors: bicubic with antialiasing)."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(im, Image.Image) for im in image):
            raise ValueError("image must be a PIL image, a list of PIL images, an array or a tensor")
        size = image[0].size
        w, h = size[0] - size[0] % factor, size[1] - size[1] % factor
        arrays = [np.asarray(im.convert("RGB").resize((w, h), Image.LANCZOS) if (w, h) != im.size else
                             im.convert("RGB"), dtype=np.float32) / 255.0 for im in image]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise ValueError("all images in the list must have the same size")
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    elif isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"an image array must be [H, W, 3] or [B, H, W, 3]; got shape {image.shape}")
        array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"an image tensor must be [3, H, W] or [B, 3, H, W]; got shape {tuple(image.shape)}")
        tensor = tensor.float()
    else:
        raise ValueError(f"image must be a PIL image, a numpy array or a torch tensor; got {type(image).__name__}")
    if tensor.min() < -1e-6 or tensor.max() > 1 + 1e-6:
        raise ValueError("image values must lie in [0, 1] (uint8 arrays are scaled from [0, 255])")
    h, w = tensor.shape[-2:]
    if h < factor or w < factor:
        raise ValueError(f"image must be at least {factor}x{factor}; got {h}x{w}")
    if h % factor or w % factor:
        tensor = torch.nn.functional.interpolate(tensor, size=(h - h % factor, w - w % factor), mode="bicubic",
                                                 antialias=True, align_corners=False).clamp(0, 1)
    return tensor * 2 - 1


def per_image(pixels: torch.Tensor, prompts: int, n: int) -> torch.Tensor:
    """One image for all prompts or one per prompt -> one row per drawn image (each prompt's n in a row)."""
    if pixels.shape[0] not in (1, prompts):
        raise ValueError(f"give one image or one per prompt ({prompts}); got {pixels.shape[0]}")
    return pixels.expand(prompts, -1, -1, -1).repeat_interleave(n, 0)


class ImageToImagePipeline(DiffusionPipeline):
    def __call__(self, prompt: Union[str, Sequence[str]], image: ImageInput, strength: float = 0.8,
                 negative_prompt: Union[None, str, Sequence[str]] = None, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, sampler: Optional[str] = None, eta: float = 0.0,
                 sampler_options: Optional[dict] = None, thresholding=None, num_images_per_prompt: int = 1,
                 seed: Union[None, int, Sequence[int]] = None, generator: Generator = None,
                 output_type: str = "pil", callback: Optional[Callable] = None) -> PipelineOutput:
        """Redraw `image` under the prompt. strength in (0, 1]: the last int(strength * steps) of the
        num_inference_steps steps of the model's grid are run (at least one, never zero), starting from the
        encoded image noised to the first of their levels; strength 1 starts from (almost) pure noise. One image
        for all prompts or one per prompt; each is repeated num_images_per_prompt times. None for sampler,
        num_inference_steps or guidance_scale is the model's own default, as for text-to-image."""
        prompts = check_prompts(prompt)
        run = self.check_common(prompts, negative_prompt, num_inference_steps, guidance_scale, sampler, eta,
                                sampler_options, num_images_per_prompt, output_type)
        check_number("strength", strength, 0, 1, low_open=True)
        num_inference_steps = run.num_inference_steps
        pixels = image_to_tensor(image, self.latent_factor).to(self.device, self.dtype)
        batch = len(prompts) * num_images_per_prompt
        self.check_memory(batch, *pixels.shape[-2:])
        pixels = per_image(pixels, len(prompts), num_images_per_prompt)
        generators, seeds = self.generators(batch, seed, generator)
        steps = max(1, min(int(num_inference_steps * strength), num_inference_steps))
        sigmas = self.sigmas(num_inference_steps)[num_inference_steps - steps:]
        z0 = self.stage.encode(pixels, generators)
        noise = randn(z0.shape, generators, z0.dtype, z0.device)
        x = process.q_sample(z0, noise, process.alpha_bar_of_sigma(sigmas[0]))
        x = self.draw(prompts, run, num_images_per_prompt, x, sigmas, thresholding, generators, callback)
        return PipelineOutput(self.decode(x, output_type), seeds)
