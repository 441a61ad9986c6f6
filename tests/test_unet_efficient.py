"""Imagen's Efficient U-Net options (per-level residual blocks, scaled skips, resampling before the blocks)."""
import math

import pytest
import torch

from ldm.nn.layers import ResBlock
from ldm.nn.unet import UNetConfig, UNetModel
from ldm.nn.unet_diffusers import config_to_diffusers

BASE = dict(in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(4,), num_heads=2, context_dim=8, num_groups=4)


def inputs(size=(24, 40)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *size, generator=g), torch.tensor([5, 700]), torch.randn(2, 5, 8, generator=g)


def randomized(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def reference_forward(model: UNetModel, x, t, ctx, scale: float):
    """The forward pass written out from the definition: every skip multiplied by `scale` before it is joined."""
    from ldm.nn.layers import timestep_embedding
    emb = model.time_embed(timestep_embedding(t, model.config.model_channels))
    h, skips = x, []
    for block in model.input_blocks:
        h = block(h, emb, ctx, None)
        skips.append(h * scale)
    h = model.middle_block(h, emb, ctx, None)
    for block in model.output_blocks:
        skip = skips.pop()
        h = block(torch.cat([h, skip], 1), emb, ctx, None, tuple(skips[-1].shape[-2:]) if skips else None)
    return model.out(h)


def test_skip_scale_multiplies_the_skips_and_adds_no_weights():
    plain = randomized(UNetModel(UNetConfig(**BASE)))
    scaled = UNetModel(UNetConfig(**BASE, skip_scale=2**-0.5)).eval()
    assert set(scaled.state_dict()) == set(plain.state_dict())
    scaled.load_state_dict(plain.state_dict())
    x, t, ctx = inputs()
    with torch.no_grad():
        got = scaled(x, t, ctx)
        torch.testing.assert_close(got, reference_forward(plain, x, t, ctx, 2**-0.5), atol=1e-5, rtol=0)
        assert (got - plain(x, t, ctx)).abs().max() > 1e-2  # the scale matters


def test_per_level_blocks_build_that_many_resblocks():
    c = UNetConfig(**dict(BASE, num_res_blocks=(1, 2, 4)))
    assert c.num_res_blocks == (1, 2, 4) and UNetConfig.from_dict(c.to_dict()) == c
    model = UNetModel(c)
    down = [b for b in c.input_layout() if b[0] == "res"]
    assert [sum(1 for b in down if b[1] == level) for level in range(3)] == [1, 2, 4]
    assert [sum(1 for lv, _, _ in c.output_layout() if lv == level) for level in range(3)] == [2, 3, 5]
    x, t, ctx = inputs()
    assert model(x, t, ctx).shape == x.shape


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (20, 28)])
def test_resample_first_runs_no_block_at_full_resolution(size):
    c = UNetConfig(**BASE, resample_first=True)
    model = randomized(UNetModel(c))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
             for m in model.modules() if isinstance(m, ResBlock)]
    x, t, ctx = inputs(size)
    with torch.no_grad():
        out = model(x, t, ctx)
    for h in hooks:
        h.remove()
    assert out.shape == x.shape
    assert seen and all(s[0] <= math.ceil(size[0] / 2) for s in seen)
    assert min(s[0] for s in seen) == math.ceil(size[0] / 8)  # 3 levels, 3 downsamplings (the plain U-Net: 2)
    assert c.num_downsamples == 3 and UNetConfig(**BASE).num_downsamples == 2


def test_resample_first_is_cheaper():
    """Fewer multiply-adds: the work at full resolution is only the two convolutions at the ends."""
    def flops(config):
        total = 0

        def count(m, a, out):
            nonlocal total
            total += out.numel() * m.weight[0].numel()
        model = UNetModel(config)
        hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model(*inputs((32, 32)))
        for h in hooks:
            h.remove()
        return total
    assert flops(UNetConfig(**BASE, resample_first=True)) < 0.5 * flops(UNetConfig(**BASE))


@pytest.mark.parametrize("change, words", [
    (dict(num_res_blocks=(1, 2)), ["num_res_blocks", "3 levels"]),
    (dict(num_res_blocks=(1, 0, 2)), ["num_res_blocks", ">= 1"]),
    (dict(skip_scale=0), ["skip_scale", "> 0"]),
])
def test_bad_options_are_named(change, words):
    with pytest.raises(ValueError) as info:
        UNetConfig(**dict(BASE, **change))
    assert all(w in str(info.value) for w in words)


@pytest.mark.parametrize("change", [dict(resample_first=True), dict(skip_scale=0.5)])
def test_diffusers_cannot_hold_the_efficient_layout(change):
    with pytest.raises(ValueError, match="Efficient U-Net"):
        config_to_diffusers(UNetConfig(**BASE, **change))
