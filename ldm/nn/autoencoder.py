"""First-stage autoencoders of latent diffusion (Rombach et al. 2022, sec. 3.1): a KL-regularized VAE (the
Stable Diffusion VAE) and a VQ-regularized one, behind one `encode(img) -> z` / `decode(z) -> img` interface
with the latent scale (and shift) applied inside.

Module names follow the original CompVis checkpoints (`first_stage_model.*` minus the prefix), so a
single-file Stable Diffusion checkpoint loads with no key map; diffusers folders go through
`ldm.nn.autoencoder_keys`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import JsonConfig
from ldm.random import Generator, randn

Tensor = torch.Tensor
KINDS = ("kl", "vq")


@dataclass(frozen=True)
class AutoencoderConfig(JsonConfig):
    """Autoencoder hyper-parameters, named as in the original LDM first-stage configs.

    ch / ch_mult: width of level i is ch * ch_mult[i]; the image is downsampled 2x between levels.
    z_channels: encoder output channels (x2 for the KL mean and log-variance); embed_dim: latent channels after
    quant_conv (the diffusion model's input). attn_resolutions: downsampling rates (1, 2, 4, ...) whose
    res blocks are followed by self-attention, as in UNetConfig; the original lists absolute resolutions,
    rate = resolution // attn_res (every SD VAE has none). mid_attention: attention in the middle block.
    resolution: training image size (diffusers' sample_size), informational. scaling_factor / shift_factor:
    z = scaling_factor * (latent - shift_factor) (Rombach et al. 2022, sec. 4.3.2: unit-variance latents).
    n_embed / beta: VQ codebook size and commitment weight (van den Oord et al. 2017, eq. 3).
    """

    kind: str = "kl"
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    attn_resolutions: tuple[int, ...] = ()
    mid_attention: bool = True
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-6
    resolution: int = 256
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    n_embed: int = 8192
    beta: float = 0.25

    def __post_init__(self):
        for name in ("ch_mult", "attn_resolutions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.ch_mult:
            raise ValueError("ch_mult must have at least one level")
        widths = [self.ch * m for m in self.ch_mult]
        bad = [w for w in widths if w % self.num_groups]
        if bad:
            raise ValueError(f"num_groups={self.num_groups} must divide every level width, not {bad}")
        rates = [2**i for i in range(len(self.ch_mult))]
        bad = [r for r in self.attn_resolutions if r not in rates]
        if bad:
            raise ValueError(f"attn_resolutions must be downsampling rates among {rates}, got {bad}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def double_z(self) -> bool:
        """The KL encoder outputs mean and log-variance; the VQ encoder only the latent."""
        return self.kind == "kl"

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    @classmethod
    def sd(cls, **overrides) -> "AutoencoderConfig":
        """Stable Diffusion 1.x / 2.x KL-f8 VAE (v1-inference.yaml first_stage_config)."""
        return cls(**overrides)

    @classmethod
    def sdxl(cls, **overrides) -> "AutoencoderConfig":
        """SDXL VAE: the SD architecture at resolution 1024 with scale factor 0.13025."""
        return cls(**{"resolution": 1024, "scaling_factor": 0.13025, **overrides})

    @classmethod
    def vq_f4(cls, **overrides) -> "AutoencoderConfig":
        """LDM VQ-f4 (models/first_stage_models/vq-f4); LatentDiffusion's default scale_factor is 1."""
        base = dict(kind="vq", ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192, scaling_factor=1.0)
        return cls(**{**base, **overrides})

    def to_diffusers_config(self) -> dict[str, Any]:
        """diffusers' AutoencoderKL / VQModel config.json for this architecture (see autoencoder_keys)."""
        from .autoencoder_keys import diffusers_config_from_ours  # that module imports this one
        return diffusers_config_from_ours(self)

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any], **overrides) -> "AutoencoderConfig":
        """Read diffusers' AutoencoderKL / VQModel config.json (see autoencoder_keys)."""
        from .autoencoder_keys import config_from_diffusers
        return config_from_diffusers(d, **overrides)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without time embedding (LDM autoencoder; He et al. 2016)."""

    def __init__(self, in_ch: int, out_ch: int, config: AutoencoderConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(config.num_groups, in_ch, eps=config.norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(config.num_groups, out_ch, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual (Vaswani et al. 2017)."""

    def __init__(self, ch: int, config: AutoencoderConfig):
        super().__init__()
        self.norm = nn.GroupNorm(config.num_groups, ch, eps=config.norm_eps)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v over the h*w positions
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one, as in the original checkpoints."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: res blocks, each followed by attention at attention levels."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, attention: bool, config: AutoencoderConfig):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, config) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch, config) for _ in range(num_blocks if attention else 0))

    def blocks(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x


class DownLevel(Level):
    """An encoder level, then `downsample` (identity at the last level)."""

    def __init__(self, in_ch: int, out_ch: int, attention: bool, last: bool, config: AutoencoderConfig):
        super().__init__(in_ch, out_ch, config.num_res_blocks, attention, config)
        self.downsample = nn.Identity() if last else Downsample(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.blocks(x))


class UpLevel(Level):
    """A decoder level with one extra res block, then `upsample` (identity at level 0)."""

    def __init__(self, in_ch: int, out_ch: int, attention: bool, first: bool, config: AutoencoderConfig):
        super().__init__(in_ch, out_ch, config.num_res_blocks + 1, attention, config)
        self.upsample = nn.Identity() if first else Upsample(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample(self.blocks(x))


class MidBlock(nn.Module):
    """Res block, attention, res block at the lowest resolution."""

    def __init__(self, ch: int, config: AutoencoderConfig):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, config)
        self.attn_1 = AttnBlock(ch, config) if config.mid_attention else nn.Identity()
        self.block_2 = ResnetBlock(ch, ch, config)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image -> z_channels (x2 for KL) feature map at 1/downsample_factor resolution."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel([config.ch, *widths][i], widths[i], 2**i in config.attn_resolutions, i == last, config)
            for i in range(len(widths)))
        self.mid = MidBlock(widths[-1], config)
        self.norm_out = nn.GroupNorm(config.num_groups, widths[-1], eps=config.norm_eps)
        out = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(widths[-1], out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """z_channels latent -> image; `up[i]` works at level i, so `up[-1]` runs first (lowest resolution)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config)
        self.up = nn.ModuleList(  # level i takes the width of level i + 1 (or of the mid block)
            UpLevel([*widths[1:], widths[-1]][i], widths[i], 2**i in config.attn_resolutions, i == 0, config)
            for i in range(len(widths)))
        self.norm_out = nn.GroupNorm(config.num_groups, widths[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) of the KL autoencoder (Kingma & Welling 2014)."""

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> "DiagonalGaussian":
        """Split channels into mean and log-variance; clamp logvar to [-30, 20] as the original does."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: Generator = None) -> Tensor:
        """Reparameterization z = mean + std * eps (Kingma & Welling 2014, eq. 10)."""
        eps = randn(self.mean.shape, generator, self.mean.dtype, self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions (Kingma & Welling 2014, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantization with a straight-through gradient (van den Oord et al. 2017, sec. 3.1)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float):
        super().__init__()
        self.beta = beta
        # initialised here, not by nn.Embedding's normal_, which on the meta device (loading) imports torch._dynamo
        self.embedding = nn.Embedding(n_embed, embed_dim, _weight=torch.empty(n_embed, embed_dim))
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        # Not in the state dict, so checkpoints keep the original keys; counted in training mode only.
        self.register_buffer("usage_counts", torch.zeros(n_embed, dtype=torch.long), persistent=False)

    def indices(self, z: Tensor) -> Tensor:
        """argmin_k ||z - e_k|| at every position: [B, C, H, W] -> [B, H, W]."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        return torch.cdist(flat, self.embedding.weight).argmin(dim=1).reshape(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors for [B, H, W] indices, as [B, C, H, W]."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z_q with straight-through gradient, codebook + beta * commitment loss, indices); eq. 3."""
        idx = self.indices(z)
        z_q = self.lookup(idx)
        codebook = F.mse_loss(z_q, z.detach())
        commitment = F.mse_loss(z, z_q.detach())
        if self.training:
            self.usage_counts += torch.bincount(idx.flatten(), minlength=self.usage_counts.numel())
        # Straight-through: the value is exactly z_q, the gradient d/dz is the identity (z - z.detach() == 0).
        return z_q.detach() + (z - z.detach()), codebook + self.beta * commitment, idx

    def usage_fraction(self) -> float:
        """Fraction of codebook entries chosen at least once since the last reset."""
        return (self.usage_counts > 0).float().mean().item()

    def perplexity(self) -> float:
        """exp(entropy) of the empirical code distribution: n_embed when uniform, 1 when one code is used."""
        total = self.usage_counts.sum()
        if total == 0:
            return 0.0
        p = self.usage_counts[self.usage_counts > 0].double() / total
        return torch.exp(-(p * p.log()).sum()).item()

    def reset_usage(self) -> None:
        self.usage_counts.zero_()


@dataclass(frozen=True)
class AutoencoderOutput:
    """Training output: reconstruction and the regularizer (KL per sample, batch mean; or the VQ loss)."""

    reconstruction: Tensor
    reg_loss: Tensor


class Autoencoder(nn.Module):
    """KL or VQ first-stage model; `encode` maps [-1, 1] images to scaled latents, `decode` inverts it."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        moments = 2 if config.kind == "kl" else 1
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(moments * config.z_channels, moments * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize = (VectorQuantizer(config.n_embed, config.embed_dim, config.beta)
                         if config.kind == "vq" else None)

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_image(self, img: Tensor) -> None:
        c, f = self.config.in_channels, self.downsample_factor
        if img.ndim != 4 or img.shape[1] != c:
            raise ValueError(f"img must be [B, {c}, H, W] (in_channels={c}), got shape {tuple(img.shape)}")
        if img.shape[2] % f or img.shape[3] % f:
            raise ValueError(f"img height and width must be multiples of downsample_factor={f}, "
                             f"got {tuple(img.shape[2:])}")

    def _moments(self, img: Tensor) -> Tensor:
        self._check_image(img)
        return self.quant_conv(self.encoder(img))

    def posterior(self, img: Tensor) -> DiagonalGaussian:
        """q(z|x) of the KL autoencoder, before latent scaling."""
        if self.config.kind != "kl":
            raise ValueError(f"posterior() needs kind='kl', this autoencoder is kind={self.config.kind!r}")
        return DiagonalGaussian.from_moments(self._moments(img))

    def encode(self, img: Tensor, generator: Generator = None, sample: bool = True) -> Tensor:
        """z = scaling_factor * (latent - shift_factor); KL latent: posterior sample (or its mean if not
        `sample`); VQ latent: the pre-quantization encoding (decode quantizes it, as LDM's VQModelInterface)."""
        if self.config.kind == "kl":
            q = self.posterior(img)
            latent = q.sample(generator) if sample else q.mode()
        else:
            latent = self._moments(img)
        if self.config.shift_factor is not None:
            latent = latent - self.config.shift_factor
        return self.config.scaling_factor * latent

    def decode(self, z: Tensor) -> Tensor:
        """Image in about [-1, 1] from scaled latents; VQ latents are snapped to the codebook first."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"z must be [B, {self.latent_channels}, h, w] (latent_channels="
                             f"{self.latent_channels}), got shape {tuple(z.shape)}")
        latent = z / self.config.scaling_factor
        if self.config.shift_factor is not None:
            latent = latent + self.config.shift_factor
        if self.config.kind == "vq":
            latent = self.quantize(latent)[0]
        return self.decoder(self.post_quant_conv(latent))

    def forward(self, img: Tensor, generator: Generator = None, sample: bool = True) -> AutoencoderOutput:
        """Reconstruction and regularizer for training (Rombach et al. 2022, App. G; no latent scaling)."""
        if self.config.kind == "kl":
            q = self.posterior(img)
            latent = q.sample(generator) if sample else q.mode()
            reg = q.kl().mean()
        else:
            latent, reg, _ = self.quantize(self._moments(img))
        return AutoencoderOutput(self.decoder(self.post_quant_conv(latent)), reg)
