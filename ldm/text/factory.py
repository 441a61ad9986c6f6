"""Restore any saved text encoder from the kind named in its config json."""
from __future__ import annotations

import importlib
from pathlib import Path

from .base import CONFIG_NAME, TextEncoder, read_config

# kind -> (module, class): a class is imported only when a folder of its kind is loaded, so loading a MiniLM
# model never imports open_clip or T5's stack.
ENCODER_KINDS: dict[str, tuple[str, str]] = {
    "clip": ("clip", "CLIPTextEncoder"),
    "openclip": ("openclip", "OpenCLIPTextEncoder"),
    "t5": ("t5", "T5TextEncoder"),
    "hf": ("hf", "HFTextEncoder"),
    "bert": ("bert", "BertTextEncoder"),
}


def encoder_class(kind: str, source: str = "") -> type[TextEncoder]:
    """The TextEncoder class of a kind, imported now; `source` (where the kind was read) goes into the error."""
    if kind not in ENCODER_KINDS:
        raise ValueError(f"unknown text encoder kind {kind!r}{source}; known: {sorted(ENCODER_KINDS)}")
    module, name = ENCODER_KINDS[kind]
    cls = getattr(importlib.import_module(f".{module}", __package__), name)
    if cls.kind != kind:
        raise RuntimeError(f"{name}.kind is {cls.kind!r}, registered as {kind!r}")
    return cls


def load_text_encoder(folder: str | Path, **overrides) -> TextEncoder:
    """The encoder save_pretrained wrote to folder; overrides set config fields (e.g. chunked=True)."""
    saved = read_config(folder)
    if saved is None:
        raise ValueError(f"{folder} has no {CONFIG_NAME}; was it written by a TextEncoder's save_pretrained?")
    return encoder_class(saved[0], f" in {Path(folder) / CONFIG_NAME}").from_pretrained(folder, **overrides)
