"""Text-to-image and image-to-image against diffusers' Stable Diffusion pipelines on identical random
weights, checkpoint round trips in every format, seeds, and bad input.

Tiny SD1-style (eps, conv projections, CLIP quick_gelu text) and SD2-style (v-prediction, linear
projections, head-width attention, gelu text, "!" padding) models are built in diffusers with random weights,
saved as a diffusers folder, loaded by our from_pretrained, and both pipelines run with the same seeds.
Images are compared in [0, 1] at atol 1e-3 (measured: 4e-6 to 1.6e-5, listed in docs/benchmarks.md).
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.diffusion.config import DiffusionConfig
from ldm.text.tokenizers import clip_tokenizer
from pipelines import ImageToImagePipeline, TextToImagePipeline

ATOL = 1e-3


def randomize(module, seed, scale=0.1):
    """Random weights everywhere (zero-initialised output layers would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_diffusers_parts(style: str):
    sd2 = style == "sd2"
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 4, norm_num_groups=8,
        use_linear_projection=sd2, upcast_attention=sd2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32, 32, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32,
                                        pad_token_id=0 if sd2 else 49407, bos_token_id=49406, eos_token_id=49407))
    tokenizer = clip_tokenizer(pad_token="!" if sd2 else "<|endoftext|>")
    randomize(unet, 1), randomize(vae, 2, 0.05), randomize(text, 3)
    prediction = "v_prediction" if sd2 else "epsilon"
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="trailing", prediction_type=prediction)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request, tmp_path_factory):
    parts = tiny_diffusers_parts(request.param)
    theirs = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp(request.param) / "diffusers"
    theirs.save_pretrained(folder)
    ours = TextToImagePipeline.from_pretrained(folder)
    ours.progress = False
    return request.param, theirs, ours, folder


def seeded(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_text_to_image_matches_diffusers(models, sampler):
    style, theirs, ours, _ = models
    if sampler == "dpmpp_2m":
        theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config,
                                                                   algorithm_type="dpmsolver++", solver_order=2)
    else:
        theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    prompts = ["a red circle above a blue square", "two green triangles"]
    kwargs = dict(negative_prompt=["blurry", "a yellow star"], num_inference_steps=8, guidance_scale=5.0,
                  height=64, width=64, output_type="np")
    expected = theirs(prompts, generator=seeded([7, 8]), **kwargs).images
    got = ours(prompts, sampler=sampler, seed=7, **kwargs)
    assert got.seeds == [7, 8]
    assert got.images.shape == expected.shape == (2, 64, 64, 3)
    assert np.abs(got.images - expected).max() < ATOL
    assert expected.std() > 0.01  # the images are not constant: the comparison means something


def test_image_to_image_matches_diffusers(models):
    style, theirs, ours, _ = models
    img2img = StableDiffusionImg2ImgPipeline(**theirs.components)
    img2img.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    kwargs = dict(strength=0.6, num_inference_steps=10, guidance_scale=4.0, output_type="np")
    expected = img2img(["a purple star"], image=torch.from_numpy(image).permute(0, 3, 1, 2),
                       generator=seeded([3]), **kwargs).images
    ours_i2i = ImageToImagePipeline.from_pipeline(ours)
    ours_i2i.progress = False
    got = ours_i2i("a purple star", image=image, seed=3, **kwargs).images
    assert np.abs(got - expected).max() < ATOL


def test_round_trips_through_every_format(models, tmp_path):
    style, theirs, ours, _ = models
    ours.save_pretrained(tmp_path / "ldm")
    ours.save_pretrained(tmp_path / "diffusers", format="diffusers")
    reference = ours("a cyan circle", num_inference_steps=4, seed=1, output_type="np").images
    again = TextToImagePipeline.from_pretrained(tmp_path / "ldm")
    assert np.array_equal(again("a cyan circle", num_inference_steps=4, seed=1, output_type="np").images, reference)
    via_diffusers = TextToImagePipeline.from_pretrained(tmp_path / "diffusers")
    assert np.array_equal(via_diffusers("a cyan circle", num_inference_steps=4, seed=1, output_type="np").images,
                          reference)
    # diffusers itself loads what we wrote and draws the same image
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "diffusers", local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    theirs_image = reloaded("a cyan circle", num_inference_steps=4, generator=seeded([1]), output_type="np").images
    assert np.abs(theirs_image - reference).max() < ATOL


def test_a_folder_keeps_its_default_sampler(models, tmp_path):
    """A model folder names the sampler used when the caller names none (diffusers: the scheduler class), in both
    formats, and diffusers draws the same image from our diffusers folder with the scheduler it reads there."""
    _, theirs, ours, folder = models
    dpm = TextToImagePipeline(ours.unet, ours.vae, ours.text_encoder,
                              dataclasses.replace(ours.diffusion, sampler="dpmpp_2m"))
    kwargs = dict(num_inference_steps=5, guidance_scale=4.0, seed=2, output_type="np")
    explicit = ours("a cyan circle", sampler="dpmpp_2m", **kwargs).images
    assert ours.diffusion.sampler == "ddim"  # the fixture's folder was saved with diffusers' DDIMScheduler
    assert np.array_equal(ours("a cyan circle", sampler="ddim", **kwargs).images,
                          ours("a cyan circle", **kwargs).images)
    assert np.abs(ours("a cyan circle", **kwargs).images - explicit).max() > 1e-3  # the samplers differ here
    for fmt in ("ldm", "diffusers"):
        dpm.save_pretrained(tmp_path / fmt, format=fmt)
        loaded = TextToImagePipeline.from_pretrained(tmp_path / fmt)
        loaded.progress = False
        assert loaded.diffusion == dpm.diffusion
        assert np.array_equal(loaded("a cyan circle", **kwargs).images, explicit)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "diffusers", local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.scheduler) is DPMSolverMultistepScheduler
    theirs_image = reloaded("a cyan circle", num_inference_steps=5, guidance_scale=4.0, generator=seeded([2]),
                            output_type="np").images
    assert np.abs(theirs_image - explicit).max() < ATOL
    # eta belongs to DDIM: with another default sampler the error names the sampler, its options and sampler=
    with pytest.raises(ValueError, match="sampler 'dpmpp_2m' has no option 'eta'.*default sampler.*sampler="):
        dpm("a cyan circle", eta=0.5, **kwargs)


def test_diffusers_schedulers_read_as_samplers():
    """DDIM and DPM-Solver++(2M) are read from a scheduler config with their grid; a DPM-Solver set up otherwise,
    or a scheduler we have no equal of (PNDM), falls back to DDIM with a warning naming the class; an unknown
    sampler name is refused by name."""
    base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False).config
    read = lambda cls, **kw: DiffusionConfig.from_diffusers(dict(cls.from_config(base, **kw).config,
                                                                 _class_name=cls.__name__)).sampler
    assert read(DDIMScheduler) == "ddim"
    assert read(DPMSolverMultistepScheduler) == "dpmpp_2m"  # diffusers' defaults are DPM-Solver++, order 2
    with pytest.warns(UserWarning, match="DPMSolverMultistepScheduler with solver_order=3.*as configured, has no "
                                         "equal.*ddim"):
        assert read(DPMSolverMultistepScheduler, solver_order=3) == "ddim"
    with pytest.warns(UserWarning, match="PNDMScheduler"):
        assert read(PNDMScheduler) == "ddim"
    full = lambda cls, **kw: DiffusionConfig.from_diffusers(dict(cls.from_config(base, **kw).config,
                                                                 _class_name=cls.__name__))
    dpm = full(DPMSolverMultistepScheduler, final_sigmas_type="sigma_min", use_karras_sigmas=True)
    assert (dpm.sampler, dpm.final, dpm.sigma_schedule, dpm.spacing) == ("dpmpp_2m", "sigma_min", "karras", "linspace")
    ddim = full(DDIMScheduler, set_alpha_to_one=False, rescale_betas_zero_snr=True, steps_offset=1)
    assert (ddim.final, ddim.zero_terminal_snr, ddim.spacing, ddim.steps_offset) == ("sigma_min", True, "leading", 1)
    assert DiffusionConfig.from_diffusers(ddim.to_diffusers()) == ddim
    assert DiffusionConfig.from_dict({"schedule": "cosine"}).sampler == "ddim"  # folders saved before the field
    with pytest.raises(ValueError, match="sampler must be one of .*'no_such_sampler'"):
        DiffusionConfig(sampler="no_such_sampler")


def test_same_seed_same_image_at_any_batch_size(models):
    _, _, ours, _ = models
    single = ours("a pink diamond", num_inference_steps=4, seed=11, output_type="np").images
    batch = ours("a pink diamond", num_inference_steps=4, seed=11, num_images_per_prompt=3, output_type="np").images
    assert np.abs(batch[0] - single[0]).max() < 1e-4  # equal up to batched float32 round-off (measured 1e-5)
    assert np.abs(batch[1] - batch[0]).max() > 1e-3  # image k has its own seed
    ddpm = ours("a pink diamond", num_inference_steps=4, seed=[5, 11], num_images_per_prompt=2, sampler="ddpm",
                output_type="np").images
    ddpm_single = ours("a pink diamond", num_inference_steps=4, seed=[11], sampler="ddpm", output_type="np").images
    assert np.abs(ddpm[1] - ddpm_single[0]).max() < 1e-4  # per-image noise at every step, not just x_T


def test_long_prompt_with_a_chunked_encoder_and_guidance(models):
    """A prompt longer than one window beside the one-window empty prompt: both halves of the guidance batch get
    the same windows (encoded separately, the long prompt's 2 x 77 tokens could not be batched with 77). Its
    second window matters: the same prompt truncated to one window draws another image."""
    _, _, ours, _ = models
    chunked = TextToImagePipeline.from_pipeline(ours)
    chunked.text_encoder = copy.copy(ours.text_encoder)
    chunked.text_encoder.config = dataclasses.replace(ours.text_encoder.config, chunked=True)
    chunked.progress = False
    prompt = "a pink diamond " * 30 + "and a green star"  # 98 tokens: two windows
    kw = dict(num_inference_steps=2, guidance_scale=3.0, seed=0, output_type="np")
    long = chunked(prompt, **kw).images
    with pytest.warns(UserWarning, match="truncated"):
        truncated = ours(prompt, **kw).images
    assert long.shape == (1, 64, 64, 3) and np.isfinite(long).all()
    assert np.abs(long - truncated).max() > 1e-3
    again = chunked([prompt, "a star"], negative_prompt=["noise", "noise " * 90], **kw).images
    assert again.shape == (2, 64, 64, 3)


def test_outputs_progress_and_callback(models):
    _, _, ours, _ = models
    steps = []
    out = ours("an orange square", num_inference_steps=3, seed=0, callback=lambda i, t, x, p: steps.append(i))
    assert steps == [0, 1, 2]
    image = out.images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    latents = ours("an orange square", num_inference_steps=3, seed=0, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    for sampler in ("ddpm", "langevin"):
        assert np.isfinite(ours("x", num_inference_steps=3, seed=0, sampler=sampler, output_type="np").images).all()
    thresholded = ours("x", num_inference_steps=3, seed=0, thresholding="dynamic", output_type="np").images
    assert np.isfinite(thresholded).all()


def test_nan_latents_are_reported_not_drawn(models):
    _, _, ours, _ = models

    def poison(i, t, x, pred):
        x.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite latents after step 1"):
        ours("x", num_inference_steps=3, seed=0, callback=poison)


def test_the_empty_prompt_draws_unconditional_samples_as_diffusers(models):
    """"" (and whitespace, read as "") is the unconditional sample; with no negative prompt both CFG halves would
    be the same, so ours runs one U-Net half, and matches diffusers running both."""
    style, theirs, ours, _ = models
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    kwargs = dict(num_inference_steps=8, guidance_scale=7.5, height=64, width=64, output_type="np")
    expected = theirs(["", ""], generator=seeded([4, 5]), **kwargs).images
    got = ours(["", "  \n"], seed=4, sampler="ddim", **kwargs)
    assert np.abs(got.images - expected).max() < ATOL
    calls = []
    unet_forward = ours.unet.forward
    ours.unet.forward = lambda x, *a, **k: calls.append(x.shape[0]) or unet_forward(x, *a, **k)
    try:
        ours("", seed=4, sampler="ddim", **kwargs)
        ours("", negative_prompt="blurry", seed=4, sampler="ddim", **kwargs)
    finally:
        del ours.unet.forward
    assert calls == [1] * 8 + [2] * 8  # unguided; a negative prompt still guides, in one batched call


def test_defaults_come_from_the_model_folder(models, tmp_path):
    """num_inference_steps / guidance_scale None: the folder's own (diffusers folders store none: 50 and 7.5)."""
    _, _, ours, _ = models
    assert (ours.diffusion.default_steps, ours.diffusion.guidance_scale) == (50, 7.5)
    assert DiffusionConfig(num_timesteps=20).default_steps == 20  # a schedule shorter than 50: every timestep
    mine = TextToImagePipeline(ours.unet, ours.vae, ours.text_encoder,
                               dataclasses.replace(ours.diffusion, num_inference_steps=3, guidance_scale=2.0))
    mine.progress = False
    mine.save_pretrained(tmp_path / "m")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "m")
    loaded.progress = False
    steps = []
    image = loaded("a red circle", seed=0, output_type="np", callback=lambda i, t, x, p: steps.append(t)).images
    assert len(steps) == 3
    explicit = loaded("a red circle", seed=0, output_type="np", num_inference_steps=3, guidance_scale=2.0).images
    assert np.array_equal(image, explicit)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DiffusionConfig(num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        DiffusionConfig(guidance_scale=float("nan"))


@pytest.mark.parametrize("kwargs,words", [
    (dict(prompt=[]), ["prompt"]),
    (dict(prompt=["ok", 3]), ["prompt"]),
    (dict(prompt=None), ["prompt"]),
    (dict(prompt=["a", "b"], negative_prompt=["only one"]), ["negative_prompt", "2"]),
    (dict(prompt="a", height=60), ["height", "multiple of 8"]),
    (dict(prompt="a", width=0), ["width"]),
    (dict(prompt="a", guidance_scale=-1), ["guidance_scale"]),
    (dict(prompt="a", num_inference_steps=0), ["num_inference_steps"]),
    (dict(prompt="a", num_inference_steps=1001), ["num_inference_steps"]),
    (dict(prompt="a", sampler="k_euler"), ["sampler", "ddim", "euler", "dpmpp_2m_sde"]),
    (dict(prompt="a", eta=0.5, sampler="dpmpp_2m"), ["eta", "dpmpp_2m", "lower_order_final"]),
    (dict(prompt="a", sampler="ddpm", sampler_options={"variance": "wide"}), ["variance", "ddpm", "fixed_large"]),
    (dict(prompt="a", sampler_options=[1]), ["sampler_options", "dict"]),
    (dict(prompt="a", output_type="jpg"), ["output_type", "pil"]),
    (dict(prompt="a", seed="7"), ["seed"]),
    (dict(prompt="a", seed=[1, 2]), ["seed", "1 such ints"]),
    (dict(prompt="a", seed=2**70), ["seed", "2**64 - 1"]),
    (dict(prompt="a", seed=-1), ["seed", "[0, 2**64 - 1]"]),
    (dict(prompt="a", guidance_scale=float("inf")), ["guidance_scale"]),
    (dict(prompt="a", height=32768, width=32768), ["32768x32768", "GiB", "smaller"]),
    (dict(prompt="a", thresholding="soft"), ["thresholding"]),
    (dict(prompt="a", thresholding=0.9), ["thresholding"]),
    (dict(prompt="a", thresholding={"kind": "dynamic", "percentile": 2.0}), ["percentile", "(0, 1]"]),
])
def test_text_to_image_bad_input(models, kwargs, words):
    _, _, ours, _ = models
    with pytest.raises(ValueError) as info:
        ours(**{"num_inference_steps": 2, **kwargs})
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("kwargs,words", [
    (dict(strength=0.0), ["strength", "(0"]),
    (dict(strength=1.5), ["strength"]),
    (dict(image="cat.png"), ["image"]),
    (dict(image=np.zeros((64, 64, 4))), ["image", "3"]),
    (dict(image=np.full((64, 64, 3), 2.0, dtype=np.float32)), ["[0, 1]"]),
])
def test_image_to_image_bad_input(models, kwargs, words):
    _, _, ours, _ = models
    pipe = ImageToImagePipeline.from_pipeline(ours)
    args = {"prompt": "a", "image": np.zeros((64, 64, 3), dtype=np.float32), "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError) as info:
        pipe(**args)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_image_to_image_always_runs_a_step_and_resizes(models):
    _, _, ours, _ = models
    pipe = ImageToImagePipeline.from_pipeline(ours)
    steps = []
    from PIL import Image
    image = Image.fromarray((np.random.default_rng(0).uniform(0, 1, (70, 67, 3)) * 255).astype(np.uint8))
    out = pipe("a", image=image, strength=0.01, num_inference_steps=10, seed=0,
               callback=lambda i, t, x, p: steps.append(t))
    assert len(steps) == 1  # int(10 * 0.01) = 0 would be no step at all; we run the last one
    assert out.images[0].size == (64, 64)  # 67x70 resized down to multiples of 8
