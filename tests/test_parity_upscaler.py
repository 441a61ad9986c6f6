"""The Stable Diffusion x4 upscaler: a diffusers StableDiffusionUpscalePipeline folder (tiny random weights in its
layout: the low-resolution image concatenated to the latents, its noise level as one of 1000 class embeddings,
cross-attention in place of self-attention on the first level, VAE scaling 0.08333, a DDPM low_res_scheduler)
loads with SuperResolutionPipeline.from_pretrained and draws what diffusers draws from the same seed, within 1e-3
in [0, 1]."""
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
                       StableDiffusionUpscalePipeline, UNet2DConditionModel)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.text.tokenizers import clip_tokenizer
from pipelines import SuperResolutionPipeline

from test_pipelines import ATOL, randomize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), only_cross_attention=[True, False],
        num_class_embeds=1000, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.08333)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                                        projection_dim=32, pad_token_id=0, bos_token_id=49406, eos_token_id=49407))
    randomize(unet, 1), randomize(vae, 2, 0.05), randomize(text, 3)
    theirs = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text, tokenizer=clip_tokenizer(pad_token="!"), unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"),
        max_noise_level=350)
    theirs.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("x4") / "upscaler"
    theirs.save_pretrained(folder)
    ours = SuperResolutionPipeline.from_pretrained(folder)
    ours.progress = False
    return theirs, ours, folder


def low_res_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("noise_level, guidance", [(20, 9.0), (150, 1.0)])
def test_the_x4_upscaler_draws_diffusers_image(upscaler, noise_level, guidance):
    theirs, ours, _ = upscaler
    image = low_res_image()
    kwargs = dict(num_inference_steps=4, guidance_scale=guidance, noise_level=noise_level, output_type="np")
    expected = theirs("a red circle", image=image, generator=torch.Generator().manual_seed(3), **kwargs).images
    got = ours("a red circle", image, seed=3, **kwargs).images
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert np.abs(got - expected).max() < ATOL  # measured 1.9e-5 / 2.3e-6


def test_the_upscaler_folder_keeps_diffusers_defaults_and_limits(upscaler, tmp_path):
    _, ours, folder = upscaler
    assert ours.diffusion.default_steps == 75 and ours.diffusion.guidance_scale == 9.0
    assert ours.low_res.noise_level == 20 and ours.low_res.max_noise_level == 350 and ours.low_res.scale == 4
    with pytest.raises(ValueError, match=r"noise_level must be an int in \[0, 350\]"):
        ours("a", low_res_image(), noise_level=351)
    ours.save_pretrained(tmp_path / "ours")  # our format holds it, and draws the same
    again = SuperResolutionPipeline.from_pretrained(tmp_path / "ours")
    again.progress = False
    kwargs = dict(num_inference_steps=2, seed=1, output_type="np")
    assert np.array_equal(again("a", low_res_image(), **kwargs).images, ours("a", low_res_image(), **kwargs).images)


def test_a_karras_scheduler_upscales_too(upscaler):
    theirs, ours, _ = upscaler
    euler = EulerDiscreteScheduler.from_config(theirs.scheduler.config, use_karras_sigmas=True)
    k = StableDiffusionUpscalePipeline(**{**theirs.components, "scheduler": euler}, max_noise_level=350)
    k.set_progress_bar_config(disable=True)
    expected = k("a red circle", image=low_res_image(), num_inference_steps=4,
                 generator=torch.Generator().manual_seed(5), output_type="np").images
    diffusion = ours.diffusion.from_diffusers(dict(euler.config))
    diffusion = type(diffusion).from_dict({**diffusion.to_dict(), "guidance_scale": 9.0})
    karras = SuperResolutionPipeline.from_stage(ours.text_encoder, ours.stage.replace(diffusion=diffusion))
    karras.progress = False
    got = karras("a red circle", low_res_image(), num_inference_steps=4, seed=5, output_type="np").images
    assert np.abs(got - expected).max() < ATOL
