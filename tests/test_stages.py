"""Conditioning as data and pipelines as stages: classifier-free guidance batches any set of named inputs in one
call and equals the two calls it replaces; the folder format holds any number of stages (components written
once, old one-stage folders still load); a pixel-space model samples through the same classes."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from ldm import checkpoints
from ldm.conditioning import Conditioning, guided
from ldm.diffusion import Denoiser
from ldm.diffusion.config import DiffusionConfig
from ldm.nn.unet import UNetConfig, UNetModel
from ldm.stage import PipelineParts, Stage
from ldm.text import CLIPTextEncoder
from ldm.text.clip import SD1
from pipelines import ImageToImagePipeline, TextToImagePipeline

from test_checkpoints import draw, randomize, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def vector_unet(**overrides) -> UNetModel:
    config = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                        num_heads=2, context_dim=16, adm_in_channels=8, sample_size=8, **overrides)
    return randomize(UNetModel(config), 4)


def test_guidance_batches_every_input_in_one_call():
    unet = vector_unet()
    calls = []
    unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    denoiser = Denoiser(unet, DiffusionConfig().build_schedule())
    g = torch.Generator().manual_seed(0)
    cond = Conditioning({"context": torch.randn(3, 5, 16, generator=g), "y": torch.randn(3, 8, generator=g)})
    uncond = Conditioning({"context": torch.randn(1, 5, 16, generator=g), "y": torch.zeros(1, 8)}).expand(3)
    x, sigma = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([14.6, 2.0, 0.3], dtype=torch.float64)
    pred = guided(denoiser, cond, uncond, 4.0)(x, sigma)
    assert calls == [6]  # both halves, every input, one network call
    e_c, e_u = denoiser(x, sigma, **cond).eps, denoiser(x, sigma, **uncond).eps
    assert torch.allclose(pred.eps, e_u + 4.0 * (e_c - e_u), atol=1e-5)
    plain = guided(denoiser, cond, None, 4.0)(x, sigma)
    assert torch.equal(plain.eps, e_c)


def test_conditioning_sets_check_what_they_batch():
    a = Conditioning({"context": torch.zeros(2, 3, 4), "context_mask": None})
    assert Conditioning.cat([a, a]).batch_size == 4
    assert a.repeat_interleave(3).batch_size == 6 and a.repeat_interleave(3)["context_mask"] is None
    with pytest.raises(ValueError, match="different inputs"):
        Conditioning.cat([a, Conditioning({"context": torch.zeros(2, 3, 4)})])
    with pytest.raises(ValueError, match="None in others"):
        Conditioning.cat([a, a.replace(context_mask=torch.ones(2, 3, dtype=torch.bool))])
    with pytest.raises(ValueError, match="batch size"):
        Conditioning({"context": torch.zeros(2, 3, 4), "y": torch.zeros(3, 8)})
    assert a.to(dtype=torch.bfloat16)["context"].dtype == torch.bfloat16
    mask = Conditioning({"m": torch.ones(2, 3, dtype=torch.bool)}).to(dtype=torch.bfloat16)["m"]
    assert mask.dtype == torch.bool  # masks and labels keep their dtype


def pixel_pipeline() -> TextToImagePipeline:
    """A pixel-space model: a U-Net on 3-channel 16x16 images, no autoencoder."""
    unet = randomize(UNetModel(UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                                          num_res_blocks=1, attention_resolutions=(2,), num_heads=2, context_dim=64,
                                          sample_size=16)), 5)
    text = randomize(CLIPTextEncoder(dataclasses.replace(SD1, hidden_size=64, intermediate_size=128, num_layers=2,
                                                         num_heads=1)), 3)
    pipe = TextToImagePipeline(unet, None, text, DiffusionConfig(schedule="cosine", num_inference_steps=4,
                                                                 guidance_scale=2.0))
    pipe.progress = False
    return pipe


def test_a_pixel_space_model_samples_saves_and_loads(tmp_path):
    pipe = pixel_pipeline()
    out = pipe("a red circle", seed=3, output_type="np").images
    assert out.shape == (1, 16, 16, 3) and pipe.default_size == 16
    raw = pipe("a red circle", seed=3, output_type="latent").images
    assert raw.shape == (1, 3, 16, 16)
    assert np.allclose(out, ((raw / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy())
    pipe.save_pretrained(tmp_path / "pixel")
    meta = json.loads((tmp_path / "pixel" / "ldm_pipeline.json").read_text())
    assert meta["version"] == 2 and meta["stages"][0]["vae"] is None
    assert sorted(meta["components"]) == ["text_encoder", "unet"]
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "pixel")
    loaded.progress = False
    assert loaded.vae is None
    assert np.array_equal(loaded("a red circle", seed=3, output_type="np").images, out)
    redrawn = ImageToImagePipeline.from_pipeline(pipe)("a red circle", image=out[0], strength=0.5, seed=1,
                                                       output_type="np").images
    assert redrawn.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="no autoencoder"):
        pipe.save_pretrained(tmp_path / "d", format="diffusers")


def test_the_folder_holds_any_number_of_stages(tmp_path):
    latent, pixel = tiny_pipeline(1), pixel_pipeline()
    second = Stage(latent.unet, dataclasses.replace(latent.diffusion, guidance_scale=5.0), latent.vae)
    parts = PipelineParts(latent.text_encoder, [latent.stage, pixel.stage, second])
    checkpoints.save_pipeline(parts, tmp_path / "three")
    meta = json.loads((tmp_path / "three" / "ldm_pipeline.json").read_text())
    assert sorted(meta["components"]) == ["text_encoder", "unet", "unet_1", "vae"]  # shared networks written once
    assert [s["unet"] for s in meta["stages"]] == ["unet", "unet_1", "unet"]
    loaded = checkpoints.load_pipeline(tmp_path / "three")
    assert len(loaded.stages) == 3 and loaded.stages[0].unet is loaded.stages[2].unet
    assert loaded.stages[1].vae is None and loaded.stages[2].diffusion.guidance_scale == 5.0
    for ours, theirs in zip(parts.stages, loaded.stages):
        assert all(torch.equal(a, b) for a, b in zip(ours.unet.state_dict().values(),
                                                      theirs.unet.state_dict().values()))
    with pytest.raises(ValueError, match="CascadePipeline"):
        TextToImagePipeline.from_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="3 stage"):
        checkpoints.save_pipeline(parts, tmp_path / "d", format="diffusers")


def test_version_one_folders_still_load(tmp_path):
    pipe = tiny_pipeline(1)
    folder = tmp_path / "v1"
    pipe.save_pretrained(folder)
    # rewrite the description as version 1 wrote it: one U-Net, one autoencoder, diffusion at the top level
    (folder / "ldm_pipeline.json").write_text(json.dumps({"format": "ldm-pipeline", "version": 1,
                                                          "diffusion": pipe.diffusion.to_dict()}))
    assert np.array_equal(draw(TextToImagePipeline.from_pretrained(folder)), draw(pipe))
    shipped = json.loads((checkpoints.resolve("shapes-64") / "ldm_pipeline.json").read_text())
    assert shipped["version"] == 1  # the shipped model is a version-1 folder, loaded by test_shipped_model


@pytest.mark.parametrize("meta, words", [
    ({"version": 2, "components": {"unet": {"type": "unet"}}, "stages": []}, "non-empty 'stages'"),
    ({"version": 2, "components": {"unet": {"type": "net"}}, "stages": [{}]}, "needs a type"),
    ({"version": 2, "components": {"unet": {"type": "unet"}}, "stages": [{"unet": "vae", "diffusion": {}}]},
     "not a unet component"),
    ({"version": 2, "components": {"unet": {"type": "unet"}}, "stages": [{"unet": "unet", "sampler": 1}]},
     "stage 0 must be"),
])
def test_bad_folder_descriptions_are_named(tmp_path, meta, words):
    (tmp_path / "ldm_pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=words):
        checkpoints.load_pipeline(tmp_path)


def test_a_shipped_network_is_referred_to_unless_changed(tmp_path):
    """A folder that reuses a shipped model's network unchanged names it ("shapes-64/unet", pinned by the sha256 of
    its weights) instead of copying it; changed weights, another dtype or the shipped model's own folder as the
    destination are written in full; a reference to no shipped network, or to other weights, is an error."""
    from ldm.pipeline_folder import save_folder

    pipe = TextToImagePipeline.from_pretrained("shapes-64")
    pipe.progress = False
    pipe.save_pretrained(tmp_path / "same")
    meta = json.loads((tmp_path / "same" / "ldm_pipeline.json").read_text())
    assert meta["components"]["unet"]["shipped"] == "shapes-64/unet" and len(meta["components"]["unet"]["sha256"]) == 64
    assert not (tmp_path / "same" / "unet").exists()
    again = TextToImagePipeline.from_pretrained(tmp_path / "same")
    again.progress = False
    kwargs = dict(num_inference_steps=2, seed=0, output_type="np")
    assert np.array_equal(again("a red circle", **kwargs).images, pipe("a red circle", **kwargs).images)
    parts = PipelineParts(pipe.text_encoder, [pipe.stage])
    (tmp_path / "own").mkdir()
    save_folder(parts, tmp_path / "own", destination=checkpoints.WEIGHTS_DIR / "shapes-64")
    assert (tmp_path / "own" / "unet" / "model.safetensors").is_file()
    with torch.no_grad():
        pipe.unet.out[2].bias.add_(0.01)
    pipe.vae.double()
    pipe.save_pretrained(tmp_path / "changed")
    meta = json.loads((tmp_path / "changed" / "ldm_pipeline.json").read_text())
    assert meta["components"]["unet"] == {"type": "unet"} and (tmp_path / "changed" / "unet").is_dir()
    assert meta["components"]["vae"] == {"type": "autoencoder"}
    path = tmp_path / "same" / "ldm_pipeline.json"
    good = json.loads(path.read_text())
    for entry, words in (({"shipped": "shapes-64/nothing"}, "shapes-64/nothing"),
                         ({"shipped": "../weights/unet"}, "no network"),
                         ({"shipped": "shapes-64/unet", "sha256": "0" * 64}, "sha256")):
        bad = json.loads(json.dumps(good))
        bad["components"]["unet"] = {"type": "unet", **entry}
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words):
            TextToImagePipeline.from_pretrained(tmp_path / "same")
