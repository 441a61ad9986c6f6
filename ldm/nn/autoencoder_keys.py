"""Interop for `ldm.nn.autoencoder`: diffusers AutoencoderKL / VQModel config.json <-> AutoencoderConfig, the
state-dict key map between diffusers' names and the original CompVis names this project uses, original
single-file checkpoints (`first_stage_model.*`), and architecture inference from a state dict.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

import torch

from .autoencoder import Autoencoder, AutoencoderConfig

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]

# -- config.json ---------------------------------------------------------------------------------------------


def diffusers_config_from_ours(config: AutoencoderConfig) -> dict[str, Any]:
    """diffusers' config.json for `config`; dropout and beta (training-only) have no diffusers field."""
    if config.attn_resolutions:
        raise ValueError(f"diffusers has no attention outside the mid block; attn_resolutions must be (), "
                         f"got {config.attn_resolutions}")
    if config.norm_eps != 1e-6:
        raise ValueError(f"diffusers fixes its VAE GroupNorm eps at 1e-6; norm_eps must be 1e-6, got {config.norm_eps}")
    if config.kind == "kl" and config.z_channels != config.embed_dim:
        raise ValueError(f"diffusers' AutoencoderKL needs embed_dim == z_channels={config.z_channels}, "
                         f"got embed_dim={config.embed_dim}")
    levels = len(config.ch_mult)
    d: dict[str, Any] = {
        "_class_name": "AutoencoderKL" if config.kind == "kl" else "VQModel",
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult], "layers_per_block": config.num_res_blocks,
        "act_fn": "silu", "latent_channels": config.z_channels, "norm_num_groups": config.num_groups,
        "sample_size": config.resolution, "scaling_factor": config.scaling_factor,
        "mid_block_add_attention": config.mid_attention,
    }
    if config.kind == "kl":
        d.update(shift_factor=config.shift_factor, use_quant_conv=True, use_post_quant_conv=True)
    else:
        d.update(num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim, norm_type="group")
    return d


def config_from_diffusers(d: Mapping[str, Any], **overrides) -> AutoencoderConfig:
    """AutoencoderConfig from diffusers' config.json; absent keys take diffusers' defaults."""
    kind = "vq" if d.get("_class_name") == "VQModel" or "num_vq_embeddings" in d else "kl"
    widths = list(d.get("block_out_channels", [64]))
    levels = len(widths)
    required = {"act_fn": (d.get("act_fn", "silu"), "silu"),
                "down_block_types": (list(d.get("down_block_types", ["DownEncoderBlock2D"])),
                                     ["DownEncoderBlock2D"] * levels),
                "up_block_types": (list(d.get("up_block_types", ["UpDecoderBlock2D"])), ["UpDecoderBlock2D"] * levels),
                "use_quant_conv": (d.get("use_quant_conv", True), True),
                "use_post_quant_conv": (d.get("use_post_quant_conv", True), True),
                "norm_type": (d.get("norm_type", "group"), "group")}
    for key, (got, expected) in required.items():
        if got != expected:
            raise ValueError(f"unsupported diffusers autoencoder config: {key} must be {expected!r}, got {got!r}")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels must be multiples of its first entry {ch}, got {widths}")
    latent = d.get("latent_channels", 4 if kind == "kl" else 3)
    size = d.get("sample_size", 32)
    args: dict[str, Any] = dict(
        kind=kind, in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), ch=ch,
        ch_mult=tuple(w // ch for w in widths), num_res_blocks=d.get("layers_per_block", 1), z_channels=latent,
        embed_dim=latent, mid_attention=d.get("mid_block_add_attention", True),
        num_groups=d.get("norm_num_groups", 32), resolution=size[0] if isinstance(size, (list, tuple)) else size,
        scaling_factor=d.get("scaling_factor", 0.18215), shift_factor=d.get("shift_factor"))
    if kind == "vq":
        args.update(embed_dim=d.get("vq_embed_dim") or latent, n_embed=d.get("num_vq_embeddings", 256))
    return AutoencoderConfig(**{**args, **overrides})


# -- architecture from weights -------------------------------------------------------------------------------


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def config_from_state_dict(sd: StateDict, **overrides) -> AutoencoderConfig:
    """Architecture read off original-named weights; num_groups, norm_eps, resolution, scaling/shift factor,
    dropout and beta do not show in the weights and take their defaults unless given in `overrides`."""
    try:
        conv_in = sd["encoder.conv_in.weight"]
        levels = len(_indices(sd, r"encoder\.down\.(\d+)\."))
        ch = conv_in.shape[0]
        args: dict[str, Any] = dict(
            kind="vq" if "quantize.embedding.weight" in sd else "kl", in_channels=conv_in.shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0], ch=ch,
            ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)),
            num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
            z_channels=sd["decoder.conv_in.weight"].shape[1], embed_dim=sd["post_quant_conv.weight"].shape[1],
            attn_resolutions=tuple(2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd),
            mid_attention="encoder.mid.attn_1.q.weight" in sd)
        if args["kind"] == "vq":
            args["n_embed"] = sd["quantize.embedding.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"cannot infer the autoencoder architecture: state dict has no key {e.args[0]!r}") from None
    return AutoencoderConfig(**{**args, **overrides})


def expected_keys(config: AutoencoderConfig) -> set[str]:
    """The state-dict keys of Autoencoder(config), built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return set(Autoencoder(config).state_dict())


def _structure(sd: StateDict, config: Optional[AutoencoderConfig]) -> AutoencoderConfig:
    # The GroupNorm group count does not show in the weights and does not change the key set; 1 fits any width.
    return config if config is not None else config_from_state_dict(sd, num_groups=1)


# -- key map -------------------------------------------------------------------------------------------------
# Each rule is (original-name template, diffusers-name template); a {field} matches one dotted component
# (or the alternatives of its table) and is translated between the two namings by _FIELDS.

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Attention names of diffusers < 0.14, still found in many hub VAE weights (e.g. sd-vae-ft-mse).
_ATTN_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}

_RULES = [
    ("{side}.conv_in.{p}", "{side}.conv_in.{p}"),
    ("{side}.conv_out.{p}", "{side}.conv_out.{p}"),
    ("{side}.norm_out.{p}", "{side}.conv_norm_out.{p}"),
    ("quant_conv.{p}", "quant_conv.{p}"),
    ("post_quant_conv.{p}", "post_quant_conv.{p}"),
    ("quantize.embedding.weight", "quantize.embedding.weight"),
    ("encoder.down.{n}.block.{n2}.{res}.{p}", "encoder.down_blocks.{n}.resnets.{n2}.{res}.{p}"),
    ("encoder.down.{n}.downsample.conv.{p}", "encoder.down_blocks.{n}.downsamplers.0.conv.{p}"),
    ("decoder.up.{up}.block.{n}.{res}.{p}", "decoder.up_blocks.{up}.resnets.{n}.{res}.{p}"),
    ("decoder.up.{up}.upsample.conv.{p}", "decoder.up_blocks.{up}.upsamplers.0.conv.{p}"),
    ("{side}.mid.block_{mid}.{res}.{p}", "{side}.mid_block.resnets.{mid}.{res}.{p}"),
    ("{side}.mid.attn_1.{attn}.{p}", "{side}.mid_block.attentions.0.{attn}.{p}"),
]


def _fields(levels: int) -> dict[str, tuple[str, str, Callable[[str], str], Callable[[str], str]]]:
    """name -> (original regex, diffusers regex, original->diffusers, diffusers->original)."""
    same = lambda s: s  # noqa: E731
    alt = lambda names: "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # noqa: E731
    flip = lambda s: str(levels - 1 - int(s))  # noqa: E731  diffusers counts up blocks from the lowest resolution
    attn_in = {**{v: k for k, v in _ATTN.items()}, **_ATTN_LEGACY}
    return {
        "side": ("encoder|decoder", "encoder|decoder", same, same),
        "p": ("weight|bias", "weight|bias", same, same),
        "n": (r"\d+", r"\d+", same, same),
        "n2": (r"\d+", r"\d+", same, same),
        "up": (r"\d+", r"\d+", flip, flip),
        "mid": ("1|2", "0|1", lambda s: str(int(s) - 1), lambda s: str(int(s) + 1)),
        "res": (alt(_RESNET), alt(_RESNET.values()), _RESNET.__getitem__, {v: k for k, v in _RESNET.items()}.__getitem__),
        "attn": (alt(_ATTN), alt(attn_in), _ATTN.__getitem__, attn_in.__getitem__),
    }


def _compile(template: str, fields: dict, side: int) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(s) if i % 2 == 0 else f"(?P<{s}>{fields[s][side]})" for i, s in enumerate(parts))
    return re.compile(pattern)


def _rename(keys, levels: int, to_diffusers: bool) -> tuple[dict[str, str], list[str]]:
    """({old key: new key}, keys no rule matches)."""
    fields = _fields(levels)
    src, convert = (0, 2) if to_diffusers else (1, 3)
    rules = [(_compile(r[src], fields, src), r[1 - src]) for r in _RULES]
    renamed, unknown = {}, []
    for key in keys:
        for pattern, target in rules:
            m = pattern.fullmatch(key)
            if m:
                renamed[key] = target.format(**{k: fields[k][convert](v) for k, v in m.groupdict().items()})
                break
        else:
            unknown.append(key)
    return renamed, unknown


def _is_attn_weight(our_key: str) -> bool:
    return re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", our_key) is not None


def _raise_bad_keys(what: str, unknown, missing) -> None:
    msg = []
    if unknown:
        msg.append(f"unknown keys: {', '.join(sorted(unknown))}")
    if missing:
        msg.append(f"missing keys: {', '.join(sorted(missing))}")
    if msg:
        raise ValueError(f"{what}: " + "; ".join(msg))


def autoencoder_state_dict_from_diffusers(sd: StateDict, config: Optional[AutoencoderConfig] = None
                                          ) -> dict[str, Tensor]:
    """diffusers AutoencoderKL / VQModel weights -> original names (Linear attention weights -> 1x1 convs).

    With no `config` the architecture is inferred from the weights. Unknown or missing keys raise ValueError.
    """
    levels = len(config.ch_mult) if config is not None else len(_indices(sd, r"decoder\.up_blocks\.(\d+)\."))
    renamed, unknown = _rename(sd, levels, to_diffusers=False)
    out = {new: sd[old][:, :, None, None] if _is_attn_weight(new) and sd[old].ndim == 2 else sd[old]
           for old, new in renamed.items()}
    expected = expected_keys(_structure(out, config))
    back = _rename(expected, levels, to_diffusers=True)[0]  # name missing keys as the caller's dict names them
    unknown += [old for old, new in renamed.items() if new not in expected]
    seen: dict[str, str] = {}
    unknown += [old for old, new in renamed.items() if seen.setdefault(new, old) != old]  # legacy + new name
    _raise_bad_keys("diffusers autoencoder state dict", unknown, [back[k] for k in expected - set(out)])
    return out


def autoencoder_state_dict_to_diffusers(sd: StateDict, config: Optional[AutoencoderConfig] = None
                                        ) -> dict[str, Tensor]:
    """Original-named autoencoder weights -> diffusers names (1x1-conv attention weights -> Linear)."""
    expected = expected_keys(_structure(sd, config))
    _raise_bad_keys("autoencoder state dict", set(sd) - expected, expected - set(sd))
    levels = len(config.ch_mult) if config is not None else len(_indices(sd, r"decoder\.up\.(\d+)\."))
    renamed, unknown = _rename(sd, levels, to_diffusers=True)
    _raise_bad_keys("autoencoder state dict", unknown, [])
    return {new: sd[old][:, :, 0, 0] if _is_attn_weight(old) else sd[old] for old, new in renamed.items()}


def autoencoder_state_dict_from_single_file(sd: StateDict, config: Optional[AutoencoderConfig] = None,
                                            prefix: str = "first_stage_model.") -> dict[str, Tensor]:
    """The autoencoder part of an original single-file checkpoint, prefix stripped; keys checked, not renamed."""
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no keys start with prefix={prefix!r}")
    # Some converted checkpoints store the mid-block attention projections as Linear weights.
    out = {k: v[:, :, None, None] if _is_attn_weight(k) and v.ndim == 2 else v for k, v in out.items()}
    expected = expected_keys(_structure(out, config))
    _raise_bad_keys("single-file autoencoder weights", [prefix + k for k in set(out) - expected],
                    [prefix + k for k in expected - set(out)])
    return out


def autoencoder_from_diffusers(model: torch.nn.Module, **overrides) -> Autoencoder:
    """An Autoencoder with the config and weights of a diffusers AutoencoderKL / VQModel instance."""
    config = config_from_diffusers(dict(model.config, _class_name=type(model).__name__), **overrides)
    ours = Autoencoder(config)
    ours.load_state_dict(autoencoder_state_dict_from_diffusers(model.state_dict(), config))
    return ours.to(next(model.parameters()).dtype)
