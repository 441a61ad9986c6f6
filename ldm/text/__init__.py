"""Text encoders behind one interface: TextEncoder.encode(list[str]) -> TextEncoding(embeddings, mask, pooled)."""
from .base import TextEncoder, TextEncoding
from .clip import CLIPEncoderConfig, CLIPTextEncoder
from .convert import hf_to_openclip_text, hf_to_sd1_text_keys, openclip_text_to_hf, sd1_text_keys_to_hf
from .factory import ENCODERS, load_text_encoder
from .hf import HFEncoderConfig, HFTextEncoder
from .openclip import OpenCLIPEncoderConfig, OpenCLIPTextEncoder
from .t5 import T5EncoderConfig, T5TextEncoder
from .tokenizers import clean_clip_text, clip_tokenizer

__all__ = [
    "TextEncoder", "TextEncoding", "load_text_encoder", "ENCODERS",
    "CLIPTextEncoder", "CLIPEncoderConfig", "OpenCLIPTextEncoder", "OpenCLIPEncoderConfig",
    "T5TextEncoder", "T5EncoderConfig", "HFTextEncoder", "HFEncoderConfig",
    "openclip_text_to_hf", "hf_to_openclip_text", "sd1_text_keys_to_hf", "hf_to_sd1_text_keys",
    "clip_tokenizer", "clean_clip_text",
]
