"""A model's own thresholding: read from diffusers schedulers (clip_sample, which DDPM and DDIM do unless told not
to; thresholding with its ratio and cap), stored in the folder's DiffusionConfig, written back, and used by the
pipelines unless the caller names another (False: none)."""
import warnings

import pytest

from ldm.diffusion.config import DiffusionConfig
from ldm.sampling.transforms import check_thresholding

DDPM = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range"}


def read(config: dict) -> DiffusionConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no equal sampler" warning
        return DiffusionConfig.from_diffusers(config)


def test_ddpm_reads_as_ddpm_with_its_clipping_or_dynamic_thresholding():
    clipped = read(DDPM)
    assert clipped.sampler == "ddpm" and clipped.variance_type == "learned_range" and clipped.spacing == "leading"
    assert clipped.thresholding == {"kind": "static", "limit": 1.0}  # DDPMScheduler's default clip_sample
    assert read(dict(DDPM, clip_sample=False)).thresholding is None
    dynamic = read(dict(DDPM, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5))
    assert dynamic.thresholding == {"kind": "dynamic", "percentile": 0.95, "max_value": 1.5}
    for config in (clipped, dynamic):
        again = read(config.to_diffusers())
        assert again.thresholding == config.thresholding and again.variance_type == "learned_range"


def test_ddim_clipping_is_read_with_a_warning_about_eps():
    with pytest.warns(UserWarning, match="re-derived"):
        config = DiffusionConfig.from_diffusers({"_class_name": "DDIMScheduler", "clip_sample": True})
    assert config.sampler == "ddim" and config.thresholding == {"kind": "static", "limit": 1.0}
    assert read({"_class_name": "DDIMScheduler", "clip_sample": False}).to_diffusers()["clip_sample"] is False


@pytest.mark.parametrize("value, words", [("hard", "thresholding must be"), ({"kind": "static", "pct": 2}, "limit"),
                                          ({"kind": "dynamic", "percentile": 2}, "percentile")])
def test_bad_thresholding_is_named(value, words):
    with pytest.raises(ValueError, match=words):
        check_thresholding(value)
    with pytest.raises(ValueError, match=words):
        DiffusionConfig(thresholding=value)


def test_the_pipeline_uses_the_models_thresholding_unless_told_otherwise():
    import numpy as np
    import torch

    from ldm.conditioning import Conditioning
    from ldm.nn.unet import UNetConfig, UNetModel
    from ldm.stage import Stage

    unet = UNetModel(UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1,),
                                num_res_blocks=1, attention_resolutions=(), context_dim=None, num_groups=8))
    with torch.no_grad():
        unet.out[2].bias.fill_(-5.0)  # eps far off: x0 estimates far outside [-1, 1]
    stage = Stage(unet, DiffusionConfig(schedule="linear", thresholding="static"))
    x, sigma = torch.randn(1, 3, 8, 8), torch.tensor([2.0], dtype=torch.float64)
    with torch.no_grad():
        own = stage.denoiser(Conditioning(), None, 1.0)(x, sigma).x0
        none = stage.denoiser(Conditioning(), None, 1.0, False)(x, sigma).x0
        dynamic = stage.denoiser(Conditioning(), None, 1.0, "dynamic")(x, sigma).x0
    assert float(own.abs().max()) <= 1 and float(none.abs().max()) > 1.5 and float(dynamic.abs().max()) <= 1
    assert not np.allclose(own.numpy(), dynamic.numpy())
