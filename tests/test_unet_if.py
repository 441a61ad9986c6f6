"""DeepFloyd IF's U-Nets (diffusers' SimpleCrossAttn / ResnetDownsample blocks: GELU, attention over the text and
the feature map in one softmax, a projected T5 context, attention-pooled text added to the time embedding, ResBlock
resampling and output scales) against diffusers' UNet2DConditionModel on identical random weights."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.nn.unet import UNetConfig, UNetModel
from ldm.nn.unet_diffusers import (config_from_diffusers, config_to_diffusers, state_dict_from_diffusers,
                                   state_dict_to_diffusers)

from test_unet import randomized

pytestmark = pytest.mark.usefixtures("one_thread")

# the layouts of diffusers' own IF tests (stage I; stage II with the noise level timestep-embedded, a narrower
# time embedding with a GELU after it and scaled middle ResBlocks), and stage II with IF-II's ResBlock options
IF_STAGE1 = dict(sample_size=32, layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                 mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                 up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=3, out_channels=6,
                 cross_attention_dim=32, encoder_hid_dim=24, attention_head_dim=8, addition_embed_type="text",
                 addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
                 resnet_time_scale_shift="scale_shift", act_fn="gelu")
IF_STAGE2 = dict(IF_STAGE1, layers_per_block=[1, 2], in_channels=6, class_embed_type="timestep",
                 mid_block_scale_factor=1.414, time_embedding_act_fn="gelu", time_embedding_dim=32)
IF_STAGE2_RES = dict(IF_STAGE2, resnet_skip_time_act=True, resnet_out_scale_factor=2**0.5,
                     only_cross_attention=[False, True], mid_block_only_cross_attention=False)
CASES = [(IF_STAGE1, 0), (IF_STAGE2, 3), (IF_STAGE2_RES, 3)]
IDS = ["stage1", "stage2", "stage2_resblock_options"]


def pair(config: dict, concat: int):
    theirs = randomized(UNet2DConditionModel(**config))
    c = config_from_diffusers(theirs.config, class_labels="noise_level" if concat else "classes",
                              concat_channels=concat)
    ours = UNetModel(c).eval()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict(), c), strict=True)
    return theirs, ours, c


@pytest.mark.parametrize("config, concat", CASES, ids=IDS)
def test_if_unets_match_diffusers(config, concat):
    theirs, ours, c = pair(config, concat)
    assert c.attention_type == "added_kv" and c.act_fn == "gelu" and c.resblock_updown and c.text_embed_dim == 24
    g = torch.Generator().manual_seed(1)
    x, image = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    t, level, ctx = torch.tensor([10, 900]), torch.tensor([20, 250]), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        expected = theirs(torch.cat([x, image], 1) if concat else x, t, encoder_hidden_states=ctx,
                          class_labels=level if concat else None).sample
        got = ours(x, t, ctx, concat=image if concat else None, noise_level=level if concat else None)
    assert got.shape == expected.shape == (2, 6, 16, 16)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("config, concat", CASES, ids=IDS)
def test_if_key_map_and_config_round_trip(config, concat):
    theirs, ours, c = pair(config, concat)
    back = state_dict_to_diffusers(ours.state_dict(), c)
    assert set(back) == set(theirs.state_dict())
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    labels = "noise_level" if concat else "classes"
    assert config_from_diffusers(config_to_diffusers(c), labels, concat) == c
    assert UNetConfig.from_dict(c.to_dict()) == c
    rebuilt = UNet2DConditionModel(**{k: v for k, v in config_to_diffusers(c).items() if not k.startswith("_")})
    rebuilt.load_state_dict(back, strict=True)


@pytest.mark.parametrize("change, words", [
    (dict(cross_attention_norm=None), "cross_attention_norm"),
    (dict(addition_embed_type="image"), "addition_embed_type"),
    (dict(attention_head_dim=[8, 16]), "attention_head_dim"),
    (dict(only_cross_attention=True), "middle block"),
    (dict(mid_block_type="UNetMidBlock2D"), "mid_block_type"),
    (dict(center_input_sample=True), "center_input_sample"),
    (dict(down_block_types=["ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"]), "block types"),
])
def test_unsupported_if_settings_are_named(change, words):
    with pytest.raises(ValueError, match=words):
        config_from_diffusers(dict(IF_STAGE1, **change))


def test_sd_blocks_refuse_if_resblock_options():
    from test_unet import TINY_SD1
    with pytest.raises(ValueError, match="resnet_skip_time_act"):
        config_from_diffusers(dict(TINY_SD1, resnet_skip_time_act=True))
    # only_cross_attention=True reaches no middle block of SD's (UNetMidBlock2DCrossAttn has no such setting)
    assert config_from_diffusers(dict(TINY_SD1, only_cross_attention=True)).disable_self_attentions == (True, True)
    with pytest.raises(ValueError, match="resblock_updown"):
        config_to_diffusers(UNetConfig(model_channels=32, channel_mult=(1, 2), num_groups=8, context_dim=24,
                                       resblock_updown=True))
