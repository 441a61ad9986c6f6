"""CLIP text encoder (transformers CLIPTextModel) as Stable Diffusion 1 and 2 feed their U-Nets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .base import EncoderConfig, TextEncoder, read_config, write_config
from .convert import canonical_clip_keys, load_clip_text_weights
from .tokenizers import (CLIP_EOS, CLIP_PAD_TOKENS, SpecialTokens, clean_clip_text, clip_tokenizer,
                         write_bpe_files)

TOKENIZATIONS = ("diffusers", "original")


@dataclass(frozen=True)
class CLIPEncoderConfig(EncoderConfig):
    """Shape of a CLIP text transformer and how prompts reach it.

    tokenization "diffusers": the HF tokenizer as diffusers calls it. "original": CLIP's ftfy/html cleaning first and
    no special-token matching inside prompts, giving open_clip.tokenize's ids (what SD1/SD2 were trained on); the
    two differ on e.g. '&amp;', curly quotes, and on '!' with SD2's tokenizer, whose pad token '!' is special.
    clip_skip k > 0: the output of the k-th layer from the end (then the final layer norm), as diffusers' clip_skip.
    projection_dim set: CLIPTextModelWithProjection, pooled = text_embeds; else pooled = pooler_output.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    max_length: int = 77
    projection_dim: int | None = None
    pad_token: str = CLIP_EOS
    clip_skip: int = 0
    use_attention_mask: bool = False
    tokenization: str = "diffusers"
    chunked: bool = False

    def __post_init__(self):
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {self.tokenization!r}")
        if not 0 <= self.clip_skip < self.num_layers:
            raise ValueError(f"clip_skip must lie in [0, {self.num_layers}), got {self.clip_skip}")

    def hf_config(self, pad_token_id: int) -> CLIPTextConfig:
        """The transformers config of this shape."""
        return CLIPTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps, max_position_embeddings=self.max_length,
            projection_dim=self.projection_dim or self.hidden_size,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id)

    @classmethod
    def from_hf(cls, hf: CLIPTextConfig, pad_token: str, with_projection: bool, **behaviour) -> CLIPEncoderConfig:
        """Our config read off a transformers CLIPTextConfig (e.g. a diffusers text_encoder/config.json)."""
        behaviour.setdefault("use_attention_mask", bool(hf.to_dict().get("use_attention_mask", False)))
        return cls(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                   num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, hidden_act=hf.hidden_act,
                   layer_norm_eps=hf.layer_norm_eps, max_length=hf.max_position_embeddings,
                   projection_dim=hf.projection_dim if with_projection else None, pad_token=pad_token, **behaviour)


# Stable Diffusion 1.x: OpenAI CLIP ViT-L/14 text transformer.
SD1 = CLIPEncoderConfig()
# Stable Diffusion 2.x: OpenCLIP ViT-H/14 text transformer, 23 of its 24 layers (the penultimate output), exact GELU.
SD2 = CLIPEncoderConfig(hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu",
                        pad_token=CLIP_PAD_TOKENS["sd2"])
TINY = CLIPEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)


class CLIPTextEncoder(TextEncoder):
    """text_model(input_ids)[0] on max_length-padded, truncated tokens, as StableDiffusionPipeline.encode_prompt."""

    kind = "clip"

    def __init__(self, config: CLIPEncoderConfig, model: CLIPTextModel | CLIPTextModelWithProjection | None = None,
                 tokenizer: CLIPTokenizer | None = None):
        super().__init__(config)
        self.tokenizer = tokenizer if tokenizer is not None else clip_tokenizer(config.pad_token, config.max_length)
        if self.tokenizer.convert_ids_to_tokens(self.tokenizer.pad_token_id) != config.pad_token:
            raise ValueError(f"tokenizer pads with {self.tokenizer.pad_token!r}, config says {config.pad_token!r}")
        model_class = CLIPTextModel if config.projection_dim is None else CLIPTextModelWithProjection
        if model is None:
            model = model_class(config.hf_config(self.tokenizer.pad_token_id))
        shape = (type(model), model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size)
        if shape != (model_class, config.hidden_size, config.num_layers, config.vocab_size):
            raise ValueError(f"model (class, width, layers, vocab) {shape} does not match the config's "
                             f"{(model_class, config.hidden_size, config.num_layers, config.vocab_size)}")
        self.model = model.eval()
        self._special = SpecialTokens((self.tokenizer.bos_token_id,), (self.tokenizer.eos_token_id,),
                                      self.tokenizer.pad_token_id)

    @classmethod
    def sd1(cls, **overrides) -> CLIPTextEncoder:
        """SD1's text encoder shape (CLIP ViT-L/14, 768 wide, 12 layers), random weights."""
        return cls(dataclasses.replace(SD1, **overrides))

    @classmethod
    def sd2(cls, **overrides) -> CLIPTextEncoder:
        """SD2's text encoder shape (OpenCLIP ViT-H/14 penultimate, 1024 wide, 23 layers), random weights."""
        return cls(dataclasses.replace(SD2, **overrides))

    @classmethod
    def tiny(cls, **overrides) -> CLIPTextEncoder:
        """A 32-wide, 3-layer CLIP text transformer with the real tokenizer, for tests."""
        return cls(dataclasses.replace(TINY, **overrides))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], config: CLIPEncoderConfig) -> CLIPTextEncoder:
        """Build from config and load HF-keyed weights (e.g. from convert.openclip_text_to_hf), strictly."""
        encoder = cls(config)
        load_clip_text_weights(encoder.model, state_dict, "CLIP text weights")
        return encoder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, local_files_only: bool = True, allow_pickle: bool = False,
                        **overrides) -> CLIPTextEncoder:
        """Load a diffusers folder's text_encoder/ and tokenizer/; overrides set config fields (clip_skip, ...).
        Weights: model.safetensors, or pytorch_model.bin with allow_pickle=True (read with weights_only=True)."""
        from ..checkpoints import load_state_dict

        folder = Path(folder)
        hf_config = json.loads((folder / "text_encoder" / "config.json").read_text())
        with_projection = "CLIPTextModelWithProjection" in (hf_config.get("architectures") or [])
        model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        weights = next((folder / "text_encoder" / name for name in ("model.safetensors", "pytorch_model.bin")
                        if (folder / "text_encoder" / name).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{folder / 'text_encoder'} holds no model.safetensors (a CLIP text encoder's "
                                    "weights)")
        # Built from its config and loaded strictly, not by transformers' from_pretrained: that only prints a
        # report for keys that do not fit (e.g. a transformers-5 layout read by transformers 4) and leaves those
        # weights random. Both key layouts are read; any other mismatch is an error naming the keys.
        model = model_class(CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=local_files_only))
        load_clip_text_weights(model, load_state_dict(weights, allow_pickle), str(weights))
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=local_files_only)
        saved = read_config(folder)
        if saved is not None:
            if saved[0] != cls.kind:
                raise ValueError(f"{folder} holds a {saved[0]!r} text encoder, not {cls.kind!r}")
            config = CLIPEncoderConfig.from_dict(saved[1])
        else:
            config = CLIPEncoderConfig.from_hf(model.config, tokenizer.pad_token, with_projection)
        return cls(dataclasses.replace(config, **overrides), model, tokenizer)

    def save_pretrained(self, folder: str | Path) -> None:
        """diffusers layout: text_encoder/{config.json, model.safetensors} and tokenizer/, plus our config json."""
        folder = Path(folder)
        (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
        self.model.config.architectures = [type(self.model).__name__]
        self.model.config.save_pretrained(folder / "text_encoder")
        # Checkpoint-form keys (text_model.*), readable by every transformers version and by diffusers.
        weights = {k: v.detach().contiguous().cpu() for k, v in canonical_clip_keys(self.model.state_dict()).items()}
        save_file(weights, folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        self.tokenizer.save_pretrained(folder / "tokenizer")
        write_bpe_files(self.tokenizer, folder / "tokenizer")  # transformers 5 writes only tokenizer.json
        write_config(folder, self.kind, self.config)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def special(self) -> SpecialTokens:
        return self._special

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """BPE ids without BOS/EOS; "original" mode cleans text and reads special-token strings as plain text."""
        if self.config.tokenization == "original":
            return self.tokenizer([clean_clip_text(p) for p in prompts], add_special_tokens=False,
                                  split_special_tokens=True, verbose=False).input_ids
        return self.tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids

    def forward_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last (or clip_skip-th from last, then final layer norm) hidden state, and the EOS-pooled vector."""
        clip_skip = self.config.clip_skip
        out = self.model(input_ids, attention_mask=mask.long() if self.config.use_attention_mask else None,
                         output_hidden_states=clip_skip > 0)
        if clip_skip > 0:
            # Where final_layer_norm sits depends on the class and the transformers version; its name does not.
            final_norm = next(m for name, m in self.model.named_modules() if name.endswith("final_layer_norm"))
            embeddings = final_norm(out.hidden_states[-(clip_skip + 1)])
        else:
            embeddings = out.last_hidden_state
        pooled = out.pooler_output if self.config.projection_dim is None else out.text_embeds
        return embeddings, pooled


__all__ = ["CLIPEncoderConfig", "CLIPTextEncoder", "SD1", "SD2", "TINY"]
