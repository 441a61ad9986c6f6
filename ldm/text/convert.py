"""Key maps between original Stable Diffusion text-encoder keys (SD1 transformers CLIP, SD2 OpenCLIP) and HF CLIP.

HF keys are written in their checkpoint form, `text_model.` + module path (plus `text_projection.weight` for
CLIPTextModelWithProjection), as diffusers folders and SD1 single files store them.
"""
from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..nn.keymap import load_exact

SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."
HF_PREFIX = "text_model."
_HF_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
POSITION_IDS = HF_PREFIX + "embeddings.position_ids"

# OpenCLIP residual-block names -> HF CLIP encoder-layer names (attn.in_proj_* is split separately).
_BLOCK_MAP = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_MAP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# Keys of a whole OpenCLIP model that the text encoder has no use for.
_OPENCLIP_IGNORED = re.compile(r"^(logit_scale|logit_bias|attn_mask|visual\..*)$")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under prefix, prefix removed; a whole checkpoint (U-Net, VAE, ...) may be passed."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"state_dict has no key starting with {prefix!r}")
    return out


def canonical_clip_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text keys in checkpoint form: `text_model.` added where transformers 5 leaves it off."""
    return {HF_PREFIX + k if k.startswith(_HF_ROOTS) else k: v for k, v in state_dict.items()}


def load_clip_text_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Strict load of checkpoint-form HF CLIP text keys into a CLIPTextModel(WithProjection) of any transformers;
    keys that do not fit are a ValueError naming them and `what` (the file)."""
    state_dict = canonical_clip_keys(state_dict)
    state_dict.pop(POSITION_IDS, None)  # a non-persistent buffer in current transformers
    own = model.state_dict()
    if POSITION_IDS in own:  # older transformers keep position_ids in the state dict
        state_dict[POSITION_IDS] = own[POSITION_IDS]
    # transformers 5's CLIPTextModel holds its modules directly, without the text_model. level.
    with_prefix = any(k.startswith(HF_PREFIX) for k in own)
    if not with_prefix:
        state_dict = {k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k: v for k, v in state_dict.items()}
    load_exact(model, state_dict, what)


def openclip_text_to_hf(state_dict: dict[str, torch.Tensor], *, prefix: str = SD2_PREFIX,
                        penultimate: bool = False, projection: bool = False) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (SD2 single-file keys by default) -> HF CLIPTextModel keys.

    penultimate drops the last residual block, so the HF model's output (with its final layer norm) is SD2's
    FrozenOpenCLIPEmbedder(layer="penultimate"). projection keeps text_projection (transposed) for
    CLIPTextModelWithProjection; logit_scale and vision keys are dropped.
    """
    src = _strip(state_dict, prefix)
    blocks = sorted({int(m.group(1)) for k in src if (m := _RESBLOCK.match(k))})
    if blocks != list(range(len(blocks))) or not blocks:
        raise ValueError(f"expected transformer.resblocks.0..N-1, found block indices {blocks}")
    keep_layers = len(blocks) - 1 if penultimate else len(blocks)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in src.items():
        if key in _TOP_MAP:
            out[HF_PREFIX + _TOP_MAP[key]] = value
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif m := _RESBLOCK.match(key):
            layer, rest = int(m.group(1)), m.group(2)
            if layer >= keep_layers:
                continue
            base = f"{HF_PREFIX}encoder.layers.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.clone()
            elif (module := rest.rsplit(".", 1)[0]) in _BLOCK_MAP:
                out[base + _BLOCK_MAP[module] + "." + rest.rsplit(".", 1)[1]] = value
            else:
                unknown.append(key)
        elif not _OPENCLIP_IGNORED.match(key):
            unknown.append(key)
    if unknown:
        raise ValueError(f"unrecognised OpenCLIP text keys: {unknown[:8]}")
    return out


def hf_to_openclip_text(state_dict: dict[str, torch.Tensor], *, prefix: str = SD2_PREFIX) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel(WithProjection) keys -> OpenCLIP text keys under prefix; inverse of openclip_text_to_hf."""
    src = {k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k: v for k, v in state_dict.items()}
    src.pop("embeddings.position_ids", None)
    top = {hf: oc for oc, hf in _TOP_MAP.items()}
    block = {hf: oc for oc, hf in _BLOCK_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in src.items():
        if key in top:
            out[prefix + top[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.t().contiguous()
        elif m := _HF_LAYER.match(key):
            layer, rest = int(m.group(1)), m.group(2)
            module, param = rest.rsplit(".", 1)
            base = f"{prefix}transformer.resblocks.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module.rsplit(".", 1)[1]] = value
            elif module in block:
                out[base + block[module] + "." + param] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unrecognised HF CLIP text keys: {unknown[:8]}")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise ValueError(f"layer {layer} {param}: q/k/v incomplete, have {sorted(parts)}")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def sd1_text_keys_to_hf(state_dict: dict[str, torch.Tensor], *, prefix: str = SD1_PREFIX) -> dict[str, torch.Tensor]:
    """SD1 single-file text keys (prefix + HF CLIPTextModel keys) -> HF keys; position_ids, if stored, are dropped."""
    out = canonical_clip_keys(_strip(state_dict, prefix))
    position_ids = out.pop(POSITION_IDS, None)
    if position_ids is not None:
        expected = torch.arange(position_ids.shape[-1])
        # Some merged SD1 files carry drifted float position ids; the model always uses arange.
        if not torch.equal(position_ids.reshape(-1).to(torch.float64), expected.to(torch.float64)):
            warnings.warn("stored text_model.embeddings.position_ids are not 0..N-1; ignored (arange is used)",
                          stacklevel=2)
    return out


def hf_to_sd1_text_keys(state_dict: dict[str, torch.Tensor], *, prefix: str = SD1_PREFIX,
                        position_ids: bool = True) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel keys -> SD1 single-file keys; position_ids adds the int64 [1, N] buffer original files hold."""
    out = {prefix + k: v for k, v in canonical_clip_keys(state_dict).items() if k != POSITION_IDS}
    if position_ids:
        positions = _num_positions(state_dict)
        out[prefix + POSITION_IDS] = torch.arange(positions, dtype=torch.long)[None]
    return out


def _num_positions(state_dict: dict[str, torch.Tensor]) -> int:
    """Number of positions of an HF CLIP text state dict (rows of its position embedding)."""
    weight = canonical_clip_keys(state_dict)[HF_PREFIX + "embeddings.position_embedding.weight"]
    return weight.shape[0]
