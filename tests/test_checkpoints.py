"""Checkpoint formats: our folder, diffusers folders and original single-file SD v1/v2 checkpoints, saved and
loaded back with identical outputs; pickles refused unless allowed; unknown layouts named; atomic writes."""
import dataclasses

import numpy as np
import pytest
import torch

from ldm import checkpoints
from ldm.diffusion.config import DiffusionConfig
from ldm.nn.autoencoder import Autoencoder, AutoencoderConfig
from ldm.nn.unet import UNetConfig, UNetModel
from ldm.text import CLIPTextEncoder
from ldm.text.clip import SD1, SD2
from pipelines import TextToImagePipeline


def randomize(module, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_pipeline(version: int) -> TextToImagePipeline:
    """Tiny models with the conventions of SD v1 (8 heads, CLIP quick_gelu text, eps) or v2 (64-wide heads,
    linear projections, OpenCLIP-style gelu text with '!' padding, v-prediction)."""
    if version == 1:
        unet_config = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                                 num_heads=8, context_dim=64, sample_size=8)
        text = dataclasses.replace(SD1, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1)
    else:
        unet_config = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                                 num_heads=-1, num_head_channels=64, context_dim=64, use_linear_in_transformer=True,
                                 sample_size=8)
        text = dataclasses.replace(SD2, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1)
    vae = Autoencoder(AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1))  # 32 groups, as SD
    diffusion = DiffusionConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="eps" if version == 1 else "v", spacing="leading", steps_offset=1)
    pipe = TextToImagePipeline(randomize(UNetModel(unet_config), 1), randomize(vae, 2, 0.05),
                               randomize(CLIPTextEncoder(text), 3), diffusion)
    pipe.progress = False
    return pipe


def draw(pipe):
    return pipe("a green star to the left of a red circle", negative_prompt="noise", num_inference_steps=3,
                guidance_scale=3.0, seed=0, height=64, width=64, output_type="np").images


@pytest.mark.parametrize("version", [1, 2])
def test_single_file_round_trip(version, tmp_path):
    pipe = tiny_pipeline(version)
    path = checkpoints.save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "model.safetensors")
    keys = checkpoints.load_state_dict(path)
    text_prefix = "cond_stage_model.transformer.text_model." if version == 1 else "cond_stage_model.model.transformer."
    assert any(k.startswith(text_prefix) for k in keys)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in keys)
    loaded = TextToImagePipeline.from_pretrained(path, prediction_type=pipe.diffusion.prediction_type)
    loaded.progress = False
    # a single file does not record the native size: SD's (64 latents; 96 for v-prediction 2.x) is assumed
    assert loaded.unet.config == dataclasses.replace(pipe.unet.config, sample_size=loaded.unet.config.sample_size)
    assert loaded.vae.config == pipe.vae.config
    assert np.array_equal(draw(loaded), draw(pipe))


def test_single_file_guesses_prediction_type_by_version(tmp_path):
    for version, expected in [(1, "eps"), (2, "v")]:
        pipe = tiny_pipeline(version)
        path = checkpoints.save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / f"v{version}.safetensors")
        if version == 2:
            with pytest.warns(UserWarning, match="v-prediction"):
                parts = checkpoints.load_pipeline(path)
        else:
            parts = checkpoints.load_pipeline(path)
        assert parts.diffusion.prediction_type == expected


@pytest.mark.parametrize("fmt", ["ldm", "diffusers"])
@pytest.mark.parametrize("version", [1, 2])
def test_folder_round_trips(fmt, version, tmp_path):
    pipe = tiny_pipeline(version)
    pipe.save_pretrained(tmp_path / "m", format=fmt)
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "m")
    loaded.progress = False
    assert np.array_equal(draw(loaded), draw(pipe))


def test_saving_over_an_existing_folder_is_atomic(tmp_path, monkeypatch):
    pipe = tiny_pipeline(1)
    target = tmp_path / "m"
    pipe.save_pretrained(target)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(checkpoints, "save_state_dict", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        pipe.save_pretrained(target)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before  # the old save is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind
    monkeypatch.undo()
    assert np.array_equal(draw(TextToImagePipeline.from_pretrained(target)), draw(pipe))


def test_pickles_are_refused_unless_allowed(tmp_path):
    pipe = tiny_pipeline(1)
    st = checkpoints.save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "m.safetensors")
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": checkpoints.load_state_dict(st), "global_step": 1}, ckpt)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        TextToImagePipeline.from_pretrained(ckpt)
    loaded = TextToImagePipeline.from_pretrained(ckpt, allow_pickle=True)
    loaded.progress = False
    assert np.array_equal(draw(loaded), draw(pipe))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        checkpoints.load_state_dict(tmp_path / "evil.ckpt", allow_pickle=True)


def test_unknown_layouts_name_the_keys(tmp_path):
    pipe = tiny_pipeline(1)
    path = checkpoints.save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "m.safetensors")
    sd = checkpoints.load_state_dict(path)
    with pytest.raises(ValueError, match="unknown layout"):
        checkpoints.save_state_dict({"foo.weight": torch.zeros(1)}, tmp_path / "foo.safetensors")
        checkpoints.load_pipeline(tmp_path / "foo.safetensors")
    extra = dict(sd, **{"model.diffusion_model.bogus.weight": torch.zeros(1)})
    checkpoints.save_state_dict(extra, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match="bogus"):
        checkpoints.load_pipeline(tmp_path / "extra.safetensors")
    dropped = {k: v for k, v in sd.items() if k != "model.diffusion_model.out.2.bias"}
    checkpoints.save_state_dict(dropped, tmp_path / "dropped.safetensors")
    with pytest.raises(ValueError, match="out.2.bias"):
        checkpoints.load_pipeline(tmp_path / "dropped.safetensors")
    stray = dict(sd, **{"some_other_model.weight": torch.zeros(1)})
    checkpoints.save_state_dict(stray, tmp_path / "stray.safetensors")
    with pytest.raises(ValueError, match="some_other_model.weight"):
        checkpoints.load_pipeline(tmp_path / "stray.safetensors")


def test_missing_models_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        TextToImagePipeline.from_pretrained("runwayml/stable-diffusion-v1-5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        TextToImagePipeline.from_pretrained(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="safetensors"):
        TextToImagePipeline.from_pretrained(tmp_path / "x.txt")


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_real_sd_configs_round_trip_single_file(version, tmp_path):
    """Random weights in the real SD 1.5 / SD 2.1 architectures: single file -> load gives the same U-Net output."""
    unet = randomize(UNetModel(UNetConfig.sd1() if version == 1 else UNetConfig.sd2()), 1, 0.02)
    vae = randomize(Autoencoder(AutoencoderConfig.sd()), 2, 0.02)
    text = randomize(CLIPTextEncoder.sd1() if version == 1 else CLIPTextEncoder.sd2(), 3, 0.02)
    path = checkpoints.save_single_file(unet, vae, text, tmp_path / "sd.safetensors")
    del vae
    parts = checkpoints.load_pipeline(path, prediction_type="eps")
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, unet.config.context_dim)
    with torch.no_grad():
        assert torch.equal(parts.unet(x, torch.tensor([10]), ctx), unet(x, torch.tensor([10]), ctx))
        assert torch.equal(parts.text_encoder.encode(["a photo"]).embeddings, text.encode(["a photo"]).embeddings)


@pytest.mark.parametrize("encoder", ["bert", "transformers"])
def test_bundled_minilm_is_referenced_not_copied(encoder, tmp_path):
    """Saved from either MiniLM (ours or transformers'), a folder refers to the bundled package, and loads as our
    BertTextEncoder, which imports no transformers."""
    from ldm.text import BertTextEncoder, HFTextEncoder

    pipe = tiny_pipeline(1)
    text = (BertTextEncoder if encoder == "bert" else HFTextEncoder).minilm(max_length=16)
    unet = randomize(UNetModel(dataclasses.replace(pipe.unet.config, context_dim=384, mask_context=True)), 4)
    minilm_pipe = TextToImagePipeline(unet, pipe.vae, text, pipe.diffusion)
    minilm_pipe.progress = False
    minilm_pipe.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "text_encoder").exists()
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "m")
    loaded.progress = False
    assert isinstance(loaded.text_encoder, BertTextEncoder)
    assert loaded.text_encoder.config.to_dict() == text.config.to_dict()
    if encoder == "bert":
        assert np.array_equal(draw(loaded), draw(minilm_pipe))
    else:  # the two implementations agree to float rounding (test_text_encoders.py)
        assert np.abs(draw(loaded) - draw(minilm_pipe)).max() < 1e-4
    with torch.no_grad():  # a changed encoder is saved in full
        next(text.parameters()).add_(1e-3)
    minilm_pipe.save_pretrained(tmp_path / "changed")
    assert (tmp_path / "changed" / "text_encoder").exists()
