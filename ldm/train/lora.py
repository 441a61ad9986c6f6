"""Low-rank adaptation of the U-Net (LoRA, Hu et al. 2021): a frozen layer W gains a trainable update
(alpha / r) B A with A [r, in], B [out, r] and B = 0 at the start, so training begins from the base model.
Adapters are injected and trained with peft; this file saves them in one documented format and merges a LoRA
file into a plain U-Net, W <- W + scale * (alpha / r) B A, from that format or from diffusers, peft or kohya files.

File format "ldm-lora" (safetensors), for every adapted module under its name in this project's U-Net (the
original SD names, e.g. input_blocks.1.1.transformer_blocks.0.attn1.to_q):
    <module>.lora_A.weight  [r, in]   (Conv2d: [r, in, kh, kw])
    <module>.lora_B.weight  [out, r]  (Conv2d: [out, r, 1, 1])
    <module>.alpha          scalar    (kohya's convention: the tensors alone give the scaling alpha / r)
with metadata {"format": "ldm-lora", "rank": "4", "alpha": "4.0", "targets": '["to_k", ...]'} (JSON list).
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn

from ldm.checkpoints import load_state_dict, save_state_dict
from ldm.config import is_int, is_number
from ldm.nn.unet_diffusers import state_dict_to_diffusers

Tensor = torch.Tensor
PathLike = Union[str, Path]
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FORMAT = "ldm-lora"
ADAPTER = "default"  # peft's adapter name; not part of our keys
_LAYERS = (nn.Linear, nn.Conv2d)  # what peft's LoRA and merge_lora both handle
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")  # diffusers attn procs
_PEFT = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")  # peft, with or without the adapter-name infix
_UP_DOWN = re.compile(r"(.+)\.lora[._](down|up)\.weight")  # diffusers' LoRACompatibleLinear and kohya
_STRIP = ("base_model.model.", "model.diffusion_model.", "unet.")
_TEXT = ("text_encoder", "lora_te")  # text-encoder LoRA in combined files: not ours to merge


def _short_name(name: str) -> str:
    """input_blocks.1.1.transformer_blocks.0.attn1.to_out.0 -> to_out.0: the name a target is written as."""
    parts = name.split(".")
    last = max(i for i, p in enumerate(parts) if not p.isdigit())
    return ".".join(parts[last:])


def lora_layers(unet: nn.Module) -> dict[str, LoraLayer]:
    """The modules peft has wrapped with an adapter, by name."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def add_lora(unet: nn.Module, rank: int = 4, alpha: Optional[float] = None,
             targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0) -> nn.Module:
    """Wrap every Linear/Conv2d whose name is, or ends in ".<target>", with a LoRA adapter (in place); freeze the
    rest. alpha defaults to rank (scaling 1). Returns the same U-Net."""
    if not is_int(rank) or rank < 1:
        raise ValueError(f"rank must be a positive int; got {rank!r}")
    alpha = rank if alpha is None else alpha
    if not is_number(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}")
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1); got {dropout!r}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of module names; got {targets!r}")
    if lora_layers(unet):
        raise ValueError("the U-Net already has LoRA adapters")
    layers = [n for n, m in unet.named_modules() if isinstance(m, _LAYERS)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in layers):
            names = sorted({_short_name(n) for n in layers})
            raise ValueError(f"LoRA target {target!r} matches no Linear/Conv2d module of the U-Net; available "
                             f"names include {', '.join(names[:30])} (e.g. {layers[len(layers) // 2]})")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none")
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return unet


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The adapters in the "ldm-lora" key format (module docstring): lora_A, lora_B and alpha per module."""
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("the U-Net has no LoRA adapters (call add_lora first)")
    out = {}
    for name, m in layers.items():
        out[f"{name}.lora_A.weight"] = m.lora_A[ADAPTER].weight.detach().clone()
        out[f"{name}.lora_B.weight"] = m.lora_B[ADAPTER].weight.detach().clone()
        out[f"{name}.alpha"] = torch.tensor(float(m.lora_alpha[ADAPTER]))
    return out


def lora_metadata(unet: nn.Module) -> dict[str, str]:
    """{"format", "rank", "alpha", "targets"} of the adapters add_lora injected, as safetensors metadata strings."""
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("the U-Net has no LoRA adapters (call add_lora first)")
    first = next(iter(layers.values()))
    targets = sorted(unet.peft_config[ADAPTER].target_modules)  # peft keeps the config on the model it wrapped
    return {"format": FORMAT, "rank": str(first.r[ADAPTER]), "alpha": str(float(first.lora_alpha[ADAPTER])),
            "targets": json.dumps(targets)}


def save_lora(unet: nn.Module, path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write the adapters as an "ldm-lora" safetensors file, atomically; metadata: extra string entries."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors; got {path.name}")
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError(f"metadata must map strings to strings; got {extra!r}")
    meta = lora_metadata(unet)
    if set(extra) & set(meta):
        raise ValueError(f"metadata keys {sorted(set(extra) & set(meta))} are written by save_lora itself")
    save_state_dict(lora_state_dict(unet), path, metadata={**extra, **meta})
    return path


def read_lora(path: PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are read from .safetensors only; got {path.name}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_state_dict(path), metadata


def _module_names(unet: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a U-Net Linear/Conv2d (ours, diffusers', kohya's lora_unet_ form) -> ours."""
    ours = [n for n, m in unet.named_modules() if isinstance(m, _LAYERS)]
    names = {}
    try:
        theirs = state_dict_to_diffusers({f"{n}.weight": f"{n}.weight" for n in ours}, unet.config)
        names.update({k[:-len(".weight")]: v[:-len(".weight")] for k, v in theirs.items()})
    except ValueError:  # no diffusers layout for this configuration (resblock up/down sampling)
        pass
    names.update({n: n for n in ours})  # ours win where a name means something in both
    kohya = {"lora_unet_" + k.replace(".", "_"): v for k, v in names.items()}
    return {**names, **kohya}


def _parse_key(key: str) -> tuple[str, str]:
    """(module name as the file writes it, part in A / B / alpha) for the naming schemes we read."""
    m = _PROCESSOR.fullmatch(key)
    if m:
        return f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else ""), "A" if m[3] == "down" else "B"
    if key.endswith(".alpha"):
        return key[:-len(".alpha")], "alpha"
    m = _PEFT.fullmatch(key)
    if m:
        return m[1], m[2]
    m = _UP_DOWN.fullmatch(key)
    if m:
        return m[1], "A" if m[2] == "down" else "B"
    raise ValueError(f"{key!r} is not a LoRA tensor name (expected <module>.lora_A.weight / .lora_B.weight, "
                     "lora.down/up.weight, lora_down/up.weight or .alpha)")


def _strip(name: str) -> str:
    while name.startswith(_STRIP):
        name = name[len(next(p for p in _STRIP if name.startswith(p))):]
    return name


def merge_lora(unet: nn.Module, lora: Union[Mapping[str, Tensor], PathLike], scale: float = 1.0) -> dict[str, Tensor]:
    """W <- W + scale * (alpha / r) B A for every module in `lora` (a state dict or a .safetensors file) on a
    plain U-Net, in place. alpha: the module's .alpha tensor, else an "ldm-lora" file's metadata, else r (as
    diffusers). Everything is checked before any weight changes. Returns the original weights it changed,
    by parameter name (<module>.weight), for restore_weights."""
    if not is_number(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    if lora_layers(unet):
        raise ValueError("merge_lora works on a plain U-Net; this one has peft adapters (they already apply)")
    metadata = {}
    if not isinstance(lora, Mapping):
        lora, metadata = read_lora(lora)
    file_alpha = float(metadata["alpha"]) if metadata.get("format") == FORMAT and "alpha" in metadata else None
    names, modules = _module_names(unet), dict(unet.named_modules())
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    skipped = [k for k in lora if k.startswith(_TEXT)]
    if skipped:
        warnings.warn(f"ignoring {len(skipped)} text-encoder LoRA tensors (e.g. {skipped[0]}): only the U-Net is "
                      "patched")
    for key, tensor in lora.items():
        if key in skipped:
            continue
        written, part = _parse_key(key)
        module = names.get(_strip(written))
        if module is None:
            like = next((n for n in names.values() if n.endswith("." + written.rsplit(".", 1)[-1])), "")
            raise ValueError(f"LoRA key {key!r}: the U-Net has no Linear/Conv2d module {written!r} "
                             f"(ours are named like {like or next(iter(names.values()))})")
        if part in groups.setdefault(module, {}):
            raise ValueError(f"LoRA keys {groups[module][part][0]!r} and {key!r} both give {part} of {module}")
        groups[module][part] = (key, tensor)
    if not groups:
        raise ValueError("the LoRA holds no U-Net tensors")
    updates = []
    for module, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            have = ", ".join(k for k, _ in parts.values())
            raise ValueError(f"LoRA for {module} needs both down (A) and up (B) weights; found only {have}")
        (key_a, a), (key_b, b) = parts["A"], parts["B"]
        w = modules[module].weight
        fits = a.dim() == b.dim() == w.dim() and a.shape[1:] == w.shape[1:] and b.shape[0] == w.shape[0] \
            and b.shape[1] == a.shape[0] and b.shape[2:].numel() == 1
        if not fits:
            raise ValueError(f"LoRA {key_a} {tuple(a.shape)} / {key_b} {tuple(b.shape)} does not fit "
                             f"{module}.weight {tuple(w.shape)}: expected A [r, {', '.join(map(str, w.shape[1:]))}] "
                             f"and B [{w.shape[0]}, r{', 1' * (w.dim() - 2)}]")
        rank = a.shape[0]
        alpha = float(parts["alpha"][1]) if "alpha" in parts else file_alpha if file_alpha is not None else rank
        delta = (b.flatten(1).double() @ a.flatten(1).double()).reshape(w.shape) * (scale * alpha / rank)
        updates.append((module, w, delta))
    originals = {}
    with torch.no_grad():
        for module, w, delta in updates:
            originals[f"{module}.weight"] = w.detach().clone()
            w.add_(delta.to(w.device, w.dtype))
    return originals


def restore_weights(unet: nn.Module, originals: Mapping[str, Tensor]) -> None:
    """Put back the weights merge_lora returned (in place): undoes the merge exactly."""
    with torch.no_grad():
        for name, value in originals.items():
            unet.get_parameter(name).copy_(value)
