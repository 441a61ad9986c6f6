"""LoRA: peft adapters on a tiny U-Net start at the base model and train only themselves; merging the saved
adapters into a plain U-Net reproduces the adapted model (atol 1e-5), at any scale, from our file format and
from diffusers / peft / kohya names; unloading restores the exact weights, in the pipeline too."""
import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.checkpoints import save_state_dict
from ldm.diffusion.config import DiffusionConfig
from ldm.nn.autoencoder import Autoencoder, AutoencoderConfig
from ldm.nn.unet import UNetConfig, UNetModel
from ldm.nn.unet_diffusers import state_dict_to_diffusers
from ldm.text import CLIPTextEncoder
from ldm.text.clip import SD1
from ldm.train.lora import (ADAPTER, DEFAULT_TARGETS, add_lora, lora_layers, lora_state_dict, merge_lora, read_lora,
                            restore_weights, save_lora)
from pipelines import TextToImagePipeline
from test_checkpoints import randomize

# SD1-style: conv proj_in, so "proj_in" adds Conv2d adapters next to the Linear attention projections
CONFIG = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                    num_heads=2, context_dim=12, num_groups=8, sample_size=8)
TARGETS = DEFAULT_TARGETS + ("proj_in",)
RANK, ALPHA = 4, 8.0  # alpha != rank, so a lost scaling shows


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 12, generator=g)


def run(unet):
    with torch.no_grad():
        return unet(*inputs())


@pytest.fixture(scope="module")
def trained():
    """(plain base U-Net, LoRA U-Net after three Adam steps on a toy loss)."""
    torch.manual_seed(0)
    base = randomize(UNetModel(CONFIG), 1)
    model = add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, targets=TARGETS)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, t, ctx = inputs(2)
    target = torch.randn_like(x)
    for _ in range(3):
        opt.zero_grad()
        ((model(x, t, ctx) - target) ** 2).mean().backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    return base, model.eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def merged(base, lora, scale=1.0):
    plain = copy.deepcopy(base)
    merge_lora(plain, lora, scale)
    return plain


def test_add_lora_trains_only_adapters_and_starts_at_the_base_model():
    base = randomize(UNetModel(CONFIG), 1)
    model = add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA)
    attentions = sum(type(m).__name__ == "CrossAttention" for m in base.modules())
    assert len(lora_layers(model)) == 4 * attentions == 4 * 2 * 7  # 2 in, 1 mid, 4 out transformers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(lora_layers(model))
    assert torch.equal(run(model), run(base))  # B = 0: not one bit changes


def test_merged_lora_reproduces_the_peft_model(trained):
    base, model = trained
    sd = lora_state_dict(model)
    assert set(sd) == {f"{n}.{p}" for n in lora_layers(model) for p in ("lora_A.weight", "lora_B.weight", "alpha")}
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
    assert "input_blocks.1.1.proj_in.lora_B.weight" in sd and sd["input_blocks.1.1.proj_in.lora_B.weight"].dim() == 4
    assert all(sd[k].abs().max() > 0 for k in sd if k.endswith("lora_B.weight"))  # training moved every B
    expected = run(model)
    assert (expected - run(base)).abs().max() > 1e-3
    torch.testing.assert_close(run(merged(base, sd)), expected, atol=1e-5, rtol=0)


def test_scale(trained):
    base, model = trained
    sd = lora_state_dict(model)
    zero = merged(base, sd, scale=0)
    assert same_weights(zero, base)
    half_peft = copy.deepcopy(model)
    for layer in lora_layers(half_peft).values():
        layer.scaling[ADAPTER] *= 0.5
    half, full = merged(base, sd, scale=0.5), merged(base, sd, scale=1)
    torch.testing.assert_close(run(half), run(half_peft), atol=1e-5, rtol=0)
    half_sd, full_sd = half.state_dict(), full.state_dict()
    for k, w in base.state_dict().items():  # halfway between the base and the fully merged weights
        torch.testing.assert_close(half_sd[k], (w + full_sd[k]) / 2, atol=1e-7, rtol=0)


def test_file_round_trip(trained, tmp_path):
    base, model = trained
    path = save_lora(model, tmp_path / "lora.safetensors", metadata={"trigger": "shapes"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]  # no temporary file left behind
    tensors, meta = read_lora(path)
    sd = lora_state_dict(model)
    assert tensors.keys() == sd.keys() and all(torch.equal(tensors[k], sd[k]) for k in sd)
    assert meta == {"format": "ldm-lora", "rank": "4", "alpha": "8.0", "trigger": "shapes",
                    "targets": '["proj_in", "to_k", "to_out.0", "to_q", "to_v"]'}
    from_file, from_dict = merged(base, path), merged(base, sd)
    assert same_weights(from_file, from_dict)
    # the metadata alone gives alpha when per-module alpha tensors are absent
    save_state_dict({k: v for k, v in sd.items() if not k.endswith(".alpha")}, tmp_path / "bare.safetensors",
                    metadata=meta)
    no_alpha = merged(base, tmp_path / "bare.safetensors")
    assert same_weights(no_alpha, from_dict)


def to_diffusers(sd, style):
    """Our LoRA keys renamed through the U-Net key map into the naming schemes of other tools."""
    out = {}
    for key, value in sd.items():
        module, part = key.rsplit(".lora_", 1) if ".lora_" in key else (key[:-len(".alpha")], "alpha")
        theirs = next(iter(state_dict_to_diffusers({f"{module}.weight": value}, CONFIG)))[:-len(".weight")]
        if part == "alpha":
            if style == "kohya":
                out[f"lora_unet_{theirs.replace('.', '_')}.alpha"] = value
            continue
        up = part.startswith("B")
        if up and style != "kohya":  # no alpha there: diffusers takes alpha = rank, so B carries alpha / rank
            value = value * (ALPHA / RANK)
        if style == "peft":
            out[f"unet.{theirs}.lora_{part}"] = value
        elif style == "diffusers_old":
            out[f"unet.{theirs}.lora.{'up' if up else 'down'}.weight"] = value
        elif style == "kohya":
            out[f"lora_unet_{theirs.replace('.', '_')}.lora_{'up' if up else 'down'}.weight"] = value
        elif ".to_" in theirs:  # attention processors: no proj_in
            parent, proj = theirs.split(".to_")
            out[f"{parent}.processor.to_{proj.replace('.0', '')}_lora.{'up' if up else 'down'}.weight"] = value
    return out


@pytest.mark.parametrize("style", ["peft", "diffusers_old", "kohya", "processor"])
def test_diffusers_named_files_merge_the_same(trained, tmp_path, style):
    base, model = trained
    sd = lora_state_dict(model)
    theirs = to_diffusers(sd, style)
    assert any("down_blocks.0.attentions.0" in k or "down_blocks_0_attentions_0" in k for k in theirs)
    if style == "processor":
        sd = {k: v for k, v in sd.items() if ".to_" in k}
        theirs["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_state_dict(theirs, path, metadata={"format": "pt"})
    if style == "processor":
        with pytest.warns(UserWarning, match="ignoring 1 text-encoder"):
            got = merged(base, path)
    else:
        got = merged(base, path)
    torch.testing.assert_close(got.state_dict(), merged(base, sd).state_dict(), atol=1e-7, rtol=0)


def test_restore_is_exact(trained):
    base, model = trained
    plain = copy.deepcopy(base)
    first = merge_lora(plain, lora_state_dict(model))
    assert set(first) == {f"{n}.weight" for n in lora_layers(model)}
    restore_weights(plain, first)
    assert same_weights(plain, base)


def test_bad_input(trained, tmp_path):
    base, model = trained
    for kwargs, match in [(dict(rank=0), "rank must be a positive int"), (dict(rank=2.0), "rank"),
                          (dict(alpha=0), "alpha must be"), (dict(alpha=math.inf), "alpha"),
                          (dict(dropout=1.0), "dropout"), (dict(targets=["to_qq"]), r"'to_qq'.*to_out\.0"),
                          (dict(targets=("to_q", "attn3")), "'attn3' matches no Linear/Conv2d")]:
        with pytest.raises(ValueError, match=match):
            add_lora(copy.deepcopy(base), **kwargs)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    sd = lora_state_dict(model)
    a, b = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_A.weight", "middle_block.1.proj_in.lora_B.weight"
    cases = [({**sd, "input_blocks.9.1.to_q.lora_A.weight": sd[a]}, "'input_blocks.9.1.to_q.lora_A.weight'.*no "),
             ({**sd, a: torch.zeros(RANK, 13)}, r"to_k.lora_A.weight \(4, 13\).*to_k.weight \(16, 12\)"),
             ({**sd, b: torch.zeros(32, RANK)}, r"proj_in.lora_B.weight \(32, 4\).*\(32, 32, 1, 1\)"),
             ({a: sd[a]}, "needs both down"), ({"input_blocks.1.1.norm.weight": sd[a]}, "not a LoRA tensor name")]
    for lora, match in cases:
        plain = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            merge_lora(plain, lora)
        assert same_weights(plain, base)  # nothing merged
    for scale in (math.nan, math.inf, "1", True, None):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            merge_lora(copy.deepcopy(base), sd, scale)
    with pytest.raises(ValueError, match="plain U-Net"):
        merge_lora(model, sd)
    with pytest.raises(FileNotFoundError):
        merge_lora(copy.deepcopy(base), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora(base, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="written by save_lora"):
        save_lora(model, tmp_path / "x.safetensors", metadata={"rank": "8"})


def tiny_pipeline():
    unet = UNetModel(dataclasses.replace(CONFIG, context_dim=32))
    text = CLIPTextEncoder(dataclasses.replace(SD1, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1))
    vae = Autoencoder(AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1))
    diffusion = DiffusionConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, spacing="leading",
                                steps_offset=1)
    pipe = TextToImagePipeline(randomize(unet, 1), randomize(vae, 2), randomize(text, 3), diffusion)
    pipe.progress = False
    return pipe


def test_pipeline_load_and_unload(tmp_path: Path):
    pipe = tiny_pipeline()
    adapted = add_lora(copy.deepcopy(pipe.unet), rank=2, alpha=8)
    for layer in lora_layers(adapted).values():  # a strong LoRA: a tiny random U-Net barely moves a 2-step image
        randomize(layer.lora_B[ADAPTER], 4, 1.0)
    path = save_lora(adapted, tmp_path / "style.safetensors")

    def draw():
        return pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, seed=0, height=32, width=32,
                    output_type="np").images

    before = draw()
    pipe.load_lora(path, scale=0.0)
    assert np.array_equal(draw(), before)
    pipe.load_lora(path)
    once = draw()
    assert np.abs(once - before).max() > 1e-3
    pipe.load_lora(path, scale=1.0)  # stacks
    assert np.abs(draw() - once).max() > 1e-3
    with pytest.raises(ValueError, match="scale must be a finite number"):
        pipe.load_lora(path, scale=math.nan)
    pipe.unload_lora()
    assert np.array_equal(draw(), before)
    pipe.unload_lora()  # nothing loaded: a no-op
    assert np.array_equal(draw(), before)
