"""Diffusers folders with the scheduler configs people have: each loads with from_pretrained and, with
sampler=None, draws diffusers' image for the same seeds within 1e-3 on tiny random weights (test_pipelines'
SD1-style eps and SD2-style v models)."""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, UniPCMultistepScheduler)
from test_pipelines import ATOL, seeded, tiny_diffusers_parts

from pipelines import TextToImagePipeline

# Stable Diffusion 1.5's scheduler/scheduler_config.json, as published
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None}
# Stable Diffusion 2.1's (768 px, v-prediction)
SD21 = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
LEADING = dict(SD15, timestep_spacing="leading")  # what diffusers writes for SD configs since 0.19

CASES = {
    "sd15-pndm": ("sd1", lambda: PNDMScheduler.from_config(SD15), "plms"),
    "sd21-ddim": ("sd2", lambda: DDIMScheduler.from_config(SD21), "ddim"),
    "euler-karras": ("sd1", lambda: EulerDiscreteScheduler.from_config(LEADING, use_karras_sigmas=True), "euler"),
    "euler-v": ("sd2", lambda: EulerDiscreteScheduler.from_config(dict(SD21, timestep_spacing="leading")), "euler"),
    "dpm-karras": ("sd1", lambda: DPMSolverMultistepScheduler.from_config(LEADING, use_karras_sigmas=True),
                   "dpmpp_2m"),
    "dpm-sde-karras": ("sd1", lambda: DPMSolverMultistepScheduler.from_config(
        LEADING, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde"),
    "heun": ("sd1", lambda: HeunDiscreteScheduler.from_config(LEADING), "heun"),
    "lms": ("sd1", lambda: LMSDiscreteScheduler.from_config(LEADING), "lms"),
    "euler-ancestral": ("sd1", lambda: EulerAncestralDiscreteScheduler.from_config(LEADING), "euler_ancestral"),
    "unipc": ("sd1", lambda: UniPCMultistepScheduler.from_config(LEADING), "unipc"),
    "unipc-karras-v": ("sd2", lambda: UniPCMultistepScheduler.from_config(SD21, use_karras_sigmas=True), "unipc"),
}
_PARTS = {}


def diffusers_pipeline(style, scheduler):
    if style not in _PARTS:
        _PARTS[style] = tiny_diffusers_parts(style)
    parts = dict(_PARTS[style], scheduler=scheduler)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", list(CASES))
def test_a_diffusers_folder_draws_diffusers_image(case, tmp_path):
    style, scheduler, sampler = CASES[case]
    theirs = diffusers_pipeline(style, scheduler())
    theirs.save_pretrained(tmp_path)
    ours = TextToImagePipeline.from_pretrained(tmp_path)
    ours.progress = False
    assert ours.diffusion.sampler == sampler
    kwargs = dict(negative_prompt=["blurry", ""], num_inference_steps=9, guidance_scale=5.0, height=64, width=64,
                  output_type="np")
    prompts = ["a red circle above a blue square", "two green triangles"]
    expected = theirs(prompts, generator=seeded([7, 8]), **kwargs).images
    got = ours(prompts, seed=7, **kwargs).images
    assert expected.std() > 0.01
    assert np.abs(got - expected).max() < ATOL


def test_euler_linspace_starts_from_the_exact_marginal(tmp_path):
    """For linspace and trailing spacing diffusers' Euler starts from x_T of std sigma_max instead of
    sqrt(1 + sigma_max^2), the marginal's; ours starts from the marginal. Handed latents scaled by
    sqrt(1 + sigma_max^2) / sigma_max, diffusers draws our image."""
    theirs = diffusers_pipeline("sd1", EulerDiscreteScheduler.from_config(SD15))  # no spacing named: linspace
    theirs.save_pretrained(tmp_path)
    ours = TextToImagePipeline.from_pretrained(tmp_path)
    ours.progress = False
    assert ours.diffusion.spacing == "linspace_float"
    kwargs = dict(num_inference_steps=9, guidance_scale=5.0, height=64, width=64, output_type="np")
    got = ours("a pink diamond", seed=3, **kwargs).images
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    theirs.scheduler.set_timesteps(9)
    sigma_max = float(theirs.scheduler.sigmas[0])
    plain = theirs("a pink diamond", latents=latents.clone(), **kwargs).images
    fixed = theirs("a pink diamond", latents=latents * (1 + sigma_max**2) ** 0.5 / sigma_max, **kwargs).images
    assert np.abs(got - fixed).max() < ATOL
    assert np.abs(got - plain).max() > np.abs(got - fixed).max()
