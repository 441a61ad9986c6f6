"""Resumable training state written atomically: a killed run never leaves a partial checkpoint."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_path


def rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss], "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save_training_state(state: dict[str, Any], path: os.PathLike) -> None:
    """torch.save to a temporary file, fsync, then os.replace over the old checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)


def load_training_state(path: os.PathLike) -> dict[str, Any]:
    """A resume file: tensors and plain values only, read with weights_only=True."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
