"""Offline tokenizers: CLIP's BPE rebuilt from open_clip's bundled merges, and SentencePiece models."""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..files import write_text

if TYPE_CHECKING:  # transformers, ftfy and sentencepiece are imported where used: each costs start-up time
    from transformers import CLIPTokenizer

# CLIP's BPE: 256 byte symbols, the same 256 with '</w>', 48894 merges, then the two special tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 2 * 256 + CLIP_NUM_MERGES + 2
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# diffusers' SD1 tokenizer pads with the end token; its SD2 tokenizer pads with '!' (id 0), as open_clip.tokenize does.
CLIP_PAD_TOKENS = {"sd1": CLIP_EOS, "sd2": "!"}
_CLIP_FILES_VERSION = "clip-bpe-16e6-v1"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids an encoder puts around a window of prompt tokens, and the id it pads with."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad: int

    def wrap(self, content: list[int], length: int) -> list[int]:
        """prefix + content + suffix, padded with `pad` to `length`."""
        ids = [*self.prefix, *content, *self.suffix]
        return ids + [self.pad] * (length - len(ids))

    @property
    def count(self) -> int:
        """Number of special tokens around each window."""
        return len(self.prefix) + len(self.suffix)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table; order matters: it is the first 256 ids of the vocab."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_bpe_path() -> Path:
    """The BPE merges file that open_clip ships (the one OpenAI's CLIP was trained with)."""
    spec = importlib.util.find_spec("open_clip")  # located, not imported: importing open_clip takes seconds
    if spec is None or spec.origin is None:
        raise ImportError("open_clip (open-clip-torch) is needed for CLIP's BPE merges file")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocab.json and merges list, in the order OpenAI laid them out."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:CLIP_NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocab has {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def _cache_root() -> Path:
    """$LDM_CACHE, else $XDG_CACHE_HOME/ldm, else ~/.cache/ldm; a temp folder when none is writable."""
    root = os.environ.get("LDM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ldm")
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        return Path(tempfile.gettempdir()) / "ldm-cache"


@lru_cache(maxsize=None)
def clip_tokenizer_files(cache_dir: str | None = None) -> Path:
    """Folder holding vocab.json and merges.txt for CLIP's tokenizer, written once into the cache."""
    folder = Path(cache_dir) if cache_dir else _cache_root() / _CLIP_FILES_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        vocab, merges = clip_vocab_and_merges()
        write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
        write_text(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def write_bpe_files(tokenizer: CLIPTokenizer, folder: str | os.PathLike) -> None:
    """vocab.json and merges.txt of a tokenizers-backed BPE tokenizer, for readers that need CLIP's own files."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def clip_tokenizer(pad_token: str = CLIP_EOS, max_length: int = 77) -> CLIPTokenizer:
    """A transformers CLIPTokenizer built offline; pad_token '<|endoftext|>' as SD1's, '!' as SD2's."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(clip_tokenizer_files()), pad_token=pad_token, model_max_length=max_length, local_files_only=True)


def clean_clip_text(text: str) -> str:
    """CLIP's text cleaning before BPE: ftfy, html unescape twice, whitespace collapse, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class SentencePieceTokenizer:
    """A SentencePiece model used as T5 uses it: pieces, then '</s>'; read with the sentencepiece package alone."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece

        self.model_file = Path(model_file)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        self.eos_token_id = self.processor.eos_id()
        self.pad_token_id = self.processor.pad_id()
        if self.eos_token_id < 0 or self.pad_token_id < 0:
            raise ValueError(f"{self.model_file} defines no eos/pad piece; train it with eos_id and pad_id set")

    def __len__(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Piece ids of each text, with no special tokens."""
        return [list(ids) for ids in self.processor.encode(texts)]
