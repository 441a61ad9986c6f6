"""Starting a VQ autoencoder from a trained KL one: the KL encoder's mean path folded into the VQ encoder, and a
codebook set by k-means on the latents (van den Oord et al. 2017 train the codebook from scratch; starting
from the data's own latents leaves fine-tuning only the quantization error to absorb)."""
from __future__ import annotations

import torch

from ..random import multinomial, randperm
from .autoencoder import AutoencoderConfig


def kmeans(points: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """k centers of [N, D] points by Lloyd's algorithm from k-means++-style seeding on a subsample; an empty
    cluster is re-seeded at the point farthest from its center."""
    g = torch.Generator().manual_seed(seed)
    centers = points[randperm(len(points), g)[:1]]
    sample = points[randperm(len(points), g)[:20 * k]]
    while len(centers) < k:  # k-means++ seeding, 64 centers at a time
        d = torch.cdist(sample, centers).min(dim=1).values.pow(2)
        centers = torch.cat([centers, sample[multinomial(d + 1e-12, min(64, k - len(centers)), g,
                                                          replacement=False)]])
    for _ in range(iters):
        dist = torch.cdist(points, centers)
        nearest = dist.argmin(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=k).unsqueeze(1)
        empty = counts.squeeze(1) == 0
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
        if empty.any():
            far = dist.gather(1, nearest[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centers[empty] = points[far]
    return centers


def fold_kl_encoder(kl_state: dict, config: AutoencoderConfig) -> dict:
    """The state dict of a VQ autoencoder of `config` (same widths as the KL one, z_channels == embed_dim) whose
    pre-quantization latent is exactly the KL posterior mean; every weight but the codebook. KL: moments =
    Wq (Wo h + bo) + bq with Wo a 3x3 conv to 2z channels and Wq a 1x1 conv 2z -> 2e; the mean is the first e
    rows of that composition, itself one 3x3 conv, and the VQ quant_conv becomes the identity."""
    e = config.embed_dim
    if config.z_channels != e:
        raise ValueError("folding a KL encoder into a VQ one needs z_channels == embed_dim")
    moments = kl_state.get("quant_conv.weight")
    if moments is None or moments.shape[0] != 2 * e or "quantize.embedding.weight" in kl_state:
        raise ValueError(f"kl_state must be a KL autoencoder's state dict (quant_conv with 2 x {e} "
                         "outputs: mean and log-variance, no codebook)")
    state = {k: v for k, v in kl_state.items() if not k.startswith(("encoder.conv_out.", "quant_conv."))}
    wq = kl_state["quant_conv.weight"][:e, :, 0, 0]
    state["encoder.conv_out.weight"] = torch.einsum("ij,jkxy->ikxy", wq, kl_state["encoder.conv_out.weight"])
    state["encoder.conv_out.bias"] = wq @ kl_state["encoder.conv_out.bias"] + kl_state["quant_conv.bias"][:e]
    state["quant_conv.weight"] = torch.eye(e)[:, :, None, None]
    state["quant_conv.bias"] = torch.zeros(e)
    return state
