"""Conditioning as data: a set of named, batch-first tensors a network takes as keyword arguments (token
`context` and its `context_mask`, a label or vector `y`, an image `concat`enated to x_t, a `noise_level`, ...),
travelling with its unconditional counterpart. Classifier-free guidance batches any such set in one call, so no
pipeline special-cases a kind of conditioning."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import torch

from .diffusion.denoiser import DenoiseFn, Prediction
from .sampling.transforms import classifier_free_guidance

Tensor = torch.Tensor


@dataclass(frozen=True)
class Conditioning(Mapping):
    """Named tensors with one row per image (or None: an input not given). A read-only mapping, so
    `network(x, t, **cond)` passes it on."""

    tensors: Mapping[str, Optional[Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        sizes = {name: v.shape[0] for name, v in self.tensors.items() if v is not None}
        if not all(isinstance(v, Tensor) and v.ndim >= 1 for v in self.tensors.values() if v is not None):
            raise TypeError(f"conditioning values must be batch-first tensors or None; got {dict(self.tensors)}")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning tensors disagree on the batch size: {sizes}")
        object.__setattr__(self, "tensors", dict(self.tensors))

    def __getitem__(self, name: str) -> Optional[Tensor]:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def batch_size(self) -> Optional[int]:
        return next((v.shape[0] for v in self.tensors.values() if v is not None), None)

    def replace(self, **tensors: Optional[Tensor]) -> "Conditioning":
        """The same set with some tensors added or replaced (None removes an input's value)."""
        return Conditioning({**self.tensors, **tensors})

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each row n times in a row: prompt k's conditioning for its n images."""
        return self._map(lambda v: v.repeat_interleave(n, 0))

    def expand(self, batch: int) -> "Conditioning":
        """A one-row set repeated to `batch` rows (a shared unconditional embedding)."""
        return self._map(lambda v: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Conditioning":
        """Moved to `device`; floating-point tensors cast to `dtype` (masks and integer labels keep theirs)."""
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def _map(self, fn) -> "Conditioning":
        return Conditioning({k: None if v is None else fn(v) for k, v in self.tensors.items()})

    @staticmethod
    def cat(sets: Sequence["Conditioning"]) -> "Conditioning":
        """Row-wise concatenation of sets with the same names (an input None in one is None in all)."""
        names = set(sets[0].tensors)
        if any(set(s.tensors) != names for s in sets):
            raise ValueError(f"cannot batch conditioning sets with different inputs: {[sorted(s) for s in sets]}")
        out = {}
        for name in sets[0].tensors:
            values = [s[name] for s in sets]
            if any(v is None for v in values) and not all(v is None for v in values):
                raise ValueError(f"conditioning input {name!r} is given in some sets and None in others")
            out[name] = None if values[0] is None else torch.cat(values)
        return Conditioning(out)


def bind(denoiser, cond: Conditioning) -> DenoiseFn:
    """denoiser(x_t, sigma, **cond) as a DenoiseFn(x_t, sigma)."""
    def denoise(x_t: Tensor, sigma: Tensor) -> Prediction:
        return denoiser(x_t, sigma, **cond)
    return denoise


def guided(denoiser, cond: Conditioning, uncond: Optional[Conditioning], guidance_scale: float) -> DenoiseFn:
    """The DenoiseFn of a conditioning pair: plain `cond` when uncond is None, else classifier-free guidance
    (eps_u + w (eps_c - eps_u)) with both halves in one batched call, whatever inputs the set holds."""
    if uncond is None:
        return bind(denoiser, cond)
    return classifier_free_guidance(bind(denoiser, Conditioning.cat([uncond, cond])), guidance_scale)
