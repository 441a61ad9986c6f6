"""The Trainer's small parts: derived seeds, the epoch order, the LR factor, the module accelerate prepares, the
trainable-parameter view EMA works on, the checkpoint listing and the test-only kill hook."""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..random import randperm

CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def derived_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of its parts (no collisions between e.g. (1, 23) and (12, 3))."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    return randperm(n, torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))).tolist()


def cosine_decay(progress: float, floor: float = 0.0) -> float:
    """A half cosine from 1 at progress 0 down to `floor` at progress 1, and `floor` after (Loshchilov & Hutter
    2017, one cycle without restarts)."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_lambda(kind: str, warmup: int, total: int):
    """LR factor at optimizer step s: linear warmup to 1 over `warmup` steps, then constant, cosine or linear decay."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return {"constant": 1.0, "cosine": cosine_decay(progress), "linear": 1.0 - progress}[kind]
    return factor


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step-N directories), oldest first; temporary .tmp-step-N directories are not listed."""
    if not folder.is_dir():
        return []
    found = ((CHECKPOINT_NAME.fullmatch(p.name), p) for p in folder.iterdir() if p.is_dir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


class DiffusionModel(nn.Module):
    """What accelerate prepares (so DDP syncs the U-Net and a trained text encoder alike): encodes captions (or takes
    cached context) and runs the U-Net. The padding mask reaches the U-Net only if it was trained with one."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, train_text_encoder: bool):
        super().__init__()
        self.unet, self.text_encoder, self.train_text_encoder = unet, text_encoder, train_text_encoder

    def forward(self, x_t, t, captions: Optional[list[str]] = None, context=None, context_mask=None):
        if captions is not None:
            with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
                enc = self.text_encoder.encode(list(captions))
            context, context_mask = enc.embeddings, enc.mask
        return self.unet(x_t, t, context=context, context_mask=context_mask if self.unet.config.mask_context else None)


class TrainableParams:
    """The trainable parameters by name, with the state_dict / load_state_dict that EMA reads and writes."""

    def __init__(self, module: nn.Module):
        self.named = {n: p for n, p in module.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.named) - set(state)), sorted(set(state) - set(self.named))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the trainable parameters: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for n, p in self.named.items():
            p.copy_(state[n])


def die_hook(point: str) -> None:
    """LDM_TRAIN_DIE_AT_STEP=N (after checkpoint N is in place) or N:partial (halfway through writing it) ends the
    process at once with os._exit, like a kill: no cleanup, no finally blocks. Only the tests set it."""
    if os.environ.get("LDM_TRAIN_DIE_AT_STEP") == point:
        os._exit(137)
