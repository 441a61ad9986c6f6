"""T5 encoder (transformers T5EncoderModel) with ByT5 byte tokens or a SentencePiece model."""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from .base import EncoderConfig, TextEncoder, read_config, write_config
from .tokenizers import SentencePieceTokenizer, SpecialTokens

T5_TOKENIZERS = ("byt5", "sentencepiece")
SPM_NAME = "spiece.model"


@dataclass(frozen=True)
class T5EncoderConfig(EncoderConfig):
    """Shape of a T5 encoder (defaults: T5 v1.1 small with ByT5's 384-id vocab) and its tokenizer kind.

    tokenizer "byt5": UTF-8 bytes + 3, '</s>' = 1, pad = 0 (no files); "sentencepiece": a .model file given to
    T5TextEncoder, read with the sentencepiece package exactly as T5's tokenizer reads it, then '</s>'.
    lowercase: prompts lower-cased and stripped first (DeepFloyd IF's pipelines without caption cleaning).
    """

    vocab_size: int = 384
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    feed_forward_proj: str = "gated-gelu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    tokenizer: str = "byt5"
    max_length: int = 77
    chunked: bool = False
    lowercase: bool = False

    def __post_init__(self):
        if self.tokenizer not in T5_TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {T5_TOKENIZERS}, got {self.tokenizer!r}")

    def hf_config(self) -> T5Config:
        """The transformers config of this shape."""
        return T5Config(vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
                        num_layers=self.num_layers, num_heads=self.num_heads, feed_forward_proj=self.feed_forward_proj,
                        relative_attention_num_buckets=self.relative_attention_num_buckets,
                        relative_attention_max_distance=self.relative_attention_max_distance,
                        layer_norm_epsilon=self.layer_norm_epsilon, dropout_rate=0.0, is_encoder_decoder=False,
                        use_cache=False, pad_token_id=0, eos_token_id=1)


class T5TextEncoder(TextEncoder):
    """last_hidden_state of T5EncoderModel under the tokenizer's mask; no pooled vector."""

    kind = "t5"

    def __init__(self, config: T5EncoderConfig, model: T5EncoderModel | None = None,
                 spm_file: str | Path | None = None):
        super().__init__(config)
        if config.tokenizer == "sentencepiece":
            if spm_file is None:
                raise ValueError("tokenizer='sentencepiece' needs spm_file, a SentencePiece .model file")
            self.tokenizer = SentencePieceTokenizer(spm_file)
        else:
            if spm_file is not None:
                raise ValueError("spm_file is only used with tokenizer='sentencepiece'")
            self.tokenizer = ByT5Tokenizer(extra_ids=0)
        eos, pad, size = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, len(self.tokenizer)
        if size > config.vocab_size:
            raise ValueError(f"tokenizer has {size} ids but vocab_size is {config.vocab_size}")
        self.model = (model if model is not None else T5EncoderModel(config.hf_config())).eval()
        self._special = SpecialTokens((), (eos,), pad)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, local_files_only: bool = True, **overrides) -> T5TextEncoder:
        """Load a folder written by save_pretrained; overrides set config fields (max_length, chunked)."""
        folder = Path(folder)
        saved = read_config(folder)
        if saved is None or saved[0] != cls.kind:
            raise ValueError(f"{folder} holds no saved {cls.kind!r} text encoder")
        config = dataclasses.replace(T5EncoderConfig.from_dict(saved[1]), **overrides)
        model = T5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=local_files_only)
        spm_file = folder / "tokenizer" / SPM_NAME if config.tokenizer == "sentencepiece" else None
        return cls(config, model, spm_file)

    @classmethod
    def from_diffusers(cls, folder: str | Path, *, allow_pickle: bool = False, **overrides) -> T5TextEncoder:
        """A diffusers folder's T5 (DeepFloyd IF): text_encoder/ (transformers T5EncoderModel, loaded strictly) and
        tokenizer/spiece.model; 77 tokens, prompts lower-cased as IF's pipelines do; overrides set config fields."""
        from ..checkpoints import load_component_weights
        from ..nn.keymap import load_onto_meta
        from .base import read_config as read_ours

        folder = Path(folder)
        if read_ours(folder) is not None:  # a folder this package wrote keeps its own settings
            return cls.from_pretrained(folder, **overrides)
        hf = T5Config.from_pretrained(folder / "text_encoder", local_files_only=True)
        spm_file = folder / "tokenizer" / SPM_NAME
        if not spm_file.is_file():
            raise FileNotFoundError(f"{folder} needs tokenizer/{SPM_NAME} (the T5 encoder's SentencePiece model)")
        config = T5EncoderConfig(vocab_size=hf.vocab_size, d_model=hf.d_model, d_kv=hf.d_kv, d_ff=hf.d_ff,
                                 num_layers=hf.num_layers, num_heads=hf.num_heads,
                                 feed_forward_proj=hf.feed_forward_proj,
                                 relative_attention_num_buckets=hf.relative_attention_num_buckets,
                                 relative_attention_max_distance=hf.relative_attention_max_distance,
                                 layer_norm_epsilon=hf.layer_norm_epsilon, tokenizer="sentencepiece", lowercase=True)
        config = dataclasses.replace(config, **overrides)
        state = load_component_weights(folder / "text_encoder", ("model",), allow_pickle)
        state.pop("decoder.embed_tokens.weight", None)
        if "shared.weight" in state:  # tied: the encoder's embedding is the shared one
            state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
        with torch.device("meta"):  # T5-XXL has 4.7 B parameters: not initialised only to be overwritten
            model = T5EncoderModel(config.hf_config())
        return cls(config, load_onto_meta(model, state, f"{folder / 'text_encoder'}").eval(), spm_file)

    def save_pretrained(self, folder: str | Path) -> None:
        """text_encoder/ (transformers layout), tokenizer/spiece.model for SentencePiece, and our config json."""
        folder = Path(folder)
        self.model.save_pretrained(folder / "text_encoder")
        if self.config.tokenizer == "sentencepiece":
            (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.tokenizer.model_file, folder / "tokenizer" / SPM_NAME)
        write_config(folder, self.kind, self.config)

    @property
    def dim(self) -> int:
        return self.config.d_model

    @property
    def special(self) -> SpecialTokens:
        return self._special

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Byte or SentencePiece ids, no '</s>'."""
        if self.config.lowercase:
            prompts = [p.lower().strip() for p in prompts]
        if self.config.tokenizer == "sentencepiece":
            return self.tokenizer.encode(prompts)
        return self.tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids

    def forward_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Encoder output with padding masked out of attention."""
        return self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state, None
