"""What every latent-diffusion pipeline shares: components, loading/saving, prompt encoding, the guided
denoiser, seeded noise, the sampling loop with progress and NaN checks, and decoding to images."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ldm import checkpoints
from ldm.conditioning import Conditioning
from ldm.config import check_number, is_int
from ldm.device import check_device, check_dtype
from ldm.diffusion.augmentation import LowResConditioning
from ldm.diffusion.config import DiffusionConfig
from ldm.random import Generator
from ldm.sampling import get_sampler
from ldm.stage import PipelineParts, Stage

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class Settings:
    """What check_common resolved: negative prompts (or None), sampler and its checked options (defaults filled
    in), steps and guidance scale."""
    negatives: Optional[list[str]]
    sampler: str
    num_inference_steps: int
    guidance_scale: float
    sampler_options: dict


@dataclass
class PipelineOutput:
    """images: a list of PIL images ("pil"), a float array [B, H, W, 3] in [0, 1] ("np"), a tensor
    [B, 3, H, W] in [0, 1] ("pt"), or latents [B, C, h, w] ("latent"). seeds: the seed of each image, if seeded.
    stage_images: a cascade's output of every stage, base first (a truncated stage's is its noisy sample)."""
    images: Any
    seeds: Optional[list[int]] = None
    stage_images: Optional[list] = None


def check_prompts(prompt: Union[str, Sequence[str]], name: str = "prompt") -> list[str]:
    """A string or a non-empty list of strings. The empty prompt (or one of only whitespace, read as empty) asks
    for an unconditional sample, as in diffusers: models are trained with captions dropped to the empty one."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name} must be a string or a non-empty list of strings; got {prompt!r}")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"{name} must contain only strings; got {p!r}")
    return [p if p.strip() else "" for p in prompts]


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes (negative seeds aside)


def _memory_available(device: torch.device) -> Optional[int]:
    """Bytes the device can hold at most (a GPU's total memory, the machine's RAM), None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
            return None
    return None


class DiffusionPipeline:
    """A text encoder and one stage (a network, how it samples and, for a latent model, its autoencoder; see
    ldm.stage): what text-to-image, image-to-image and super-resolution share. `unet`, `vae` (None for a
    pixel-space model), `diffusion` and `schedule` are the stage's."""

    def __init__(self, unet, vae, text_encoder, diffusion: DiffusionConfig,
                 low_res: Optional[LowResConditioning] = None):
        self.stage = Stage(unet, diffusion, vae, low_res)
        self.text_encoder = text_encoder
        self.progress = True
        self._lora_originals: dict[str, torch.Tensor] = {}  # weights from before load_lora, for unload_lora

    unet = property(lambda self: self.stage.unet, lambda self, v: setattr(self.stage, "unet", v))
    vae = property(lambda self: self.stage.vae, lambda self, v: setattr(self.stage, "vae", v))
    diffusion = property(lambda self: self.stage.diffusion, lambda self, v: setattr(self.stage, "diffusion", v))
    schedule = property(lambda self: self.stage.schedule)

    # ---- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Optional[Union[str, Path]] = None, *, prediction_type: Optional[str] = None,
                        allow_pickle: bool = False, dtype: torch.dtype = torch.float32,
                        device: Union[str, torch.device] = "cpu"):
        """Load our folder format, a diffusers folder (model_index.json) or an original single-file SD
        checkpoint (.safetensors; .ckpt only with allow_pickle=True). None loads the shipped default model.
        device: "cpu", "cuda", "mps"; dtype: torch.float32, bfloat16 or float16."""
        check_device(device)  # both before reading gigabytes of weights
        check_dtype(dtype)
        parts = checkpoints.load_pipeline(path, prediction_type=prediction_type, allow_pickle=allow_pickle)
        if len(parts.stages) != 1:
            raise ValueError(f"{path} holds a cascade of {len(parts.stages)} stages; load it with "
                             "pipelines.CascadePipeline")
        return cls.from_stage(parts.text_encoder, parts.stages[0]).to(device, dtype)

    @classmethod
    def from_stage(cls, text_encoder, stage: Stage):
        return cls(stage.unet, stage.vae, text_encoder, stage.diffusion, stage.low_res)

    def save_pretrained(self, folder: Union[str, Path], format: str = "ldm") -> Path:
        """Write the pipeline as our folder format ("ldm") or as a diffusers folder ("diffusers"), atomically."""
        return checkpoints.save_pipeline(PipelineParts(self.text_encoder, [self.stage]), folder, format)

    @classmethod
    def from_pipeline(cls, other: "DiffusionPipeline"):
        """The same components behind another pipeline class (text-to-image <-> image-to-image)."""
        return cls.from_stage(other.text_encoder, other.stage)

    def load_lora(self, path: Union[str, Path], scale: float = 1.0) -> None:
        """Merge a LoRA file (ours, diffusers/peft or kohya names) into the U-Net: W <- W + scale * (alpha / r) B A.
        Loads stack; unload_lora() restores the weights from before the first, exactly."""
        from ldm.train.lora import merge_lora  # peft is imported only by those who use LoRA
        originals = merge_lora(self.unet, path, scale)
        for name, weight in originals.items():
            self._lora_originals.setdefault(name, weight)  # the weight from before the first LoRA that touched it

    def unload_lora(self) -> None:
        """Undo every load_lora since the last unload (a no-op if none)."""
        from ldm.train.lora import restore_weights
        restore_weights(self.unet, self._lora_originals)
        self._lora_originals = {}

    def modules(self) -> list[torch.nn.Module]:
        return self.stage.modules() + [self.text_encoder]

    def to(self, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None):
        """Move every network to `device` ("cpu", "cuda", "cuda:1", "mps", ...) and optionally cast to `dtype`
        (torch.float32, bfloat16 or float16)."""
        device = check_device(device)
        if dtype is not None:
            check_dtype(dtype)
        for module in self.modules():
            module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
            module.eval()
        # oneDNN runs reduced-precision convolutions much faster on channels-last tensors (the SD U-Net in bf16:
        # 2.3x on an AVX2 CPU, identical output); in float32 plain NCHW was faster there, so the layout follows.
        reduced = self.dtype in (torch.bfloat16, torch.float16)
        layout = torch.channels_last if reduced and self.device.type == "cpu" else torch.contiguous_format
        for module in self.stage.modules():
            module.to(memory_format=layout)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        """Pixels per position of the sampled array (the autoencoder's factor; 1 for a pixel-space model)."""
        return self.stage.factor

    @property
    def default_size(self) -> int:
        """The image size the model was built for: the U-Net's sample size times the autoencoder factor."""
        return self.stage.native_size

    # ---- pieces of a call ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]):
        with torch.no_grad():
            enc = self.text_encoder.encode(prompts)
        return enc.embeddings.to(self.device, self.dtype), enc.mask.to(self.device)

    def generators(self, batch: int, seed, generator: Generator) -> tuple[Generator, Optional[list[int]]]:
        """One generator per image: seed s gives image k the seed s + k, so image k is the same at any batch size."""
        if generator is not None and seed is not None:
            raise ValueError("pass seed or generator, not both")
        if generator is not None:
            if isinstance(generator, (list, tuple)) and len(generator) != batch:
                raise ValueError(f"generator is a list of {len(generator)}; the batch has {batch} images")
            return generator, None
        if seed is None:
            return None, None
        low, high = SEED_RANGE
        seeds = [seed + k for k in range(batch)] if is_int(seed) else seed
        if not isinstance(seeds, (list, tuple)) or len(seeds) != batch or \
                not all(is_int(s) and low <= s <= high for s in seeds):
            raise ValueError(f"seed must be an int in [0, 2**64 - 1] (image k gets seed + k) or a list of {batch} "
                             f"such ints, one per image; got {seed!r}")
        # CPU generators whatever the device: noise is drawn on the CPU and moved (ldm.random), so a seed gives the
        # same noise on every device
        return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds], [int(s) for s in seeds]

    def draw(self, prompts: list[str], run: Settings, n: int, x: torch.Tensor, sigmas: torch.Tensor, thresholding,
             generator: Generator, callback: Optional[Callable],
             extra: Optional[Conditioning] = None) -> torch.Tensor:
        """The call every pipeline makes: condition the stage on the prompts (n images each; `extra` inputs, such
        as a low-resolution image, go to both halves of classifier-free guidance) and walk `sigmas` from x."""
        cond, uncond = self.conditioning(prompts, run.negatives, n, run.guidance_scale)
        if extra is not None:
            cond = cond.replace(**extra)
            uncond = None if uncond is None else uncond.replace(**extra)
        denoise = self.stage.denoiser(cond, uncond, run.guidance_scale, thresholding)
        return self.stage.sample(denoise, x, sigmas, run.sampler, run.sampler_options, generator, callback,
                                 self.progress)

    def decode(self, x: torch.Tensor, output_type: str):
        """The sampled array as `output_type`: "latent" (as sampled), "pt", "np" or "pil" images in [0, 1]."""
        if output_type == "latent":
            return x
        images = (self.stage.decode(x) / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    def check_common(self, prompts: list[str], negative_prompt, num_inference_steps, guidance_scale, sampler, eta,
                     sampler_options, num_images_per_prompt, output_type) -> Settings:
        """Validate the arguments every pipeline takes. None for sampler, num_inference_steps or guidance_scale is
        the model's own default, stored in its folder (`diffusion` in ldm_pipeline.json). eta (diffusers' name)
        is sampler_options["eta"], an option of ddim only."""
        steps = self.diffusion.default_steps if num_inference_steps is None else num_inference_steps
        guidance = self.diffusion.guidance_scale if guidance_scale is None else guidance_scale
        check_number("num_inference_steps", steps, 1, self.schedule.num_timesteps, integer=True)
        check_number("guidance_scale", guidance, 0)
        check_number("eta", eta, 0)
        check_number("num_images_per_prompt", num_images_per_prompt, 1, integer=True)
        default = sampler is None
        sampler = self.diffusion.sampler if default else sampler
        spec = get_sampler(sampler)
        if sampler_options is not None and not isinstance(sampler_options, dict):
            raise ValueError(f"sampler_options must be a dict of the sampler's options; got {sampler_options!r}")
        options = dict(sampler_options or {})
        if eta:
            if "eta" in options and options["eta"] != eta:
                raise ValueError(f"eta={eta} and sampler_options['eta']={options['eta']} disagree; pass one")
            options["eta"] = eta
        try:
            options = spec.check_options(options)
        except ValueError as err:
            hint = " (the model's default sampler; name one with sampler=..., or --sampler)" if default else ""
            raise ValueError(f"{err}{hint}") from None
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        if negative_prompt is None:
            return Settings(None, sampler, steps, guidance, options)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negatives, (list, tuple)) or len(negatives) != len(prompts) or \
                not all(isinstance(n, str) for n in negatives):
            raise ValueError(f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt); "
                             f"got {negative_prompt!r}")
        return Settings(list(negatives), sampler, steps, guidance, options)

    def check_memory(self, batch: int, height: int, width: int) -> None:
        """Refuse, before anything is allocated, a request whose decoding alone cannot fit in the device's memory:
        the autoencoder's full-resolution activations (its first level's width x H x W, an input and an output
        of a convolution, per image) are a lower bound of what decoding needs."""
        available = _memory_available(self.device)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        net = self.vae.config if self.vae is not None else None  # a pixel-space U-Net's first level instead
        width_ = net.ch * net.ch_mult[0] if net else self.unet.config.model_channels * self.unet.config.channel_mult[0]
        needed = 2 * batch * width_ * height * width * itemsize
        if available is not None and needed > available:
            raise ValueError(f"{batch} image(s) of {height}x{width} need at least {needed / 2**30:.0f} GiB to decode "
                             f"(the full-resolution activations in {str(self.dtype).split('.')[-1]}); "
                             f"this {self.device.type} device has {available / 2**30:.0f} GiB. Ask for a smaller "
                             "height/width or fewer images")

    def conditioning(self, prompts: list[str], negatives: Optional[list[str]], n: int,
                     guidance_scale: float) -> tuple[Conditioning, Optional[Conditioning]]:
        """(cond, uncond) for B = len(prompts) * n images: the text encoder's tokens as `context` (and
        `context_mask` where the U-Net was trained with padding masked out); uncond is None without CFG
        (guidance_scale <= 1, as diffusers decides; a negative prompt is then not used)."""
        k = len(prompts)
        # unconditional samples (every prompt empty, no negative): both halves would be the same, so skip CFG
        guided = guidance_scale > 1.0 and not (negatives is None and not any(prompts))
        # Both halves in one text-encoder call: one network pass instead of two, and with a chunked encoder both
        # get the same number of windows (encoded apart, a long prompt beside a short negative could not be batched).
        embeddings, masks = self.encode_prompts(prompts + ((negatives or [""]) if guided else []))
        # Stable Diffusion attends to padding tokens; where nothing is masked SDPA keeps its fast path
        masked = self.unet.config.mask_context and not bool(masks.all())
        text = Conditioning({"context": embeddings, "context_mask": masks if masked else None})
        cond = Conditioning({k_: v if v is None else v[:k] for k_, v in text.items()}).repeat_interleave(n)
        if not guided:
            return cond, None
        uncond = Conditioning({k_: v if v is None else v[k:] for k_, v in text.items()})
        if negatives is None:  # the empty prompt, encoded once
            uncond = uncond.expand(k)
        return cond, uncond.repeat_interleave(n)

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The model's inference grid (its folder's spacing, sigma schedule and final level): num_inference_steps
        noise levels, then the one sampling ends at."""
        return self.stage.sigmas(num_inference_steps)
