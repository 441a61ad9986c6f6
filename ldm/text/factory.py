"""Restore any saved text encoder from the kind named in its config json."""
from __future__ import annotations

from pathlib import Path

from .base import CONFIG_NAME, TextEncoder, read_config
from .clip import CLIPTextEncoder
from .hf import HFTextEncoder
from .openclip import OpenCLIPTextEncoder
from .t5 import T5TextEncoder

ENCODERS: dict[str, type[TextEncoder]] = {
    CLIPTextEncoder.kind: CLIPTextEncoder,
    OpenCLIPTextEncoder.kind: OpenCLIPTextEncoder,
    T5TextEncoder.kind: T5TextEncoder,
    HFTextEncoder.kind: HFTextEncoder,
}


def load_text_encoder(folder: str | Path, **overrides) -> TextEncoder:
    """The encoder save_pretrained wrote to folder; overrides set config fields (e.g. chunked=True)."""
    saved = read_config(folder)
    if saved is None:
        raise ValueError(f"{folder} has no {CONFIG_NAME}; was it written by a TextEncoder's save_pretrained?")
    kind = saved[0]
    if kind not in ENCODERS:
        raise ValueError(f"unknown text encoder kind {kind!r} in {Path(folder) / CONFIG_NAME}; "
                         f"known: {sorted(ENCODERS)}")
    return ENCODERS[kind].from_pretrained(folder, **overrides)
