"""diffusers folders (model_index.json + one subfolder per component), loaded and written: Stable Diffusion
1.x/2.x (StableDiffusionPipeline); loaded: the x4 upscaler (StableDiffusionUpscalePipeline) and DeepFloyd IF's
stages I and II (IFPipeline, IFSuperResolutionPipeline)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import checkpoints
from .checkpoints import PathLike, _model, load_component_weights, read_json, write_json
from .diffusion.augmentation import LowResConditioning
from .diffusion.config import DiffusionConfig
from .nn.autoencoder import Autoencoder
from .nn.autoencoder_keys import (autoencoder_state_dict_from_diffusers, autoencoder_state_dict_to_diffusers,
                                  diffusers_config_from_ours)
from .nn.autoencoder_keys import config_from_diffusers as vae_config_from_diffusers
from .nn.unet import UNetModel
from .nn.unet_diffusers import config_from_diffusers, config_to_diffusers, state_dict_from_diffusers, \
    state_dict_to_diffusers
from .stage import PipelineParts, Stage


def _diffusers_weights(component: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    return load_component_weights(component, ("diffusion_pytorch_model", "model"), allow_pickle)


# the diffusers pipelines whose folders hold one U-Net + KL VAE + CLIP text encoder (None: no _class_name)
DIFFUSERS_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", None)
UPSCALER = "StableDiffusionUpscalePipeline"
IF_STAGES = ("IFPipeline", "IFSuperResolutionPipeline")
# diffusers' __call__ defaults where a folder stores none: (steps, guidance)
_CALL_DEFAULTS = {UPSCALER: (75, 9.0), "IFPipeline": (100, 7.0), "IFSuperResolutionPipeline": (50, 4.0)}


def load_diffusers_folder(folder: PathLike, allow_pickle: bool = False) -> PipelineParts:
    """A diffusers StableDiffusionPipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), or a
    StableDiffusionUpscalePipeline one (the same and low_res_scheduler/): a super-resolution stage whose U-Net
    takes the low-resolution image concatenated to the latents and its noise level as class label."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    name = index.get("_class_name")
    if name in IF_STAGES:
        return _load_if_folder(folder, name, allow_pickle)
    if (name not in DIFFUSERS_PIPELINES and name != UPSCALER) or "text_encoder_2" in index:
        raise ValueError(f"{folder / 'model_index.json'} describes a {name}; this package loads Stable Diffusion "
                         f"1.x/2.x folders ({', '.join(p for p in DIFFUSERS_PIPELINES if p)}), {UPSCALER} and "
                         f"DeepFloyd IF's {' and '.join(IF_STAGES)} so far")
    vae_config = vae_config_from_diffusers(read_json(folder / "vae" / "config.json"))
    vae = _model(Autoencoder, vae_config,
                 autoencoder_state_dict_from_diffusers(_diffusers_weights(folder / "vae", allow_pickle), vae_config),
                 f"{folder}/vae")
    raw = read_json(folder / "unet" / "config.json")
    if name == UPSCALER:
        unet_config = config_from_diffusers(raw, class_labels="noise_level",
                                            concat_channels=raw.get("in_channels", 7) - vae_config.latent_channels)
    else:
        unet_config = config_from_diffusers(raw)
    unet = _model(UNetModel, unet_config,
                  state_dict_from_diffusers(_diffusers_weights(folder / "unet", allow_pickle), unet_config),
                  f"{folder}/unet")
    from .text.clip import CLIPTextEncoder

    text_encoder = CLIPTextEncoder.from_pretrained(folder, allow_pickle=allow_pickle)
    diffusion = DiffusionConfig.from_diffusers(read_json(folder / "scheduler" / "scheduler_config.json"))
    low_res = None
    if name == UPSCALER:  # and noise_level 20
        diffusion = _with_call_defaults(diffusion, name)
        low_res = low_res_from_diffusers(read_json(folder / "low_res_scheduler" / "scheduler_config.json"),
                                         index.get("max_noise_level", 350), vae_config.downsample_factor)
    return PipelineParts(text_encoder, [Stage(unet, diffusion, vae, low_res)])


def _with_call_defaults(diffusion: DiffusionConfig, name: str) -> DiffusionConfig:
    steps, guidance = _CALL_DEFAULTS[name]
    return DiffusionConfig.from_dict({**diffusion.to_dict(), "num_inference_steps": steps, "guidance_scale": guidance})


def _load_if_folder(folder: Path, name: str, allow_pickle: bool) -> PipelineParts:
    """DeepFloyd IF stage I (text -> 64 px) or stage II (text + image -> 4x larger, the image upsampled bilinearly
    and then noised at noise_level of its image_noising_scheduler): a pixel-space stage on a T5 encoder, with
    learned-range variance and the scheduler's dynamic thresholding."""
    from .text.t5 import T5TextEncoder

    raw = read_json(folder / "unet" / "config.json")
    stage2 = name == "IFSuperResolutionPipeline"
    config = config_from_diffusers(raw, class_labels="noise_level" if stage2 else "classes",
                                   concat_channels=raw.get("in_channels", 6) // 2 if stage2 else 0)
    unet = _model(UNetModel, config, state_dict_from_diffusers(_diffusers_weights(folder / "unet", allow_pickle),
                                                               config), f"{folder}/unet")
    diffusion = _with_call_defaults(
        DiffusionConfig.from_diffusers(read_json(folder / "scheduler" / "scheduler_config.json")), name)
    low_res = None
    if stage2:  # IF's defaults: noise_level 250, x4 (64 -> 256), any level of the noising schedule
        noising = read_json(folder / "image_noising_scheduler" / "scheduler_config.json")
        steps = noising.get("num_train_timesteps", 1000)
        low_res = dataclasses.replace(low_res_from_diffusers(noising, steps - 1, 4), noise_level=250,
                                      upsample="bilinear", align_corners=True, noise_at="high")
    return PipelineParts(T5TextEncoder.from_diffusers(folder, allow_pickle=allow_pickle),
                         [Stage(unet, diffusion, None, low_res)])


def low_res_from_diffusers(scheduler: dict, max_noise_level: int, scale: int) -> LowResConditioning:
    """The upscaler's augmentation: its low_res_scheduler's betas (add_noise at noise_level), levels up to
    max_noise_level, the image concatenated at the latents' size (scale = the autoencoder's factor)."""
    return LowResConditioning(scale=scale, schedule=scheduler.get("beta_schedule", "linear"),
                              num_timesteps=scheduler.get("num_train_timesteps", 1000),
                              beta_start=scheduler.get("beta_start", 0.0001), beta_end=scheduler.get("beta_end", 0.02),
                              noise_level=20, max_noise_level=max_noise_level)


def _save_component(config: dict, state_dict, folder: Path, weights_name: str) -> None:
    folder.mkdir()
    write_json(config, folder / "config.json")
    checkpoints.save_state_dict(state_dict, folder / weights_name, metadata={"format": "pt"})


def save_diffusers_folder(parts: PipelineParts, folder: Path) -> None:
    """Write a one-stage latent pipeline as a diffusers StableDiffusionPipeline folder."""
    unet, vae, text_encoder, diffusion = parts.unet, parts.vae, parts.text_encoder, parts.diffusion
    import diffusers

    from .text.clip import CLIPTextEncoder

    if not isinstance(text_encoder, CLIPTextEncoder) or vae is None or vae.config.kind != "kl":
        raise ValueError("the diffusers StableDiffusionPipeline layout needs a CLIP text encoder and a KL autoencoder")
    scheduler = diffusion.to_diffusers()
    write_json({"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", scheduler["_class_name"]], "safety_checker": [None, None],
                "feature_extractor": [None, None], "image_encoder": [None, None],
                "requires_safety_checker": False}, folder / "model_index.json")
    _save_component(config_to_diffusers(unet.config), state_dict_to_diffusers(unet.state_dict(), unet.config),
                    folder / "unet", "diffusion_pytorch_model.safetensors")
    _save_component({"_class_name": "AutoencoderKL", **diffusers_config_from_ours(vae.config)},
                    autoencoder_state_dict_to_diffusers(vae.state_dict(), vae.config), folder / "vae",
                    "diffusion_pytorch_model.safetensors")
    text_encoder.save_pretrained(folder)  # text_encoder/ and tokenizer/ in diffusers' layout
    (folder / "scheduler").mkdir()
    write_json(scheduler, folder / "scheduler" / "scheduler_config.json")


