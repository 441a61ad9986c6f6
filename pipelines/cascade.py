"""Cascaded diffusion (Ho et al. 2021; Imagen, Saharia et al. 2022; DeepFloyd IF): a base text-to-image stage
followed by super-resolution stages, each conditioned on the stage before's output through noise-conditioning
augmentation, non-truncated (the stage before runs to 0, its output is corrupted with q(z_s | z_0)) or truncated
(the stage before stops at the noise level of s and its sample is fed as it is)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ldm import checkpoints
from ldm.device import check_device, check_dtype
from ldm.diffusion.augmentation import check_mode
from ldm.random import Generator
from ldm.sampling.transforms import check_thresholding
from ldm.stage import PipelineParts

from .base import PipelineOutput, check_prompts
from .super_resolution import SuperResolutionPipeline
from .text_to_image import TextToImagePipeline


def per_stage(name: str, value, count: int) -> list:
    """One value for every stage, or a list or tuple of one per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} is a list of {len(value)}; give one value or one per stage ({count})")
        return list(value)
    return [value] * count


class CascadePipeline:
    """base: the text-to-image stage; stages: the super-resolution stages, in order."""

    def __init__(self, base: TextToImagePipeline, stages: Sequence[SuperResolutionPipeline]):
        if not stages:
            raise ValueError("a cascade needs at least one super-resolution stage after its base")
        for i, sr in enumerate(stages):
            if sr.stage.low_res is None:
                raise ValueError(f"stage {i + 1} is not a super-resolution model (it has no 'low_res' settings)")
        self.base, self.stages = base, list(stages)

    @property
    def pipelines(self) -> list:
        return [self.base] + self.stages

    @property
    def progress(self) -> bool:
        return self.base.progress

    @progress.setter
    def progress(self, value: bool) -> None:
        for pipe in self.pipelines:
            pipe.progress = value

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], *, dtype: torch.dtype = torch.float32,
                        device: Union[str, torch.device] = "cpu") -> "CascadePipeline":
        """A folder in this project's format with two or more stages (or a shipped cascade's name)."""
        check_device(device)
        check_dtype(dtype)
        parts = checkpoints.load_pipeline(path)
        if len(parts.stages) < 2:
            raise ValueError(f"{path} holds one stage; load it with TextToImagePipeline")
        base = TextToImagePipeline.from_stage(parts.text_encoder, parts.stages[0])
        stages = [SuperResolutionPipeline.from_stage(parts.text_encoder, s) for s in parts.stages[1:]]
        return cls(base, stages).to(device, dtype)

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Every stage in one folder (this project's format; networks the stages share are written once)."""
        encoders = {id(p.text_encoder) for p in self.pipelines}
        if len(encoders) > 1:
            raise ValueError("the folder format holds one text encoder; these stages have different ones")
        return checkpoints.save_pipeline(PipelineParts(self.base.text_encoder, [p.stage for p in self.pipelines]),
                                         folder)

    def to(self, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None):
        for pipe in self.pipelines:
            pipe.to(device, dtype)
        return self

    def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt: Union[None, str, Sequence[str]] = None,
                 num_inference_steps=None, guidance_scale=None, sampler=None, sampler_options=None,
                 thresholding=None, noise_level=None, augmentation="non_truncated", height: Optional[int] = None,
                 width: Optional[int] = None, num_images_per_prompt: int = 1,
                 seed: Union[None, int, Sequence[int]] = None, generator: Generator = None,
                 output_type: str = "pil", callback: Optional[Callable] = None) -> PipelineOutput:
        """Draw through every stage. num_inference_steps, guidance_scale, sampler, sampler_options and
        thresholding: one value for all stages or a list with one per stage (None: each model's own);
        noise_level and augmentation ("non_truncated" or "truncated"): one value or one per super-resolution
        stage. height/width: the base's (its native size by default). callback(stage, i, sigma, x, prediction).
        Returns the last stage's images; `stage_images` holds every stage's, in output_type."""
        prompts = check_prompts(prompt)
        count = len(self.pipelines)
        steps, guidance, samplers, options, thresholds = (
            per_stage(name, value, count) for name, value in (
                ("num_inference_steps", num_inference_steps), ("guidance_scale", guidance_scale),
                ("sampler", sampler), ("sampler_options", sampler_options), ("thresholding", thresholding)))
        levels = [None if lv is None else sr.low_res.check_level(lv, "noise_level")
                  for sr, lv in zip(self.stages, per_stage("noise_level", noise_level, len(self.stages)))]
        levels = [sr.low_res.noise_level if lv is None else lv for sr, lv in zip(self.stages, levels)]
        modes = [check_mode(m) for m in per_stage("augmentation", augmentation, len(self.stages))]
        for i, (mode, before, sr) in enumerate(zip(modes, self.pipelines, self.stages)):
            if mode == "truncated" and before.vae is not None:
                raise ValueError(f"truncated augmentation feeds stage {i + 1} the sample of stage {i} at a noise "
                                 f"level, which needs stage {i} to sample pixels; it samples latents")
            if mode == "truncated" and sr.low_res.noise_at == "high":
                raise ValueError(f"stage {i + 1} noises its input after upsampling it (noise_at='high', as IF's "
                                 "stage II), so a truncated sample's noise would reach it upsampled, not as it was "
                                 "trained; use augmentation='non_truncated'")
        for t in thresholds:
            check_thresholding(t)  # before any stage runs
        runs = [pipe.check_common(prompts, negative_prompt, steps[i], guidance[i], samplers[i], 0.0, options[i],
                                  num_images_per_prompt, output_type) for i, pipe in enumerate(self.pipelines)]
        height = self.base.default_size if height is None else height
        width = self.base.default_size if width is None else width
        self.base.check_size(height, width)
        n = num_images_per_prompt
        generators, seeds = self.base.generators(len(prompts) * n, seed, generator)
        stops = [sr.low_res.sigma_of(lv) if mode == "truncated" else 0.0
                 for sr, lv, mode in zip(self.stages, levels, modes)] + [0.0]

        def stage_callback(k):
            return None if callback is None else (lambda i, sigma, x, pred: callback(k, i, sigma, x, pred))

        x = self.base.generate(prompts, runs[0], n, height, width, thresholds[0], generators, stage_callback(0),
                               stops[0])
        outputs = [x]
        for k, sr in enumerate(self.stages):
            before = self.pipelines[k]
            low = x if modes[k] == "truncated" else before.stage.decode(x).to(sr.dtype)
            x = sr.upscale(prompts, runs[k + 1], n, low.to(sr.device), levels[k], modes[k] == "truncated",
                           thresholds[k + 1], generators, stage_callback(k + 1), stops[k + 1])
            outputs.append(x)
        images = [pipe.decode(out, output_type) for pipe, out in zip(self.pipelines, outputs)]
        return PipelineOutput(images[-1], seeds, images)
