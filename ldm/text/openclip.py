"""OpenCLIP text tower as SD2's FrozenOpenCLIPEmbedder uses it: penultimate block, then ln_final."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from safetensors.torch import load_file, save_file
from torch import nn

from .base import EncoderConfig, TextEncoder, read_config, write_config
from .clip import CLIPEncoderConfig, CLIPTextEncoder
from .convert import openclip_text_to_hf
from .tokenizers import CLIP_PAD_TOKENS, SpecialTokens

LAYERS = ("penultimate", "last")
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class OpenCLIPEncoderConfig(EncoderConfig):
    """Shape of an OpenCLIP text tower (defaults: ViT-H-14's) and the block whose output is used.

    layer "penultimate": output of the second-to-last residual block, then ln_final (SD2); "last": the final block.
    output_dim: columns of text_projection, the width of the pooled vector.
    """

    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0
    output_dim: int = 1024
    quick_gelu: bool = False
    max_length: int = 77
    layer: str = "penultimate"
    chunked: bool = False

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        if self.layers < 2:
            raise ValueError(f"layers must be at least 2, got {self.layers}")


@lru_cache(maxsize=1)
def _simple_tokenizer() -> SimpleTokenizer:
    """open_clip's own BPE tokenizer (what SD2 was trained with); built once, it reads a 1.3 MB merges file."""
    return SimpleTokenizer()


class OpenCLIPTextEncoder(TextEncoder):
    """embeddings = ln_final(chosen block's output); pooled = ln_final(last block) at EOT @ text_projection."""

    kind = "openclip"

    def __init__(self, config: OpenCLIPEncoderConfig):
        super().__init__(config)
        self.tower = TextTransformer(
            context_length=config.max_length, vocab_size=config.vocab_size, width=config.width, heads=config.heads,
            layers=config.layers, mlp_ratio=config.mlp_ratio, output_dim=config.output_dim,
            act_layer=QuickGELU if config.quick_gelu else nn.GELU).eval()
        self.tokenizer = _simple_tokenizer()
        # open_clip.tokenize: <start_of_text> ids <end_of_text>, zero-padded.
        self._special = SpecialTokens((self.tokenizer.sot_token_id,), (self.tokenizer.eot_token_id,), 0)

    @classmethod
    def from_open_clip_config(cls, model_name: str = "ViT-H-14", **overrides) -> OpenCLIPTextEncoder:
        """Text tower shape from open_clip's bundled model config (e.g. ViT-H-14, SD2's), random weights."""
        model_config = open_clip.get_model_config(model_name)
        if model_config is None:
            raise ValueError(f"open_clip has no model config {model_name!r}")
        text = model_config["text_cfg"]
        fields = dict(vocab_size=text.get("vocab_size", 49408), width=text["width"], heads=text["heads"],
                      layers=text["layers"], mlp_ratio=text.get("mlp_ratio", 4.0), output_dim=model_config["embed_dim"],
                      quick_gelu=bool(model_config.get("quick_gelu", False)),
                      max_length=text.get("context_length", 77))
        return cls(OpenCLIPEncoderConfig(**{**fields, **overrides}))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], config: OpenCLIPEncoderConfig,
                        prefix: str = "") -> OpenCLIPTextEncoder:
        """Build from config and load tower weights (keys under prefix, e.g. 'cond_stage_model.model.'), strictly."""
        encoder = cls(config)
        own = encoder.tower.state_dict()
        weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k[len(prefix):] in own}
        encoder.tower.load_state_dict(weights, strict=True)
        return encoder

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> OpenCLIPTextEncoder:
        """Load a folder written by save_pretrained; overrides set config fields (layer, chunked)."""
        folder = Path(folder)
        saved = read_config(folder)
        if saved is None or saved[0] != cls.kind:
            raise ValueError(f"{folder} holds no saved {cls.kind!r} text encoder")
        config = dataclasses.replace(OpenCLIPEncoderConfig.from_dict(saved[1]), **overrides)
        return cls.from_state_dict(load_file(folder / WEIGHTS_NAME), config)

    def save_pretrained(self, folder: str | Path) -> None:
        """Our config json and the tower's weights under open_clip's key names."""
        folder = Path(folder)
        write_config(folder, self.kind, self.config)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.tower.state_dict().items()}
        save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})

    @property
    def dim(self) -> int:
        return self.config.width

    @property
    def special(self) -> SpecialTokens:
        return self._special

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """open_clip's BPE ids (cleaned, lower-cased text), no special tokens."""
        return [self.tokenizer.encode(p) for p in prompts]

    def forward_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every block: the chosen one gives the embeddings, the last one the pooled CLIP text feature."""
        index = self.config.layers - (2 if self.config.layer == "penultimate" else 1)
        out = self.tower.forward_intermediates(input_ids, indices=[index], output_fmt="NLC")
        embeddings = self.tower.ln_final(out["text_intermediates"][0])
        return embeddings, out["text_features"]

    def to_clip(self, projection: bool = False) -> CLIPTextEncoder:
        """The same network as a transformers CLIP text encoder (SD2's diffusers form for layer="penultimate").

        projection keeps text_projection (CLIPTextModelWithProjection); its pooled vector then equals ours only for
        layer="last", since HF pools from its own (here: truncated) last layer.
        """
        cfg = self.config
        penultimate = cfg.layer == "penultimate"
        clip_config = CLIPEncoderConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio),
            num_layers=cfg.layers - 1 if penultimate else cfg.layers, num_heads=cfg.heads,
            hidden_act="quick_gelu" if cfg.quick_gelu else "gelu", max_length=cfg.max_length,
            projection_dim=cfg.output_dim if projection else None, pad_token=CLIP_PAD_TOKENS["sd2"],
            tokenization="original", chunked=cfg.chunked)
        state_dict = openclip_text_to_hf(self.tower.state_dict(), prefix="", penultimate=penultimate,
                                         projection=projection)
        return CLIPTextEncoder.from_state_dict(state_dict, clip_config)
