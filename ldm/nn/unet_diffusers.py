"""Conversion between this project's U-Net (original SD key names) and diffusers' UNet2DConditionModel:
config.json fields and one key map, generated from the configuration."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .keymap import rename_by_prefix
from .unet import UNetConfig

_RES_INNER = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_ADDED_KV_INNER = {"norm": "group_norm", "norm_context": "norm_cross", "to_q": "to_q", "to_k": "to_k", "to_v": "to_v",
                   "add_k": "add_k_proj", "add_v": "add_v_proj", "to_out": "to_out.0"}
_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0, "norm_eps": 1e-5, "time_embedding_type": "positional",
          "time_cond_proj_dim": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
          "timestep_post_act": None, "center_input_sample": False, "downsample_padding": 1}
# diffusers' block types per attention type: (with attention, without), and the middle block's
_BLOCKS = {"transformer": (("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"),
                           "UNetMidBlock2DCrossAttn"),
           "added_kv": (("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
                        ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), "UNetMidBlock2DSimpleCrossAttn")}
# DeepFloyd IF's settings (read with the added_kv blocks) and their values in every other U-Net
_IF_DEFAULTS = {"resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "cross_attention_norm": None}


def _per_level(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"diffusers config {name} has {len(values)} entries for {n} blocks")
    return values


def config_from_diffusers(d: Mapping[str, Any], class_labels: str = "classes", concat_channels: int = 0) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DConditionModel config.json; unsupported settings raise ValueError.
    class_labels: what the pipeline passes as the U-Net's class_labels, "classes" (y) or "noise_level" (the
    augmentation level of the x4 upscaler and of DeepFloyd IF's stage II); concat_channels: how many of
    in_channels the pipeline concatenates to the sample (the upscaler's low-resolution image)."""
    for key, expected in _FIXED.items():
        if key in d and d[key] != expected and not (key == "norm_eps" and abs(d[key] - expected) < 1e-12):
            raise ValueError(f"unsupported diffusers U-Net setting {key}={d[key]!r} (supported: {expected!r})")
    boc = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(boc)
    if any(c % boc[0] for c in boc):
        raise ValueError(f"block_out_channels {boc} must be multiples of the first")
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))
    up = list(d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)))
    kind = "added_kv" if any(t in _BLOCKS["added_kv"][0] for t in down) else "transformer"
    (down_types, up_types, mid_attn) = _BLOCKS[kind]
    attn_levels = [t == down_types[0] for t in down]
    if any(t not in down_types for t in down) or [t == up_types[0] for t in up] != attn_levels[::-1] or \
            any(t not in up_types for t in up):
        raise ValueError(f"unsupported block types down={down} up={up}")
    mid = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")  # diffusers' default, whatever the blocks
    if mid != mid_attn:  # (diffusers' UNetMidBlock2D has one ResBlock, ours two)
        raise ValueError(f"unsupported mid_block_type {mid!r} with down blocks {down} (supported: {mid_attn!r})")
    if kind == "transformer":
        for key, expected in _IF_DEFAULTS.items():
            if d.get(key, expected) != expected:
                raise ValueError(f"unsupported diffusers U-Net setting {key}={d[key]!r} with {down_types[0]}")
    elif d.get("cross_attention_norm") != "group_norm":
        raise ValueError(f"unsupported cross_attention_norm {d.get('cross_attention_norm')!r} with {down_types[0]} "
                         "(supported: 'group_norm', as DeepFloyd IF)")
    if d.get("addition_embed_type") not in (None, "text") or d.get("encoder_hid_dim_type") not in (None, "text_proj"):
        raise ValueError(f"unsupported addition_embed_type {d.get('addition_embed_type')!r} / encoder_hid_dim_type "
                         f"{d.get('encoder_hid_dim_type')!r} (supported: 'text' / 'text_proj', as DeepFloyd IF)")
    layers = _per_level(d.get("layers_per_block", 2), n, "layers_per_block")
    heads = _per_level(d.get("num_attention_heads") or d.get("attention_head_dim", 8), n, "attention_head_dim")
    if kind == "added_kv":  # SimpleCrossAttn blocks read attention_head_dim as the head width
        if len(set(heads)) != 1:
            raise ValueError(f"attention_head_dim {heads}: per-block head widths are not supported with "
                             f"{down_types[0]}")
        num_heads, head_channels = -1, heads[0]
    elif len(set(heads)) == 1:
        num_heads, head_channels = heads[0], -1
    elif len({c // h for c, h in zip(boc, heads)}) == 1:
        num_heads, head_channels = -1, boc[0] // heads[0]
    else:
        raise ValueError(f"per-block heads {heads} are neither constant in count nor in width")
    depth = _per_level(d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    class_type = d.get("class_embed_type")
    num_classes = adm = level_embed = None
    num_levels = 1000
    if class_labels == "noise_level" and class_type is None and d.get("num_class_embeds") is not None:
        level_embed, num_levels = "table", d["num_class_embeds"]
    elif class_labels == "noise_level" and class_type == "timestep":
        level_embed = "timestep"
    elif class_labels == "noise_level":
        raise ValueError(f"a noise-level U-Net needs num_class_embeds or class_embed_type='timestep'; got "
                         f"class_embed_type={class_type!r}")
    elif class_type is None and d.get("num_class_embeds") is not None:
        num_classes = d["num_class_embeds"]
    elif class_type == "projection":
        adm = d["projection_class_embeddings_input_dim"]
    elif class_type is not None:
        raise ValueError(f"unsupported class_embed_type {class_type!r}")
    only_cross = _per_level(d.get("only_cross_attention", False), n, "only_cross_attention")
    mid_cross_only = d.get("mid_block_only_cross_attention")
    if mid_cross_only is None and isinstance(d.get("only_cross_attention"), bool):
        mid_cross_only = d["only_cross_attention"]
    if mid_cross_only and kind == "added_kv":  # (diffusers' UNetMidBlock2DCrossAttn has no such setting)
        raise ValueError("cross-attention only in the middle block (mid_block_only_cross_attention) is not supported")
    act = d.get("act_fn", "silu")
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=layers[0] if len(set(layers)) == 1 else tuple(layers),
        attention_resolutions=tuple(2**i for i, a in enumerate(attn_levels) if a), num_heads=num_heads,
        num_head_channels=head_channels, transformer_depth=depth[0] if len(set(depth)) == 1 else tuple(depth),
        context_dim=d.get("cross_attention_dim", 1280), use_linear_in_transformer=d.get("use_linear_projection", False),
        upcast_attention=d.get("upcast_attention", False),
        use_scale_shift_norm=d.get("resnet_time_scale_shift", "default") == "scale_shift",
        num_classes=num_classes, adm_in_channels=adm, dropout=d.get("dropout", 0.0),
        num_groups=d.get("norm_num_groups", 32), mid_attention=mid == mid_attn,
        sample_size=d.get("sample_size") or 64, concat_channels=concat_channels, noise_level_embed=level_embed,
        num_noise_levels=num_levels, disable_self_attentions=tuple(only_cross) if any(only_cross) else None,
        act_fn=act, attention_type=kind, resblock_updown=kind == "added_kv", text_embed_dim=d.get("encoder_hid_dim"),
        text_pool_heads=d.get("addition_embed_type_num_heads", 64) if d.get("addition_embed_type") else None,
        time_embed_dim=d.get("time_embedding_dim"), time_embed_act=d.get("time_embedding_act_fn"),
        res_skip_time_act=d.get("resnet_skip_time_act", False),
        res_output_scale=d.get("resnet_out_scale_factor", 1.0), mid_output_scale=d.get("mid_block_scale_factor", 1))


def _check_writable(c: UNetConfig) -> None:
    if c.resblock_updown != (c.attention_type == "added_kv"):
        raise ValueError("diffusers' UNet2DConditionModel resamples with ResBlocks exactly in DeepFloyd IF's blocks "
                         f"(attention_type 'added_kv'); got resblock_updown={c.resblock_updown} with "
                         f"{c.attention_type!r} attention")
    if c.attention_type == "transformer" and (c.res_skip_time_act or c.res_output_scale != 1):
        raise ValueError("diffusers' UNet2DConditionModel applies res_skip_time_act and res_output_scale only in "
                         "DeepFloyd IF's blocks (attention_type 'added_kv')")
    if not c.mid_attention:
        raise ValueError("diffusers' plain middle block (UNetMidBlock2D) has one ResBlock; this U-Net's has two")
    if c.attention_type == "added_kv" and c.num_head_channels == -1 and \
            len({c.model_channels * m // c.num_heads for m in c.channel_mult}) > 1:
        raise ValueError("diffusers' added-KV blocks take one head width (attention_head_dim); this U-Net has a fixed "
                         "head count over levels of different widths")
    if c.resample_first or c.skip_scale != 1:
        raise ValueError("diffusers' UNet2DConditionModel has no Efficient U-Net layout (resample_first, "
                         "skip_scale)")


def config_to_diffusers(c: UNetConfig) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config.json for this configuration."""
    _check_writable(c)
    if c.noise_level_embed is not None and (c.num_classes is not None or c.adm_in_channels is not None):
        raise ValueError("diffusers' U-Net has one class embedding: a class/vector input and a noise level "
                         "cannot both be written")
    n = len(c.channel_mult)
    boc = [c.model_channels * m for m in c.channel_mult]
    attn = [2**i in c.attention_resolutions for i in range(n)]
    heads = [c.heads_for(ch)[1 if c.attention_type == "added_kv" else 0] for ch in boc]
    down_types, up_types, mid_attn = _BLOCKS[c.attention_type]
    d = {"_class_name": "UNet2DConditionModel", "sample_size": c.sample_size, "in_channels": c.in_channels,
         "out_channels": c.out_channels, "block_out_channels": boc, "layers_per_block": list(c.num_res_blocks)
         if isinstance(c.num_res_blocks, tuple) else c.num_res_blocks,
         "down_block_types": [down_types[0] if a else down_types[1] for a in attn],
         "up_block_types": [up_types[0] if a else up_types[1] for a in reversed(attn)],
         "mid_block_type": mid_attn,
         "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
         "transformer_layers_per_block": list(c.transformer_depth) if isinstance(c.transformer_depth, tuple)
         else c.transformer_depth, "cross_attention_dim": c.context_dim,
         "use_linear_projection": c.use_linear_in_transformer, "upcast_attention": c.upcast_attention,
         "resnet_time_scale_shift": "scale_shift" if c.use_scale_shift_norm else "default",
         "norm_num_groups": c.num_groups, "dropout": c.dropout, "center_input_sample": False,
         "mid_block_scale_factor": c.mid_output_scale, **{k: v for k, v in _FIXED.items()},
         "act_fn": c.act_fn, "encoder_hid_dim": c.text_embed_dim, "time_embedding_dim": c.time_embed_dim,
         "time_embedding_act_fn": c.time_embed_act, "resnet_skip_time_act": c.res_skip_time_act,
         "resnet_out_scale_factor": c.res_output_scale,
         "cross_attention_norm": "group_norm" if c.attention_type == "added_kv" else None,
         "addition_embed_type": None if c.text_pool_heads is None else "text"}
    if c.text_pool_heads is not None:
        d["addition_embed_type_num_heads"] = c.text_pool_heads
    if c.num_classes is not None:
        d["num_class_embeds"] = c.num_classes
    if c.adm_in_channels is not None:
        d.update(class_embed_type="projection", projection_class_embeddings_input_dim=c.adm_in_channels)
    if c.noise_level_embed == "table":
        d["num_class_embeds"] = c.num_noise_levels
    if c.noise_level_embed == "timestep":
        d["class_embed_type"] = "timestep"
    if c.disable_self_attentions:
        d["only_cross_attention"] = list(c.disable_self_attentions)
    return d


def _prefix_pairs(c: UNetConfig) -> dict[str, str]:
    """ours -> diffusers module prefixes, down to the leaf modules of every ResBlock."""
    _check_writable(c)
    pairs = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    if c.num_classes is not None:
        pairs["label_emb"] = "class_embedding"
    if c.adm_in_channels is not None:
        pairs.update({"label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2"})
    if c.noise_level_embed == "table":
        pairs["noise_level_emb"] = "class_embedding"
    if c.noise_level_embed == "timestep":
        pairs.update({"noise_level_emb.0": "class_embedding.linear_1", "noise_level_emb.2": "class_embedding.linear_2"})
    pairs.update({"context_proj": "encoder_hid_proj", "text_pool": "add_embedding"})

    def res(ours: str, theirs: str):
        pairs.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _RES_INNER.items()})

    def attention(ours: str, theirs: str):
        if c.attention_type == "added_kv":
            pairs.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _ADDED_KV_INNER.items()})
        else:
            pairs[ours] = theirs

    for k, block in enumerate(c.input_layout()):
        if block[0] == "res":
            _, i, j = block
            res(f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}")
            if 2**i in c.attention_resolutions:
                attention(f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}")
        elif block[0] == "down" and c.resblock_updown:
            res(f"input_blocks.{k}.0", f"down_blocks.{block[1]}.downsamplers.0")
        elif block[0] == "down":
            pairs[f"input_blocks.{k}.0.op"] = f"down_blocks.{block[1]}.downsamplers.0.conv"
    res("middle_block.0", "mid_block.resnets.0")
    if c.mid_attention:
        attention("middle_block.1", "mid_block.attentions.0")
    res(f"middle_block.{2 if c.mid_attention else 1}", "mid_block.resnets.1")
    n = len(c.channel_mult)
    for k, (level, j, upsamples) in enumerate(c.output_layout()):
        attn = 2**level in c.attention_resolutions
        res(f"output_blocks.{k}.0", f"up_blocks.{n - 1 - level}.resnets.{j}")
        if attn:
            attention(f"output_blocks.{k}.1", f"up_blocks.{n - 1 - level}.attentions.{j}")
        if upsamples and c.resblock_updown:
            res(f"output_blocks.{k}.{2 if attn else 1}", f"up_blocks.{n - 1 - level}.upsamplers.0")
        elif upsamples:
            pairs[f"output_blocks.{k}.{2 if attn else 1}.conv"] = f"up_blocks.{n - 1 - level}.upsamplers.0.conv"
    return pairs


def state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], c: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> ours."""
    inverse = {theirs: ours for ours, theirs in _prefix_pairs(c).items()}
    return rename_by_prefix(sd, inverse, "diffusers U-Net state dict")


def state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], c: UNetConfig) -> dict[str, torch.Tensor]:
    """Our keys -> diffusers UNet2DConditionModel."""
    return rename_by_prefix(sd, _prefix_pairs(c), "U-Net state dict")
