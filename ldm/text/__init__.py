"""Text encoders behind one interface: TextEncoder.encode(list[str]) -> TextEncoding(embeddings, mask, pooled).

Names are imported on first use (PEP 562): each encoder pulls in a heavy library (transformers, open_clip,
sentencepiece), and a user of one should not pay for the others at `import ldm.text`."""
from __future__ import annotations

import importlib

_HOMES = {
    "TextEncoder": "base", "TextEncoding": "base",
    "CLIPTextEncoder": "clip", "CLIPEncoderConfig": "clip",
    "OpenCLIPTextEncoder": "openclip", "OpenCLIPEncoderConfig": "openclip",
    "T5TextEncoder": "t5", "T5EncoderConfig": "t5",
    "HFTextEncoder": "hf", "HFEncoderConfig": "hf",
    "BertTextEncoder": "bert", "BertEncoderConfig": "bert",
    "load_text_encoder": "factory", "encoder_class": "factory", "ENCODER_KINDS": "factory",
    "openclip_text_to_hf": "convert", "hf_to_openclip_text": "convert",
    "sd1_text_keys_to_hf": "convert", "hf_to_sd1_text_keys": "convert",
    "clip_tokenizer": "tokenizers", "clean_clip_text": "tokenizers",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
