"""Attention: multi-head self/cross attention through scaled_dot_product_attention (or xformers when
installed and asked for), the transformer block and the spatial transformer of the latent-diffusion U-Net
(Rombach et al. 2022, sec. 3.3). Parameter names follow the original Stable Diffusion checkpoints."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..random import randn

Tensor = torch.Tensor
ATTENTION_BACKENDS = ("sdpa", "xformers")


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Optional[Tensor] = None,
              upcast: bool = False, backend: str = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(d)) v over `heads` heads; q [B, N, H*d], k/v [B, M, H*d], mask [B, M] (True = keep)."""
    b, n, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if backend == "xformers":
        import xformers.ops as xops  # optional extra; checked in set_attention_backend
        bias = None
        if mask is not None:
            bias = torch.zeros(b, heads, n, k.shape[1], dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = xops.memory_efficient_attention(q.reshape(b, n, heads, d), k.reshape(b, -1, heads, d),
                                              v.reshape(b, -1, heads, d), attn_bias=bias)
        return out.reshape(b, n, inner).to(dtype)
    q, k, v = (z.reshape(b, -1, heads, d).transpose(1, 2) for z in (q, k, v))
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


def check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {backend!r}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as err:
            raise ValueError("attention backend 'xformers' needs the optional extra: pip install 'ldm[xformers]' "
                             "(CUDA only)") from err
    return backend


class CrossAttention(nn.Module):
    """Multi-head attention of queries from x onto keys/values from a context (x itself if none)."""

    def __init__(self, query_dim: int, context_dim: Optional[int], heads: int, dim_head: int,
                 upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.upcast = upcast
        self.backend = "sdpa"
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask, self.upcast,
                        self.backend)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * gelu(b) with [a, b] = proj(x)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual. With
    disable_self_attn the first attention attends to the context too (the x4 upscaler's disable_self_attentions,
    diffusers' only_cross_attention)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: Optional[int], upcast: bool = False,
                 dropout: float = 0.0, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, upcast)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        x = (self.attn1(self.norm1(x), context, mask) if self.disable_self_attn else self.attn1(self.norm1(x))) + x
        x = self.attn2(self.norm2(x), context, mask if context is not None else None) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with a residual around it all."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: Optional[int],
                 use_linear: bool = False, upcast: bool = False, num_groups: int = 32, dropout: float = 0.0,
                 disable_self_attn: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast, dropout, disable_self_attn)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        b, c, h, w = x.shape
        residual = x
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2).contiguous()  # tokens-major, as every layer below reads it
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, mask)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=layout)  # the layout we were given
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class AddedKVAttention(nn.Module):
    """DeepFloyd IF's attention block (diffusers' SimpleCrossAttn blocks): the group-normed feature map's tokens
    attend, in one softmax, to the text tokens (group-normed over their channels, with their own key and value
    projections) and, unless cross_only, to themselves; the output is added to the input. A padding mask hides
    padded text tokens from the keys, but the text's GroupNorm takes its statistics over every token, padding
    included, as IF's does (IF's pipelines pass no mask)."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, num_groups: int = 32,
                 cross_only: bool = False, context_groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.backend = "sdpa"
        self.norm = nn.GroupNorm(num_groups, channels)
        self.norm_context = nn.GroupNorm(context_groups, context_dim)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = None if cross_only else nn.Linear(channels, inner)
        self.to_v = None if cross_only else nn.Linear(channels, inner)
        self.add_k = nn.Linear(context_dim, inner)
        self.add_v = nn.Linear(context_dim, inner)
        self.to_out = nn.Linear(inner, channels)

    def forward(self, x: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        ctx = self.norm_context(context.transpose(1, 2)).transpose(1, 2)
        k, v = self.add_k(ctx), self.add_v(ctx)
        if self.to_k is not None:
            k = torch.cat([k, self.to_k(tokens)], dim=1)
            v = torch.cat([v, self.to_v(tokens)], dim=1)
            if mask is not None:  # the feature tokens are always attended to
                mask = torch.cat([mask, mask.new_ones(b, h * w)], dim=1)
        out = attention(self.to_q(tokens), k, v, self.heads, mask, upcast=True, backend=self.backend)
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)


class AttentionPooling(nn.Module):
    """A text embedding pooled to one vector (DeepFloyd IF, from CLIP's attention pooling): a query made of the
    tokens' mean plus a learned position attends over [that query, tokens] with `heads` heads; no output
    projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention pooling: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.positional_embedding = nn.Parameter(randn((1, dim)) / dim**0.5)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        query = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)
        x = torch.cat([query, x], dim=1)
        return attention(self.q_proj(query), self.k_proj(x), self.v_proj(x), self.heads, upcast=True)[:, 0]


class TextPooling(nn.Module):
    """DeepFloyd IF's pooled-text embedding, added to the time embedding: LayerNorm, attention pooling, a
    projection to the embedding width, LayerNorm."""

    def __init__(self, dim: int, emb_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.pool = AttentionPooling(dim, heads)
        self.proj = nn.Linear(dim, emb_dim)
        self.norm2 = nn.LayerNorm(emb_dim)

    def forward(self, context: Tensor) -> Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(context))))
