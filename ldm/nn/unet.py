"""The time-conditioned U-Net with cross-attention of latent diffusion (Rombach et al. 2022), in the
configuration space of Stable Diffusion 1.x / 2.x and of improved DDPM (scale-shift norm, resblock up/down,
learned variance as 2x output channels). It knows nothing about diffusion: f(x, t, context, y) -> tensor.

Module names follow the original SD checkpoints (`model.diffusion_model.*`), so those load without a key map.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import JsonConfig
from .attention import AddedKVAttention, CrossAttention, SpatialTransformer, TextPooling, check_backend
from .layers import ACTIVATIONS, Downsample, ResBlock, Upsample, activation, timestep_embedding

Tensor = torch.Tensor


NOISE_LEVEL_EMBEDS = (None, "timestep", "table")
ATTENTION_TYPES = ("transformer", "added_kv")


@dataclass(frozen=True)
class UNetConfig(JsonConfig):
    """U-Net hyper-parameters, named as in the original LDM configs.

    attention_resolutions: downsampling rates (1, 2, 4, ...) at which transformer blocks are used.
    num_heads / num_head_channels: fixed head count (SD1: 8) or fixed head width (SD2: 64; then num_heads=-1).
    transformer_depth: one value or one per level. context_dim: text-embedding width (None: self-attention only).
    num_classes: class-label embedding; adm_in_channels: a projected vector (pooled text / image / noise-level
    embedding, `y`) added to the time embedding. concat_channels: channels of an image concatenated to x before the
    first convolution (a super-resolution model's low-resolution input; counted in in_channels). noise_level_embed:
    how the augmentation level of that input (`noise_level`, a timestep of the augmentation schedule) is embedded
    and added to the time embedding: "timestep" (sinusoidal + MLP, as DeepFloyd IF's class_embed_type="timestep")
    or "table" (one learned vector per integer level, as the x4 upscaler's num_class_embeds).
    sample_size: native latent size (SD1: 64 -> 512 px).
    mask_context: whether pipelines pass the text padding mask (Stable Diffusion attends to padding tokens).

    Imagen's Efficient U-Net (Saharia et al. 2022, appendix B.1) as three options: num_res_blocks per level (more
    blocks at the low resolutions), skip_scale (encoder-to-decoder skips multiplied by it; Imagen: 1/sqrt(2)) and
    resample_first (every level downsamples before its blocks, the first one too, and upsamples after them, so no
    block runs at full resolution; the input convolution's output is then not a skip).

    DeepFloyd IF's U-Nets (resblock_updown, use_scale_shift_norm and): act_fn "gelu" for SiLU everywhere;
    attention_type "added_kv" (AddedKVAttention: the feature tokens attend to the text tokens and to themselves in
    one softmax) in place of transformer blocks; text_embed_dim: the text encoder's width, projected to
    context_dim once (`context_proj`); text_pool_heads: the text embedding attention-pooled with that many heads
    and added to the time embedding (`text_pool`); time_embed_dim: the embedding width (None: 4 model_channels);
    time_embed_act: a nonlinearity on the summed embedding; res_skip_time_act: ResBlocks project the embedding
    without a nonlinearity first; res_output_scale / mid_output_scale: ResBlock outputs divided by it (IF's
    super-resolution U-Nets: sqrt(2)), in the middle block the latter.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int | tuple[int, ...] = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: Optional[int] = 768
    use_linear_in_transformer: bool = False
    upcast_attention: bool = False
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_classes: Optional[int] = None
    adm_in_channels: Optional[int] = None
    dropout: float = 0.0
    num_groups: int = 32
    mid_attention: bool = True
    sample_size: int = 64  # the latent size it was trained at (does not change the network)
    mask_context: bool = False  # trained with padding tokens masked out of cross-attention (SD: no)
    concat_channels: int = 0
    noise_level_embed: Optional[str] = None
    num_noise_levels: int = 1000
    disable_self_attentions: Optional[tuple[bool, ...]] = None  # per level: cross-attention in place of self
    skip_scale: float = 1.0
    resample_first: bool = False
    act_fn: str = "silu"
    attention_type: str = "transformer"
    text_embed_dim: Optional[int] = None
    text_pool_heads: Optional[int] = None
    time_embed_dim: Optional[int] = None
    time_embed_act: Optional[str] = None
    res_skip_time_act: bool = False
    res_output_scale: float = 1.0
    mid_output_scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        # a set of rates; kept sorted so that configs that mean the same compare equal
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions))))
        if self.disable_self_attentions is not None:
            object.__setattr__(self, "disable_self_attentions", tuple(bool(v) for v in self.disable_self_attentions))
            if len(self.disable_self_attentions) != len(self.channel_mult):
                raise ValueError(f"disable_self_attentions has {len(self.disable_self_attentions)} entries for "
                                 f"{len(self.channel_mult)} levels")
        for name in ("transformer_depth", "num_res_blocks"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        blocks = self.num_res_blocks
        if isinstance(blocks, tuple) and len(blocks) != len(self.channel_mult):
            raise ValueError(f"num_res_blocks has {len(blocks)} entries for {len(self.channel_mult)} levels")
        if not all(isinstance(b, int) and b >= 1 for b in (blocks if isinstance(blocks, tuple) else (blocks,))):
            raise ValueError(f"num_res_blocks must be an int >= 1 or one such int per level; got {blocks!r}")
        if not self.skip_scale > 0:
            raise ValueError(f"skip_scale must be > 0; got {self.skip_scale!r}")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (the other one to -1)")
        depth = self.transformer_depth
        if isinstance(depth, tuple) and len(depth) != len(self.channel_mult):
            raise ValueError(f"transformer_depth has {len(depth)} entries for {len(self.channel_mult)} levels")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("num_classes and adm_in_channels are alternatives; set at most one")
        if not 0 <= self.concat_channels < self.in_channels:
            raise ValueError(f"concat_channels must be in [0, in_channels={self.in_channels}); "
                             f"got {self.concat_channels}")
        if self.noise_level_embed not in NOISE_LEVEL_EMBEDS:
            raise ValueError(f"noise_level_embed must be one of {NOISE_LEVEL_EMBEDS}; got {self.noise_level_embed!r}")
        if self.act_fn not in ACTIVATIONS or self.time_embed_act not in (None, *ACTIVATIONS):
            raise ValueError(f"act_fn and time_embed_act must be one of {ACTIVATIONS} (time_embed_act: or None); "
                             f"got {self.act_fn!r}, {self.time_embed_act!r}")
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}; got {self.attention_type!r}")
        if self.context_dim is None and (self.attention_type == "added_kv" or self.text_embed_dim is not None
                                         or self.text_pool_heads is not None):
            raise ValueError("added_kv attention, text_embed_dim and text_pool_heads need a context_dim")
        if not (self.res_output_scale > 0 and self.mid_output_scale > 0):
            raise ValueError("res_output_scale and mid_output_scale must be > 0")

    @property
    def emb_dim(self) -> int:
        """Width of the time embedding (and of everything added to it)."""
        return self.time_embed_dim or 4 * self.model_channels

    @property
    def text_dim(self) -> Optional[int]:
        """Width of the text embedding the U-Net takes as context."""
        return self.text_embed_dim or self.context_dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def num_downsamples(self) -> int:
        return len(self.channel_mult) - (0 if self.resample_first else 1)

    def blocks_at(self, level: int) -> int:
        return self.num_res_blocks[level] if isinstance(self.num_res_blocks, tuple) else self.num_res_blocks

    def input_layout(self) -> list[tuple]:
        """The encoder's blocks in order: ("conv_in",), ("res", level, j), ("down", level); each one's output is a
        skip except conv_in's under resample_first."""
        layout, last = [("conv_in",)], len(self.channel_mult) - 1
        for level in range(len(self.channel_mult)):
            if self.resample_first:
                layout.append(("down", level))
            layout += [("res", level, j) for j in range(self.blocks_at(level))]
            if not self.resample_first and level != last:
                layout.append(("down", level))
        return layout

    def output_layout(self) -> list[tuple[int, int, bool]]:
        """The decoder's blocks in order: (level, j, upsamples at its end), blocks_at(level) + 1 per level."""
        layout = []
        for level in reversed(range(len(self.channel_mult))):
            n = self.blocks_at(level) + 1
            layout += [(level, j, j == n - 1 and (level > 0 or self.resample_first)) for j in range(n)]
        return layout

    def depth_at(self, level: int) -> int:
        return self.transformer_depth[level] if isinstance(self.transformer_depth, tuple) else self.transformer_depth

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) for a block of `channels` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    @classmethod
    def sd1(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion 1.x (v1-inference.yaml)."""
        return cls(**overrides)

    @classmethod
    def sd2(cls, **overrides) -> "UNetConfig":
        """Stable Diffusion 2.x (v2-inference(-v).yaml): head width 64, 1024-d OpenCLIP context, linear proj."""
        base = dict(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
        return cls(**{**base, **overrides})


class TimestepEmbedSequential(nn.ModuleList):
    """A block of layers, each given what it needs: emb for ResBlocks, context for transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Optional[Tensor], mask: Optional[Tensor],
                upsample_size: Optional[tuple[int, int]] = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, (SpatialTransformer, AddedKVAttention)):
                x = layer(x, context, mask)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = False
        mc, emb_dim = c.model_channels, c.emb_dim

        def mlp(dim_in, act=c.act_fn):
            return nn.Sequential(nn.Linear(dim_in, emb_dim), activation(act), nn.Linear(emb_dim, emb_dim))

        self.time_embed = mlp(mc)
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)
        elif c.adm_in_channels is not None:  # SiLU whatever act_fn, as diffusers' projection class embedding
            self.label_emb = nn.Sequential(mlp(c.adm_in_channels, "silu"))
        if c.noise_level_embed == "timestep":
            self.noise_level_emb = mlp(mc)
        elif c.noise_level_embed == "table":
            self.noise_level_emb = nn.Embedding(c.num_noise_levels, emb_dim)
        if c.text_embed_dim is not None:
            self.context_proj = nn.Linear(c.text_embed_dim, c.context_dim)
        if c.text_pool_heads is not None:
            self.text_pool = TextPooling(c.text_dim, emb_dim, c.text_pool_heads)
        self.time_embed_act = None if c.time_embed_act is None else activation(c.time_embed_act)

        def res(ch_in, ch_out, middle=False, **kw):
            return ResBlock(ch_in, emb_dim, ch_out, c.dropout, c.use_scale_shift_norm, num_groups=c.num_groups,
                            act_fn=c.act_fn, skip_time_act=c.res_skip_time_act,
                            output_scale=c.mid_output_scale if middle else c.res_output_scale, **kw)

        def transformer(ch, level, middle=False):
            heads, dim_head = c.heads_for(ch)
            no_self = bool(c.disable_self_attentions and not middle and c.disable_self_attentions[level])
            if c.attention_type == "added_kv":
                return AddedKVAttention(ch, heads, dim_head, c.context_dim, c.num_groups, no_self)
            return SpatialTransformer(ch, heads, dim_head, c.depth_at(level), c.context_dim,
                                      c.use_linear_in_transformer, c.upcast_attention, c.num_groups, c.dropout,
                                      no_self)

        self.input_blocks = nn.ModuleList()
        self._downsamples = {i for i, b in enumerate(c.input_layout()) if b[0] == "down"}
        self._upsamples = [up for _, _, up in c.output_layout()]
        skip_channels, ch, ds = [], mc, 1
        for block in c.input_layout():
            kind, level = block[0], block[1] if len(block) > 1 else 0
            if kind == "conv_in":
                layers = [nn.Conv2d(c.in_channels, mc, 3, padding=1)]
            elif kind == "down":
                layers = [res(ch, ch, down=True) if c.resblock_updown else Downsample(ch)]
                ds *= 2
            else:
                layers = [res(ch, c.channel_mult[level] * mc)]
                ch = c.channel_mult[level] * mc
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, level))
            self.input_blocks.append(TimestepEmbedSequential(layers))
            if not (kind == "conv_in" and c.resample_first):
                skip_channels.append(ch)
        middle = [transformer(ch, len(c.channel_mult) - 1, middle=True)] if c.mid_attention else []
        middle = [res(ch, ch, middle=True)] + middle + [res(ch, ch, middle=True)]
        self.middle_block = TimestepEmbedSequential(middle)
        self.output_blocks = nn.ModuleList()
        for level, _, upsamples in c.output_layout():
            layers = [res(ch + skip_channels.pop(), mc * c.channel_mult[level])]
            ch = mc * c.channel_mult[level]
            if ds in c.attention_resolutions:
                layers.append(transformer(ch, level))
            if upsamples:
                layers.append(res(ch, ch, up=True) if c.resblock_updown else Upsample(ch))
                ds //= 2
            self.output_blocks.append(TimestepEmbedSequential(layers))
        self.out = nn.Sequential(nn.GroupNorm(c.num_groups, ch), activation(c.act_fn),
                                 nn.Conv2d(mc, c.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def set_attention_backend(self, backend: str) -> None:
        """"sdpa" (default, torch's scaled_dot_product_attention) or "xformers" (optional extra, CUDA)."""
        check_backend(backend)
        for module in self.modules():
            if isinstance(module, (CrossAttention, AddedKVAttention)):
                module.backend = backend

    def _run(self, block: TimestepEmbedSequential, *args) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor, context: Optional[Tensor] = None, y: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None, concat: Optional[Tensor] = None,
                noise_level: Optional[Tensor] = None) -> Tensor:
        """x [B, C, H, W], t [B] (or a scalar), context [B, L, context_dim], y: labels [B] or vectors
        [B, adm_in_channels], context_mask [B, L] (True = attend), concat [B, concat_channels, H, W] (joined to x
        on the channels), noise_level [B]: concat's augmentation level (integer levels for "table")."""
        c = self.config
        channels = c.in_channels - c.concat_channels
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"x must have shape [B, {channels}, H, W]; got {tuple(x.shape)}")
        if (concat is None) != (c.concat_channels == 0):
            raise ValueError(f"this U-Net takes an image of {c.concat_channels} channels as concat; got "
                             f"{'none' if concat is None else tuple(concat.shape)}")
        if concat is not None:
            if concat.ndim != 4 or concat.shape[1] != c.concat_channels or concat.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"concat must have shape [B, {c.concat_channels}, {x.shape[-2]}, {x.shape[-1]}] "
                                 f"(x's size); got {tuple(concat.shape)}")
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if (noise_level is None) != (c.noise_level_embed is None):
            raise ValueError("pass noise_level exactly when the U-Net embeds one (noise_level_embed="
                             f"{c.noise_level_embed!r})")
        if c.context_dim is not None and (context is None or context.shape[-1] != c.text_dim):
            raise ValueError(f"this U-Net cross-attends to a context of width {c.text_dim}; got "
                             f"{None if context is None else tuple(context.shape)}")
        if (c.num_classes is not None or c.adm_in_channels is not None) and y is None:
            raise ValueError("this U-Net is class/vector-conditioned; pass y")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, c.model_channels).to(self.dtype))
        if y is not None:
            emb = emb + self.label_emb(y if c.num_classes is not None else y.to(self.dtype))
        if noise_level is not None:
            level = torch.as_tensor(noise_level, device=x.device)
            level = level.expand(x.shape[0]) if level.ndim == 0 else level
            emb = emb + (self.noise_level_emb(level.long()) if c.noise_level_embed == "table" else
                         self.noise_level_emb(timestep_embedding(level, c.model_channels).to(self.dtype)))
        context = None if context is None else context.to(self.dtype)
        if c.text_pool_heads is not None:
            emb = emb + self.text_pool(context)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if c.text_embed_dim is not None:
            context = self.context_proj(context)
        h = x.to(self.dtype)
        skips, sizes = [], []  # sizes: where each upsampling lands (the skip it meets, or the input's size)
        for i, block in enumerate(self.input_blocks):
            if i in self._downsamples:
                sizes.append(tuple(h.shape[-2:]))
            h = self._run(block, h, emb, context, context_mask)
            if i or not c.resample_first:
                skips.append(h if c.skip_scale == 1 else h * c.skip_scale)
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block, upsamples in zip(self.output_blocks, self._upsamples):
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context, context_mask, sizes.pop() if upsamples else None)
        return self.out(h)


def load_shallower(model: UNetModel, state_dict: dict[str, Tensor]) -> list[str]:
    """Load the weights of a U-Net whose transformers have fewer blocks into `model` (same config otherwise), and
    start each block the source lacks as the identity: the outputs of its self-attention, cross-attention and
    feed-forward are zeroed, so every block is x + 0 and the deeper model computes exactly what the source did
    (function-preserving growth, as in Net2Net and ControlNet's zero layers). Returns the names of the new blocks.
    Any other mismatch (a missing ResBlock, a different width) is an error naming the parameters."""
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict))
    block_of = {k: m[1] for k in own if (m := re.match(r"(.+\.transformer_blocks\.\d+)\.", k))}
    present = {block_of[k] for k in state_dict if k in block_of}
    new_blocks = sorted({block_of[k] for k in missing if k in block_of} - present)  # blocks the source has none of
    other = [k for k in missing if block_of.get(k) not in new_blocks]
    if unexpected or other:
        raise ValueError("load_shallower: the source differs in more than transformer depth; "
                         f"unexpected {unexpected[:5]}, missing {other[:5]} (of {len(unexpected)} / {len(other)})")
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise ValueError(f"load_shallower: {k} has shape {tuple(v.shape)} in the source, "
                             f"{tuple(own[k].shape)} here")
    model.load_state_dict(state_dict, strict=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in new_blocks:
            block = modules[name]
            for out in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[-1]):
                out.weight.zero_()
                out.bias.zero_()
    return new_blocks
