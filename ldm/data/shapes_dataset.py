"""The shapes world's scene stream as data: example `i` of stream `seed` is drawn from its own generator, so it
does not depend on batching or order; make_batch renders a run of them, ShapesDataset serves them to a trainer."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..config import is_int
from .images import to_model_range
from .shapes import Scene, caption, check_size, render, sample_scene



def example(seed: int, index: int, allow_heldout: bool = False) -> tuple[Scene, str]:
    """Example `index` of the stream `seed`: its own generator, so it does not depend on batch or order."""
    rng = np.random.default_rng([int(seed), int(index)])
    scene = sample_scene(rng, allow_heldout=allow_heldout)
    return scene, caption(scene, rng)


def make_batch(n: int, seed: int = 0, size: int = 64, start: int = 0,
               allow_heldout: bool = False) -> tuple[np.ndarray, list[str]]:
    """Examples start .. start + n - 1 of stream `seed`: (uint8 images [n, size, size, 3], captions); the same
    as ShapesDataset(size, seed=seed, allow_heldout=allow_heldout).batch(start, n)."""
    if not is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0; got {n!r}")
    if not is_int(start) or start < 0:
        raise ValueError(f"start must be an integer >= 0; got {start!r}")
    return ShapesDataset(size, max(start + n, 1), seed, allow_heldout).batch(start, n)


class ShapesDataset(torch.utils.data.Dataset):
    """The scene stream `seed` as a dataset: item i is (image float [3, size, size] in [-1, 1], caption), made from
    example(seed, i) alone, so it does not depend on batching or order. `batch` renders a run of items as uint8
    images, `captions` gives theirs without rendering, `pixel_values(i)` is the latent cache's view of an item."""

    def __init__(self, size: int = 64, length: int = 100_000, seed: int = 0, allow_heldout: bool = False):
        check_size(size)
        if not is_int(length) or length < 1:
            raise ValueError(f"length must be an integer >= 1; got {length!r}")
        self.size, self.length, self.seed, self.allow_heldout = size, int(length), seed, allow_heldout

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, str]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        return example(self.seed, index % self.length, self.allow_heldout)

    def _span(self, start: int, n: Optional[int]) -> range:
        n = self.length - start if n is None else n
        if not (is_int(start) and is_int(n) and 0 <= start and n >= 0 and start + n <= self.length):
            raise IndexError(f"items {start} .. {start}+{n} out of range for a dataset of length {self.length}")
        return range(start, start + n)

    def batch(self, start: int = 0, n: Optional[int] = None) -> tuple[np.ndarray, list[str]]:
        """Items start .. start + n - 1 (to the end if n is None): (uint8 images [n, size, size, 3], captions)."""
        span = self._span(start, n)
        images = np.empty((len(span), self.size, self.size, 3), np.uint8)
        captions = []
        for k, i in enumerate(span):
            scene, text = self.scene(i)
            images[k] = render(scene, self.size)
            captions.append(text)
        return images, captions

    def captions(self, start: int = 0, n: Optional[int] = None) -> list[str]:
        """The captions of items start .. start + n - 1 (to the end if n is None), without rendering."""
        return [self.scene(i)[1] for i in self._span(start, n)]

    def pixel_values(self, index: int, epoch: int = 0) -> torch.Tensor:
        """Item `index`'s image [3, size, size] in [-1, 1] (the same in every epoch: the stream has no augmentation)."""
        return to_model_range(render(self.scene(index)[0], self.size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene, text = self.scene(index)
        return to_model_range(render(scene, self.size)), text
