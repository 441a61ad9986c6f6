"""The U-Net against diffusers' UNet2DConditionModel on identical random weights, and its own contracts."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.nn.unet import UNetConfig, UNetModel, load_shallower
from ldm.nn.unet_diffusers import (config_from_diffusers, config_to_diffusers, state_dict_from_diffusers,
                                   state_dict_to_diffusers)

TINY_SD1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
TINY_SD2 = dict(TINY_SD1, block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=2)
TINY_VARIANTS = dict(TINY_SD1, resnet_time_scale_shift="scale_shift", class_embed_type="projection",
                     projection_class_embeddings_input_dim=12, out_channels=8)
TINY_PER_LEVEL = dict(TINY_SD2, layers_per_block=(1, 3, 2))  # resnets per level (Efficient U-Net's option)
CONFIGS, IDS = [TINY_SD1, TINY_SD2, TINY_VARIANTS, TINY_PER_LEVEL], ["sd1", "sd2", "scale_shift_adm", "per_level"]


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (diffusers and we both zero-init some layers, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def pair(config: dict):
    theirs = randomized(UNet2DConditionModel(**config))
    c = config_from_diffusers(theirs.config)
    ours = UNetModel(c).eval()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict(), c), strict=True)
    return theirs, ours, c


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("size", [(16, 16), (24, 40)])
def test_matches_diffusers(config, size):
    theirs, ours, c = pair(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    t = torch.tensor([10, 900])
    ctx = torch.randn(2, 7, 24, generator=g)
    kwargs = {}
    if c.adm_in_channels:
        kwargs["y"] = torch.randn(2, 12, generator=g)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx, class_labels=kwargs.get("y")).sample
        got = ours(x, t, ctx, **kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)  # measured max 3.2e-6


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_key_map_and_config_round_trip(config):
    theirs, ours, c = pair(config)
    back = state_dict_to_diffusers(ours.state_dict(), c)
    assert set(back) == set(theirs.state_dict())
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    assert config_from_diffusers(config_to_diffusers(c)) == c
    assert UNetConfig.from_dict(c.to_dict()) == c
    rebuilt = UNet2DConditionModel(**{k: v for k, v in config_to_diffusers(c).items() if not k.startswith("_")})
    rebuilt.load_state_dict(back, strict=True)


# the x4 upscaler's layout (low-resolution image concatenated, noise level as one of 1000 class embeddings, the
# first levels cross-attending in place of self-attention) and DeepFloyd IF stage II's (level timestep-embedded)
TINY_UPSCALER = dict(TINY_SD1, in_channels=7, num_class_embeds=1000, only_cross_attention=[True, False],
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TINY_IF2 = dict(TINY_SD1, in_channels=6, out_channels=6, class_embed_type="timestep")


@pytest.mark.parametrize("config, concat", [(TINY_UPSCALER, 3), (TINY_IF2, 3)], ids=["x4_upscaler", "if_stage2"])
def test_noise_level_unets_match_diffusers(config, concat):
    theirs = randomized(UNet2DConditionModel(**config))
    c = config_from_diffusers(theirs.config, class_labels="noise_level", concat_channels=concat)
    ours = UNetModel(c).eval()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict(), c), strict=True)
    g = torch.Generator().manual_seed(1)
    x, image = torch.randn(2, config["in_channels"] - concat, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    t, level, ctx = torch.tensor([10, 900]), torch.tensor([20, 350]), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        expected = theirs(torch.cat([x, image], 1), t, encoder_hidden_states=ctx, class_labels=level).sample
        got = ours(x, t, ctx, concat=image, noise_level=level)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    back = state_dict_to_diffusers(ours.state_dict(), c)
    assert set(back) == set(theirs.state_dict())
    assert config_from_diffusers(config_to_diffusers(c), "noise_level", concat) == c


def test_real_sd_parameter_counts():
    """SD 1.5 and SD 2.1 U-Nets have 859,520,964 and 865,910,724 parameters."""
    with torch.device("meta"):
        assert sum(p.numel() for p in UNetModel(UNetConfig.sd1()).parameters()) == 859_520_964
        assert sum(p.numel() for p in UNetModel(UNetConfig.sd2()).parameters()) == 865_910_724


def test_context_mask_hides_padding_tokens():
    c = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                   num_heads=4, context_dim=16, num_groups=8)
    model = randomized(UNetModel(c))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx = torch.randn(1, 5, 16)
    mask = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        masked = model(x, t, ctx, context_mask=mask)
        changed_padding = ctx.clone()
        changed_padding[:, 3:] = torch.randn(1, 2, 16)
        assert torch.allclose(model(x, t, changed_padding, context_mask=mask), masked, atol=1e-5)
        assert not torch.allclose(model(x, t, changed_padding), model(x, t, ctx), atol=1e-3)
        assert torch.allclose(model(x, t, ctx[:, :3]), masked, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    c = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                   num_heads=2, context_dim=8, num_groups=8)
    model = randomized(UNetModel(c)).train()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 8)
    model(x, t, ctx).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, ctx).square().mean().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("depth,new", [(2, 7), ((1, 3), 8)])
def test_load_shallower_adds_blocks_that_start_as_the_identity(depth, new):
    c = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                   num_heads=2, context_dim=16, num_groups=8)
    source = randomized(UNetModel(c))  # every weight random, so a block left non-zero would change the output
    deeper = randomized(UNetModel(UNetConfig.from_dict({**c.to_dict(), "transformer_depth": depth})), seed=1)
    grown = load_shallower(deeper, source.state_dict())
    assert len(grown) == new and all(name.endswith(("transformer_blocks.1", "transformer_blocks.2")) for name in grown)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(deeper(x, t, ctx), source(x, t, ctx))
    deeper.train()
    deeper(x, t, ctx).square().mean().backward()  # the new blocks learn: their zeroed outputs get a gradient
    assert dict(deeper.named_parameters())[grown[0] + ".attn2.to_out.0.weight"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="more than transformer depth"):
        load_shallower(UNetModel(UNetConfig.from_dict({**c.to_dict(), "num_res_blocks": 2})), source.state_dict())
    partial = {k: v for k, v in source.state_dict().items() if not k.endswith("transformer_blocks.0.attn2.to_k.weight")}
    with pytest.raises(ValueError, match="attn2.to_k"):  # a block the source has in part is not a new block
        load_shallower(deeper, partial)


@pytest.mark.parametrize("call,words", [
    (lambda m: m(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.randn(1, 2, 16)), ["x must have shape", "4"]),
    (lambda m: m(torch.randn(1, 4, 8, 8), torch.tensor([1])), ["context"]),
    (lambda m: m.set_attention_backend("flash"), ["backend", "sdpa", "xformers"]),
])
def test_bad_input(call, words):
    m = UNetModel(UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                             num_heads=2, context_dim=16, num_groups=8))
    with pytest.raises(ValueError) as info:
        call(m)
    assert all(w in str(info.value) for w in words)


def test_unsupported_diffusers_settings_are_named():
    with pytest.raises(ValueError, match="addition_embed_type"):
        config_from_diffusers(dict(TINY_SD1, addition_embed_type="text_time"))


@pytest.mark.slow
def test_full_sd15_unet_matches_diffusers():
    config = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    theirs = UNet2DConditionModel(**config).eval()
    c = config_from_diffusers(theirs.config)
    assert c == UNetConfig.sd1()
    ours = UNetModel(c).eval()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict(), c))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.tensor([500]), ctx),
                                   theirs(x, torch.tensor([500]), encoder_hidden_states=ctx).sample, atol=1e-4, rtol=1e-4)
