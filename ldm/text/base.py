"""The one text-encoder interface: prompts -> per-token embeddings, their mask and an optional pooled vector."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import JsonConfig
from .tokenizers import SpecialTokens

CONFIG_NAME = "ldm_text_encoder.json"


@dataclass
class TextEncoding:
    """embeddings [B, L, D] float, mask [B, L] bool (True = a real token), pooled [B, D] or None."""

    embeddings: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None


class EncoderConfig(JsonConfig):
    """Base of the text encoders' frozen config dataclasses (to_dict / from_dict for json)."""


def check_prompts(prompts: Any) -> list[str]:
    """A non-empty list (or tuple) of strings, else ValueError naming `prompts`."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    return list(prompts)


def write_config(folder: str | Path, kind: str, config: EncoderConfig) -> None:
    """Write the json that load_text_encoder reads: the encoder kind and its config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps({"kind": kind, "config": config.to_dict()}, indent=2) + "\n")


def read_config(folder: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(kind, config dict) from a folder written by save_pretrained; None when the folder has no such file."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or "kind" not in saved or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{path} must hold {{'kind': str, 'config': dict}}")
    return saved["kind"], saved["config"]


class TextEncoder(nn.Module):
    """Base class: tokenization windows, truncation or chunking and batching live here; subclasses run the network.

    A subclass sets `kind`, keeps its frozen config in `self.config` (with `max_length` and `chunked` fields) and
    implements `dim`, `special`, `token_ids` (prompt tokens, no special tokens), `forward_ids`, `save_pretrained`.
    """

    kind: ClassVar[str] = ""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        # in eval mode from the start, as its network is: a caller that saves and restores the mode (e.g. the
        # latent cache) must not switch dropout on by restoring nn.Module's default training=True
        self.train(False)

    @classmethod
    def folder_layout(cls, folder: Path, config_cls: type, overrides: dict) -> tuple[Any, Path, Path]:
        """(config, model folder, tokenizer folder) of a transformers-style folder: one save_pretrained wrote (our
        config json, text_encoder/ and tokenizer/; refused if of another kind) or a plain one (the config's
        defaults; model and tokenizer files in the folder itself). overrides replace config fields."""
        saved = read_config(folder)
        if saved is not None and saved[0] != cls.kind:
            raise ValueError(f"{folder} holds a {saved[0]!r} text encoder, not {cls.kind!r}")
        config = config_cls.from_dict(saved[1]) if saved is not None else config_cls()
        config = dataclasses.replace(config, **overrides)
        if saved is None:
            return config, folder, folder
        return config, folder / "text_encoder", folder / "tokenizer"

    @property
    def max_length(self) -> int:
        """Tokens per encoded window, special tokens included."""
        return self.config.max_length

    @property
    def dim(self) -> int:
        """Width D of the per-token embeddings."""
        raise NotImplementedError

    @property
    def special(self) -> SpecialTokens:
        """Special tokens around each window and the pad id."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Device of the parameters (inputs are moved there)."""
        return next(self.parameters()).device

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, no special tokens, no truncation."""
        raise NotImplementedError

    def forward_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network on padded windows [N, max_length] -> (embeddings [N, max_length, D], pooled [N, D] or None)."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> None:
        """Write weights, tokenizer files and the config json that load_text_encoder reads."""
        raise NotImplementedError

    @property
    def window(self) -> int:
        """Prompt tokens that fit in one window: max_length less the special tokens."""
        return self.max_length - self.special.count

    def _split(self, content: list[list[int]]) -> list[list[list[int]]]:
        """Each prompt's tokens as windows: all of them when chunked, else the first (with a warning on loss)."""
        w = self.window
        if self.config.chunked:
            return [[ids[i:i + w] for i in range(0, len(ids), w)] or [[]] for ids in content]
        dropped = {i: len(ids) - w for i, ids in enumerate(content) if len(ids) > w}
        if dropped:
            detail = ", ".join(f"prompts[{i}]: {n}" for i, n in dropped.items())
            warnings.warn(f"{type(self).__name__} keeps {w} tokens per prompt; truncated, tokens dropped: {detail} "
                          f"(total {sum(dropped.values())}); pass chunked=True to encode them", stacklevel=4)
        return [[ids[:w]] for ids in content]

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and mask [B, C, max_length]: C = 1 unless chunked; short prompts get empty-prompt windows."""
        windows = self._split(self.token_ids(check_prompts(prompts)))
        num_chunks = max(len(w) for w in windows)
        special, length = self.special, self.max_length
        rows = [win for w in windows for win in w + [[]] * (num_chunks - len(w))]
        input_ids = torch.tensor([special.wrap(win, length) for win in rows], dtype=torch.long)
        lengths = torch.tensor([len(win) + special.count for win in rows])
        mask = torch.arange(length)[None, :] < lengths[:, None]
        shape = (len(windows), num_chunks, length)
        return input_ids.reshape(shape), mask.reshape(shape)

    def encode(self, prompts: list[str]) -> TextEncoding:
        """Encode prompts; chunked mode concatenates C windows along the sequence axis ([B, C * max_length, D])."""
        input_ids, mask = self.tokenize(prompts)
        batch, num_chunks, length = input_ids.shape
        mask = mask.to(self.device)
        embeddings, pooled = self.forward_ids(input_ids.to(self.device).flatten(0, 1), mask.flatten(0, 1))
        embeddings = embeddings.reshape(batch, num_chunks * length, embeddings.shape[-1])
        if pooled is not None:
            pooled = pooled.reshape(batch, num_chunks, pooled.shape[-1])[:, 0]  # the first window's, as unchunked
        return TextEncoding(embeddings, mask.reshape(batch, num_chunks * length), pooled)
