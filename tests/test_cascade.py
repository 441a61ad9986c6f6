"""Super-resolution and cascades: the U-Net's concatenated image and noise-level embedding, noise-conditioning
augmentation (q(z_s | z_0) at the level the network is told; Gaussian blur against scipy), SuperResolutionPipeline
and CascadePipeline with non-truncated and truncated augmentation, their folders, seeds and bad input."""
import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from ldm.diffusion import process
from ldm.diffusion.augmentation import LowResConditioning, gaussian_blur
from ldm.diffusion.config import DiffusionConfig
from ldm.diffusion.grids import stop_at
from ldm.nn.unet import UNetConfig, UNetModel
from pipelines import CascadePipeline, SuperResolutionPipeline, TextToImagePipeline

from test_checkpoints import randomize
from test_stages import pixel_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def sr_unet(noise_level_embed="timestep", **overrides) -> UNetModel:
    config = UNetConfig(**{**dict(in_channels=6, out_channels=3, concat_channels=3, model_channels=32,
                                  channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2,
                                  context_dim=64, sample_size=32, noise_level_embed=noise_level_embed), **overrides})
    return randomize(UNetModel(config), 6)


@pytest.mark.parametrize("embed", ["timestep", "table"])
def test_the_unet_takes_an_image_and_its_noise_level(embed):
    unet = sr_unet(embed)
    x, low, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 4, 64)
    t = torch.tensor([10.0, 500.0])
    out = unet(x, t, context=ctx, concat=low, noise_level=torch.tensor([0, 300]))
    assert out.shape == (2, 3, 16, 16)
    other = unet(x, t, context=ctx, concat=low, noise_level=torch.tensor([0, 301]))
    assert torch.equal(out[0], other[0]) and not torch.equal(out[1], other[1])  # the level reaches its row only
    assert not torch.equal(out, unet(x, t, context=ctx, concat=-low, noise_level=torch.tensor([0, 300])))
    with pytest.raises(ValueError, match="concat"):
        unet(x, t, context=ctx, noise_level=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"concat must have shape \[B, 3, 16, 16\]"):
        unet(x, t, context=ctx, concat=low[..., :8], noise_level=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise_level"):
        unet(x, t, context=ctx, concat=low)
    with pytest.raises(ValueError, match="noise_level_embed"):
        UNetConfig(noise_level_embed="sinusoid")


def test_noise_augmentation_is_q_sample_at_its_level():
    aug = LowResConditioning(schedule="linear", noise_level=250)
    z0 = torch.full((4000, 1, 2, 2), 0.5)
    levels = torch.full((4000,), 250)
    z = aug.noise(z0, levels, torch.Generator().manual_seed(0))
    alpha_bar = float(aug.build_schedule().alpha_bar_at(torch.tensor([250]))[0])
    assert abs(float(z.mean()) - 0.5 * alpha_bar**0.5) < 0.01
    assert abs(float(z.std()) - (1 - alpha_bar) ** 0.5) < 0.01
    # the level a truncated stage stops at is the same alpha_bar on the noise-level axis
    sigma = torch.tensor(aug.sigma_of(250), dtype=torch.float64)
    assert float(process.alpha_bar_of_sigma(sigma)) == pytest.approx(alpha_bar, rel=1e-12)
    assert aug.sigma_of(0) == 0.0
    drawn = aug.sample_levels(10000, torch.Generator().manual_seed(1))
    assert int(drawn.min()) == 0 and int(drawn.max()) == 999
    with pytest.raises(ValueError, match="noise_level"):
        LowResConditioning(noise_level=1000)
    with pytest.raises(ValueError, match="upsample"):
        LowResConditioning(upsample="lanczos")


def test_the_input_is_noised_at_low_or_high_resolution():
    """noise_at "low" (Ho et al., the x4 upscaler) corrupts, then upsamples; "high" (DeepFloyd IF) upsamples (IF:
    bilinear with corners aligned), then corrupts; with noised=True the input is only upsampled."""
    low = torch.rand(2, 3, 4, 4) * 2 - 1
    levels = torch.tensor([100, 400])
    for at, corners in (("low", False), ("high", True)):
        aug = LowResConditioning(schedule="cosine", upsample="bilinear", noise_at=at, align_corners=corners)
        got = aug.condition(low, (8, 8), levels, torch.Generator().manual_seed(0))
        up = torch.nn.functional.interpolate(low, size=(8, 8), mode="bilinear", align_corners=corners)
        shape = (2, 3, 8, 8) if at == "high" else (2, 3, 4, 4)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        alpha_bar = aug.build_schedule().alpha_bar_at(levels).float()[:, None, None, None]
        if at == "high":
            expected = alpha_bar.sqrt() * up + (1 - alpha_bar).sqrt() * noise
        else:
            expected = aug.resize(alpha_bar.sqrt() * low + (1 - alpha_bar).sqrt() * noise, (8, 8))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(aug.condition(low, (8, 8), levels, noised=True), up, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="noise_at"):
        LowResConditioning(noise_at="middle")
    with pytest.raises(ValueError, match="align_corners"):
        LowResConditioning(upsample="nearest", align_corners=True)


def test_gaussian_blur_matches_scipy():
    image = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    out = gaussian_blur(image, torch.tensor([1.5, 0.0]))
    radius = 5  # ceil(3 * 1.5)
    expected = ndimage.gaussian_filter(image[0].numpy(), sigma=(0, 1.5, 1.5), mode="mirror", truncate=radius / 1.5)
    assert np.abs(out[0].numpy() - expected).max() < 1e-5
    assert torch.equal(out[1], image[1])  # std 0 leaves its image unchanged
    assert torch.equal(gaussian_blur(image, torch.zeros(2)), image)


def sr_pipeline(**low_res) -> SuperResolutionPipeline:
    """A pixel-space 2x super-resolution stage: 8x8 -> 16x16 images."""
    base = pixel_pipeline()
    pipe = SuperResolutionPipeline(sr_unet(sample_size=16), None, base.text_encoder,
                                   DiffusionConfig(schedule="cosine", num_inference_steps=3, guidance_scale=2.0),
                                   LowResConditioning(**{"scale": 2, "noise_level": 100, **low_res}))
    pipe.progress = False
    return pipe


def test_super_resolution_draws_twice_the_size_with_one_call_per_step():
    pipe = sr_pipeline()
    image = np.random.default_rng(0).random((8, 8, 3))
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        (args[0].shape[0], kwargs["concat"].shape, kwargs["noise_level"].tolist())), with_kwargs=True)
    out = pipe("a red circle", image, seed=0, output_type="np").images
    hook.remove()
    assert out.shape == (1, 16, 16, 3)
    assert calls == [(2, (2, 3, 16, 16), [100, 100])] * 3  # CFG halves share the image and its level
    two = pipe(["a red circle", "a blue square"], image, seed=0, output_type="np").images
    assert np.allclose(two[0], out[0], atol=1e-6)  # a seed gives the same image at any batch size
    assert not np.allclose(pipe("a red circle", image, noise_level=900, seed=0, output_type="np").images, out)


@pytest.mark.parametrize("kwargs, words", [
    ({"noise_level": 1000}, "noise_level"),
    ({"noise_level": 1.5}, "noise_level"),
    ({"image": np.zeros((2, 8, 8, 3)), "prompt": ["a", "b", "c"]}, "one image or one per prompt"),
])
def test_super_resolution_bad_input(kwargs, words):
    pipe = sr_pipeline()
    call = {"prompt": "a red circle", "image": np.zeros((8, 8, 3)), **kwargs}
    with pytest.raises(ValueError, match=words):
        pipe(**call)
    with pytest.raises(ValueError, match="not a super-resolution"):
        SuperResolutionPipeline.from_pipeline(pixel_pipeline())("a", np.zeros((8, 8, 3)))


def cascade() -> CascadePipeline:
    """A pixel base at 8x8 and a 2x super-resolution stage."""
    base = pixel_pipeline()
    base.unet = randomize(UNetModel(dataclasses.replace(base.unet.config, sample_size=8)), 5)
    sr = sr_pipeline()
    sr.text_encoder = base.text_encoder
    return CascadePipeline(base, [sr])


def test_a_cascade_draws_through_its_stages_and_round_trips(tmp_path):
    pipe = cascade()
    out = pipe("a red circle", seed=2, output_type="np")
    assert out.images.shape == (1, 16, 16, 3) and [im.shape for im in out.stage_images] == [(1, 8, 8, 3),
                                                                                          (1, 16, 16, 3)]
    base = TextToImagePipeline.from_pipeline(pipe.base)("a red circle", seed=2, output_type="np").images
    assert np.array_equal(out.stage_images[0], base)  # the base stage is the text-to-image pipeline
    pipe.save_pretrained(tmp_path / "cascade")
    loaded = CascadePipeline.from_pretrained(tmp_path / "cascade")
    loaded.progress = False
    assert loaded.stages[0].low_res == pipe.stages[0].low_res
    assert np.array_equal(loaded("a red circle", seed=2, output_type="np").images, out.images)
    with pytest.raises(ValueError, match="CascadePipeline"):
        TextToImagePipeline.from_pretrained(tmp_path / "cascade")


def test_truncated_augmentation_feeds_the_base_sample_at_the_level():
    pipe = cascade()
    level = 300
    sigma_s = pipe.stages[0].low_res.sigma_of(level)
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("concat", kwargs["concat"][-1:].clone())
    pipe.stages[0].unet.register_forward_pre_hook(keep, with_kwargs=True)
    steps = []
    out = pipe("a red circle", noise_level=level, augmentation="truncated", seed=4, output_type="pt",
               callback=lambda stage, i, sigma, x, pred: steps.append((stage, float(sigma), x.clone())))
    base_steps = [s for s in steps if s[0] == 0]
    grid = pipe.base.sigmas(4)  # the base walks its own levels down to the level's sigma, and stops there
    assert [s[1] for s in base_steps] == grid[grid > sigma_s].tolist()
    assert base_steps[-1][2].abs().max() > 0 and len(base_steps) < len(grid) - 1
    fed = torch.nn.functional.interpolate(base_steps[-1][2], size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.allclose(seen["concat"], fed, atol=1e-6)  # and its sample went in as it is, not re-noised
    plain = pipe("a red circle", noise_level=level, seed=4, output_type="pt")
    assert not torch.allclose(plain.images, out.images)


def test_cascade_bad_input():
    pipe = cascade()
    with pytest.raises(ValueError, match="one per stage"):
        pipe("a", num_inference_steps=[2, 3, 4])
    with pytest.raises(ValueError, match="augmentation must be one of"):
        pipe("a", augmentation="partial")
    with pytest.raises(ValueError, match="noise_level"):
        pipe("a", noise_level=-1)
    latent = cascade()
    latent.base.vae = torch.nn.Identity()  # any autoencoder: the base then samples latents
    with pytest.raises(ValueError, match="samples latents"):
        latent("a", augmentation="truncated")
    with pytest.raises(ValueError, match="super-resolution"):
        CascadePipeline(pipe.base, [pipe.base])


def test_a_grid_stops_at_a_level():
    grid = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64)
    assert stop_at(grid, 0.5).tolist() == [80.0, 10.0, 1.0, 0.5]
    assert stop_at(grid, 1.0).tolist() == [80.0, 10.0, 1.0]
    assert torch.equal(stop_at(grid, 0.0), grid)
    with pytest.raises(ValueError, match="starts at 80"):
        stop_at(grid, 100.0)


def test_the_command_line_draws_a_cascade(tmp_path, capsys):
    from PIL import Image

    from ldm.cli import main
    cascade().save_pretrained(tmp_path / "cascade")
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--model", str(tmp_path / "cascade"), "--steps", "2", "--eta", "0.5",
                 "--sampler", "ddim", "-o", str(out)]) == 0
    assert Image.open(out).size == (16, 16)
    assert main(["generate", "a red circle", "--model", str(tmp_path / "cascade"), "--steps", "2",
                 "--sampler", "euler", "--eta", "0.5", "-o", str(out)]) == 2
    assert "eta" in capsys.readouterr().err
