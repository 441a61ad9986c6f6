"""The shapes recipe's U-Net run: caption and latent caches built once, then the U-Net trained on them with
caption dropout for classifier-free guidance and EMA."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoints import load_component
from ..data.folder import encode_caption_table, encode_latents
from ..data.shapes_dataset import ShapesDataset, example
from ..diffusion import training_losses
from ..nn.autoencoder import Autoencoder
from ..nn.unet import UNetConfig, UNetModel, load_shallower
from ..random import rand, randint
from ..text import HFTextEncoder
from .ema import EMA
from .shapes_autoencoder import load_autoencoder
from .shapes_card import model_history
from .shapes_common import (DIFFUSION, TEXT_MAX_LENGTH, UNET_CONFIG, Run, log_step, optimize, set_lr, training_parts,
                            training_source)
from .state import load_training_state, rng_state, save_training_state, set_rng_state


def _text_cache(text: HFTextEncoder, captions: list[str]) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """Token embeddings of every distinct caption (and of "", the unconditional one), computed once by the
    trainer's caption table, kept in float16."""
    table, embeddings, masks, _ = encode_caption_table(text, captions, batch_size=256)
    return {c: i for i, c in enumerate(table)}, embeddings.half(), masks


def prepare_text(args: argparse.Namespace, folder: Path, text: HFTextEncoder) -> dict:
    """The run's captions and their MiniLM token embeddings (text.pt); independent of the autoencoder, so it
    can be built while the autoencoder still trains (`prepare-text`)."""
    path = folder / "text.pt"
    if path.exists():
        return load_training_state(path)
    t0 = time.time()
    captions = ShapesDataset(length=args.num_images, seed=args.seed).captions()
    index, embs, masks = _text_cache(text, captions)
    cache = {"caption_ids": torch.tensor([index[c] for c in captions]), "embeddings": embs, "masks": masks,
             "empty_id": index[""]}
    save_training_state(cache, path)
    print(f"encoded {len(index)} distinct captions in {time.time() - t0:.0f} s", flush=True)
    return cache


def prepare_latents(args: argparse.Namespace, folder: Path, ae: Autoencoder) -> dict:
    """Latents (posterior means, encode(x, sample=False)) of the run's scenes (data.pt), computed once with the
    trained autoencoder by the trainer's encode_latents."""
    path = folder / "data.pt"
    if path.exists():
        return load_training_state(path)
    t0 = time.time()
    data = {"latents": encode_latents(ShapesDataset(length=args.num_images, seed=args.seed), ae, 1024)[0]}
    save_training_state(data, path)
    print(f"encoded {args.num_images} images in {time.time() - t0:.0f} s", flush=True)
    return data


def unet_config(transformer_depth: Optional[str] = None) -> UNetConfig:
    """The recipe's U-Net (UNET_CONFIG), with --transformer-depth ("2", or one per level: "1,2") if given."""
    if transformer_depth is None:
        return UNET_CONFIG
    try:
        depth = tuple(int(d) for d in transformer_depth.split(","))
    except ValueError:
        depth = ()
    if not depth or min(depth) < 1 or len(depth) not in (1, len(UNET_CONFIG.channel_mult)):
        raise SystemExit(f"--transformer-depth: expected a positive integer or {len(UNET_CONFIG.channel_mult)} "
                         f"comma-separated ones (one per level); got {transformer_depth!r}")
    return dataclasses.replace(UNET_CONFIG, transformer_depth=depth[0] if len(depth) == 1 else depth)


def unet_config_of(state: dict) -> UNetConfig:
    """The U-Net config a run's state.pt was trained with (runs saved before it was recorded used UNET_CONFIG)."""
    return UNetConfig.from_dict(state["unet_config"]) if "unet_config" in state else UNET_CONFIG


def binding_examples(num_images: int, seed: int) -> torch.Tensor:
    """Indices of the stream's scenes that teach attribute binding without a spatial cue: two objects differing
    in both color and shape, captioned "X and Y" (no relation word); about 7% of the stream."""
    found = []
    for i in range(num_images):
        scene, text = example(seed, i)
        a = scene.objects
        if len(a) == 2 and a[0].color != a[1].color and a[0].shape != a[1].shape and " and " in text:
            found.append(i)
    return torch.tensor(found, dtype=torch.long)


def train_unet(args: argparse.Namespace) -> None:
    if not 0 <= args.and_share < 1:
        raise SystemExit(f"--and-share must be in [0, 1); got {args.and_share}")
    config = unet_config(args.transformer_depth)  # checked before anything is written
    init = training_source("--init-from", args.init_from) if args.init_from is not None else None
    ae = load_autoencoder(args.ae)
    torch.manual_seed(args.seed)
    run = Run(args.run, args.minutes)
    text = HFTextEncoder.minilm(max_length=TEXT_MAX_LENGTH)
    if args.reencode and (run.folder / "data.pt").exists():
        (run.folder / "data.pt").unlink()  # the autoencoder has changed: encode the scenes again
    data = {**prepare_text(args, run.folder, text), **prepare_latents(args, run.folder, ae)}
    st = load_training_state(run.state_path) if run.state_path.exists() else None
    if st is not None:
        saved = unet_config_of(st)
        if args.transformer_depth is not None and saved != config:
            raise SystemExit(f"--transformer-depth {args.transformer_depth}: {args.run} was trained with "
                             f"transformer_depth {saved.transformer_depth}; a run keeps its architecture")
        config = saved
    model, denoiser, opt, ema, sampler = training_parts(config, DIFFUSION, args.lr, args.ema)
    step, elapsed, prior = 0, 0.0, None
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        step, elapsed, prior = st["step"], st["elapsed"], st.get("prior")
        set_rng_state(st["rng"])
        print(f"resumed at step {step}", flush=True)
    elif init is not None:
        if init.name == "state.pt":
            source_state = load_training_state(init)
            source = UNetModel(unet_config_of(source_state))
            averaged = EMA(source)
            averaged.load_state_dict(source_state["ema"])
            averaged.copy_to(source)
        else:
            source = load_component(init, "unet")
            prior = model_history(init)
        if source.config == config:
            model.load_state_dict(source.state_dict())
        else:
            grown = load_shallower(model, source.state_dict())
            print(f"grown from transformer_depth {source.config.transformer_depth} to {config.transformer_depth}: "
                  f"{len(grown)} new transformer blocks start as the identity", flush=True)
        ema = EMA(model, args.ema)
        print(f"initialized from the (EMA) weights of {args.init_from}", flush=True)
    n = len(data["latents"])
    k = round(args.and_share * args.batch)
    if k:
        pairs = binding_examples(n, args.seed)
        if not len(pairs):
            raise SystemExit(f"--and-share: none of the run's {n} scenes is two objects joined by 'and'; use more "
                             "--num-images")
        print(f"{k} of every {args.batch} scenes from the {len(pairs)} two-object 'and' scenes", flush=True)
    start = time.time()
    model.train()
    while not run.out_of_time():
        idx = randint(n, (args.batch,))  # from the global generator, which the run's state saves and restores
        if k:
            idx[:k] = pairs[randint(len(pairs), (k,))]
        z0 = data["latents"][idx]
        cap = data["caption_ids"][idx]
        drop = rand((args.batch,)) < args.cfg_dropout
        cap = torch.where(drop, torch.full_like(cap, data["empty_id"]), cap)
        context, mask = data["embeddings"][cap].float(), data["masks"][cap]
        t, weights = sampler.sample(args.batch)
        lr = set_lr(opt, args.lr, step, args.total_steps)
        losses = training_losses(denoiser, z0, t, context=context, context_mask=mask)
        loss = (losses["loss"] * weights).mean()
        optimize(model, opt, ema, loss)
        step += 1
        log_step(run, step, loss, lr, elapsed + time.time() - start)
        if run.due() or run.out_of_time():
            run.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "step": step,
                      "unet_config": config.to_dict(),
                      "elapsed": elapsed + time.time() - start, "rng": rng_state(),
                      **({"prior": prior} if prior else {})})
