"""The recipe that trains the shipped shapes-64 model on the CPU: a KL (or VQ) autoencoder on rendered shapes
scenes, then a cross-attention U-Net on its latents conditioned on frozen MiniLM token embeddings, with
classifier-free caption dropout and EMA. Runs against a time budget, checkpoints atomically every few
minutes and resumes from the last checkpoint, so it can be spread over several sessions.

    python -m ldm.train.shapes autoencoder --run runs/ae --minutes 20
    python -m ldm.train.shapes unet --run runs/unet --ae runs/ae --minutes 60
    python -m ldm.train.shapes export --ae runs/ae --unet runs/unet --out weights/shapes-64
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoints import PIPELINE_FILE, load_component, resolve, save_pipeline, write_json
from ..cli import int_at_least
from ..data.folder import encode_caption_table
from ..data.images import to_model_range
from ..data.shapes import example, make_batch
from ..diffusion import Denoiser, UniformSampler, training_losses
from ..diffusion.config import DiffusionConfig
from ..eval.metrics import psnr
from ..nn.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderOutput
from ..nn.unet import UNetConfig, UNetModel, load_shallower
from ..nn.vq_init import fold_kl_encoder, kmeans
from ..text import HFTextEncoder
from .ema import EMA
from .shapes_card import AE_CARD, HISTORY_FILE, TRAINING_FILE, model_history, render_model_card, rewrite_card
from .state import load_training_state, rng_state, save_training_state, set_rng_state
from .trainer_utils import cosine_decay

# 64x64x3 -> 8x8x8 latents (f=8): small enough that the U-Net runs at 8x8, which is what makes CPU sampling fast.
AE_CONFIGS = {
    "kl": AutoencoderConfig(kind="kl", ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=8, embed_dim=8,
                            num_groups=8, resolution=64, scaling_factor=1.0),
    "vq": AutoencoderConfig(kind="vq", ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=8, embed_dim=8,
                            num_groups=8, resolution=64, scaling_factor=1.0, n_embed=4096, beta=0.25),
}
UNET_CONFIG = UNetConfig(in_channels=8, out_channels=8, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(1, 2), num_heads=4, context_dim=384, sample_size=8,
                         mask_context=True)
# The shipped models' default sampler: DPM-Solver++(2M) drew more prompts right than DDIM at 20 steps (README).
# the sampling defaults a folder stores: the settings the benchmark is measured with (20 steps, guidance 3)
DIFFUSION = DiffusionConfig(schedule="cosine", prediction_type="v", spacing="trailing", sampler="dpmpp_2m",
                            num_inference_steps=20, guidance_scale=3.0)
TEXT_MAX_LENGTH = 24  # the longest shapes caption is 20 MiniLM tokens


def hardware() -> str:
    """CPU model and the threads torch uses (or the CUDA device), for logs and the model card."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


class Run:
    """A run folder: log.csv, state.pt (resume) and the time budget."""

    def __init__(self, folder: str, minutes: float, every_minutes: float = 3.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.deadline = time.time() + 60 * minutes
        self.every = 60 * every_minutes
        self.last_save = time.time()
        self.state_path = self.folder / "state.pt"
        with open(self.folder / "commands.txt", "a") as f:  # every invocation, for the model card
            f.write(f"{time.strftime('%Y-%m-%d %H:%M')}  python -m ldm.train.shapes {' '.join(sys.argv[1:])}"
                    f"  # {hardware()}\n")

    def log(self, row: dict) -> None:
        path = self.folder / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def due(self) -> bool:
        return time.time() - self.last_save > self.every

    def out_of_time(self) -> bool:
        return time.time() > self.deadline

    def save(self, state: dict) -> None:
        save_training_state(state, self.state_path)
        self.last_save = time.time()


def training_source(flag: str, folder: str) -> Path:
    """What a run starts from, checked before anything is written: a run folder (its state.pt), or a model folder
    in this project's format (a path, or the name of a shipped model such as shapes-64), so training can go on from
    the shipped weights when the run folders are gone."""
    state = Path(folder) / "state.pt"
    if state.is_file():
        return state
    try:
        model = resolve(folder)
    except FileNotFoundError:
        model = None
    if model is not None and (model / PIPELINE_FILE).is_file():
        return model
    raise SystemExit(f"{flag} {folder!r}: no run there (expected {state}) and no model folder ({PIPELINE_FILE})")


def train_autoencoder(args: argparse.Namespace) -> None:
    if args.init_from_kl is not None and args.kind != "vq":
        raise SystemExit("--init-from-kl initializes a VQ autoencoder; pass --kind vq")
    if args.init_from_kl is not None and args.init_from is not None:
        raise SystemExit("pass one of --init-from (same kind) and --init-from-kl (a VQ run from a KL one)")
    init = training_source("--init-from-kl", args.init_from_kl) if args.init_from_kl is not None else None
    same = training_source("--init-from", args.init_from) if args.init_from is not None else None
    if same is not None:  # checked before the run folder is made
        same_state = autoencoder_weights(same)
        if autoencoder_kind(same_state) != args.kind:
            raise SystemExit(f"--init-from {args.init_from}: not a {args.kind.upper()} autoencoder "
                             "(pass --kind to match)")
    init_state = autoencoder_weights(init) if init is not None else None
    if init_state is not None and autoencoder_kind(init_state) != "kl":
        raise SystemExit(f"--init-from-kl {args.init_from_kl}: not a KL autoencoder")
    resumed = Path(args.run) / "state.pt"
    st = load_training_state(resumed) if resumed.exists() else None  # read once: checked here, resumed below
    if st is not None and st.get("decoder_only", False) != args.decoder_only:
        raise SystemExit(f"{args.run} was trained with{'out' if args.decoder_only else ''} --decoder-only; resume it "
                         "the same way")
    if args.decoder_only and same is None and init is None and st is None:
        raise SystemExit("--decoder-only fine-tunes the decoder of a trained autoencoder: pass --init-from (or "
                         "--init-from-kl: a VQ decoder on the frozen, folded KL encoder)")
    torch.manual_seed(args.seed)
    run = Run(args.run, args.minutes)
    model = Autoencoder(autoencoder_config(st["model"]) if st is not None else AE_CONFIGS[args.kind])
    if args.kind == "kl":
        # Start the posterior narrow (std e^-5): at the default init its std is ~1, the sampled latent is mostly
        # noise, and the decoder spends thousands of steps waiting for the log-variance to fall (measured: 18 dB
        # after 400 steps). The KL weight is tiny, so this only changes the start, not what is learned.
        with torch.no_grad():
            model.quant_conv.bias[model.config.embed_dim:].fill_(-10.0)
    # --decoder-only: the encoder and its latent moments stay fixed, so latents encoded before (a U-Net's training
    # data) stay valid and a U-Net trained on them keeps working with the fine-tuned decoder
    trainable = decoder_parameters(model) if args.decoder_only else list(model.parameters())
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    step, elapsed, prior = 0, 0.0, None
    if st is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed, prior = st["step"], st["elapsed"], st.get("prior")
        set_rng_state(st["rng"])
        print(f"resumed at step {step}")
    elif same is not None:
        prior = autoencoder_history(same)
        model.load_state_dict(same_state)
        print(f"initialized from the autoencoder in {args.init_from} ({prior['autoencoder_steps']} steps)", flush=True)
    elif init is not None:
        prior = {**autoencoder_history(init), "folded_kl": True}
        vq_from_kl(model, init_state, seed=args.seed)
        print(f"initialized from the KL autoencoder in {args.init_from_kl} ({prior['autoencoder_steps']} steps)",
              flush=True)
    reg_weight = args.reg_weight if args.reg_weight is not None else {"kl": 1e-6, "vq": 1.0}[args.kind]
    val_images, _ = make_batch(256, seed=10**6, size=64)
    val = to_model_range(val_images)
    start = time.time()
    # the learning rate is 0 from --total-steps on (cosine to 0), so the run ends there or at --minutes
    while not run.out_of_time() and step < args.total_steps:
        images, _ = make_batch(args.batch, seed=args.seed * 10**7 + step, size=64)
        x = to_model_range(images)
        if args.decoder_only:
            with torch.no_grad():
                z = model.encode(x, sample=False)  # posterior mean (VQ: pre-quantization): what a U-Net trains on
            out = AutoencoderOutput(model.decode(z), torch.zeros(()))
        else:
            out = model(x)
        rec = out.reconstruction
        weight = foreground_weight(x, args.fg_weight)
        loss = (weight * ((rec - x).abs() + (rec - x).pow(2))).mean() + reg_weight * out.reg_loss
        lr = args.lr * min(1.0, (step + 1) / 200) * cosine_decay(step / args.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        last = run.out_of_time() or step >= args.total_steps
        if step % 100 == 0 or run.due() or last:
            model.eval()
            with torch.no_grad():
                val_psnr = psnr(model.decode(model.encode(val[:64], sample=False)), val[:64])
            model.train()
            now = elapsed + time.time() - start
            run.log({"step": step, "loss": f"{loss.item():.5f}", "reg": f"{out.reg_loss.item():.4f}",
                     "val_psnr": f"{val_psnr:.2f}", "lr": f"{lr:.2e}", "seconds": f"{now:.0f}"})
            print(f"step {step} loss {loss.item():.4f} val PSNR {val_psnr:.2f} dB ({now:.0f} s)", flush=True)
        if run.due() or last:
            run.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                      "elapsed": elapsed + time.time() - start, "rng": rng_state(), "decoder_only": args.decoder_only,
                      **({"prior": prior} if prior else {})})


def decoder_parameters(model: Autoencoder) -> list:
    """The parameters --decoder-only trains (post_quant_conv and the decoder); freezes all the others."""
    model.requires_grad_(False)
    parts = [model.post_quant_conv, model.decoder]
    for part in parts:
        part.requires_grad_(True)
    return [p for part in parts for p in part.parameters()]


def autoencoder_weights(source: Path) -> dict:
    """The autoencoder state dict of a source from training_source: a run's state.pt or a model folder."""
    return load_training_state(source)["model"] if source.name == "state.pt" else \
        load_component(source, "vae").state_dict()


def autoencoder_kind(state: dict) -> str:
    """"vq" for the weights of a VQ autoencoder (they hold a codebook), else "kl"."""
    return "vq" if any(k.startswith("quantize.") for k in state) else "kl"


def autoencoder_config(state: dict) -> AutoencoderConfig:
    """The recipe's config for an autoencoder state dict: its kind, and for VQ the codebook size it was trained
    with (runs from before the codebook grew to 4096 entries had 1024)."""
    config = AE_CONFIGS[autoencoder_kind(state)]
    if config.kind == "vq":
        config = dataclasses.replace(config, n_embed=state["quantize.embedding.weight"].shape[0])
    return config


def autoencoder_history(source: Path) -> dict:
    """Steps, minutes and commands behind the autoencoder a run starts from (--init-from): a run's state.pt (and
    what it in turn started from) or a shipped model folder. For a run, "prior" is what that run itself started
    from (None when it started from scratch)."""
    if source.name != "state.pt":
        history = model_history(source)
        return {"source": str(source), "prior": None, "decoder_only": False,
                **{k: history[k] for k in ("commands", "autoencoder_steps", "autoencoder_minutes")}}
    st = load_training_state(source)
    prior = st.get("prior")
    before = prior or {"commands": "", "autoencoder_steps": 0, "autoencoder_minutes": 0}
    log = source.parent / "commands.txt"
    commands = "\n".join(c for c in (before["commands"], log.read_text() if log.exists() else "") if c.strip())
    return {"source": str(source.parent), "commands": commands, "prior": prior,
            "decoder_only": st.get("decoder_only", False),
            "autoencoder_steps": before["autoencoder_steps"] + st["step"],
            "autoencoder_minutes": before["autoencoder_minutes"] + st["elapsed"] / 60}


def vq_from_kl(vq: Autoencoder, kl_state: dict, seed: int = 0, num_images: int = 4096) -> None:
    """Start a VQ autoencoder from a trained KL one (ldm.nn.vq_init): the KL encoder's mean path folded in, so the
    pre-quantization latent equals the KL posterior mean exactly, and the codebook set by k-means on those
    latents of `num_images` shapes scenes."""
    if autoencoder_kind(kl_state) == "vq":
        raise ValueError("kl_state must be a KL autoencoder's state dict, not a VQ one")
    state = fold_kl_encoder(kl_state, vq.config)
    images, _ = make_batch(num_images, seed=seed * 10**7 + 5 * 10**6, size=64)
    vq.load_state_dict({**state, "quantize.embedding.weight": vq.quantize.embedding.weight})
    with torch.no_grad():
        z = torch.cat([vq._moments(to_model_range(images[i:i + 512])) for i in range(0, num_images, 512)])
        vq.quantize.embedding.weight.copy_(kmeans(z.permute(0, 2, 3, 1).reshape(-1, vq.config.embed_dim),
                                                  vq.config.n_embed, seed=seed))


def foreground_weight(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Per-pixel loss weight [B, 1, H, W]: fg_weight on object pixels (those away from the background color, the
    median of the border), 1 elsewhere. Objects cover ~10 % of a scene, so an unweighted
    loss is mostly background and the autoencoder learns object colors late (measured: after 400 steps it drew
    every object in one average pink)."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    foreground = ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
    return 1 + (fg_weight - 1) * foreground


def load_autoencoder(folder: str) -> Autoencoder:
    """The trained autoencoder of a run, with its latent scale set to 1/std of the latents (Rombach et al. 4.3.2),
    or that of a model folder, with the scale it shipped with."""
    source = training_source("--ae", folder)
    if source.name != "state.pt":
        return load_component(source, "vae")
    st = load_training_state(source)
    model = Autoencoder(autoencoder_config(st["model"]))
    model.load_state_dict(st["model"])
    model.eval()
    images, _ = make_batch(512, seed=2 * 10**6, size=64)
    with torch.no_grad():
        z = model.encode(to_model_range(images), sample=False)
    return rescaled(model, scaling_factor=round(1 / z.std().item(), 5))


def rescaled(ae: Autoencoder, **latent_scale) -> Autoencoder:
    """A copy of ae (eval mode) with another scaling_factor / shift_factor: same weights, other latent units."""
    scaled = Autoencoder(AutoencoderConfig.from_dict({**ae.config.to_dict(), **latent_scale}))
    scaled.load_state_dict(ae.state_dict())
    return scaled.eval()


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
    _, captions = make_batch(args.num_images, seed=args.seed, size=16)  # captions only: tiny renders
    index, embs, masks = _text_cache(text, captions)
    cache = {"caption_ids": torch.tensor([index[c] for c in captions]), "embeddings": embs, "masks": masks,
             "empty_id": index[""]}
    save_training_state(cache, path)
    print(f"encoded {len(index)} distinct captions in {time.time() - t0:.0f} s", flush=True)
    return cache


def prepare_latents(args: argparse.Namespace, folder: Path, ae: Autoencoder) -> dict:
    """Latents (posterior means) of the run's scenes (data.pt), computed once with the trained autoencoder."""
    path = folder / "data.pt"
    if path.exists():
        return load_training_state(path)
    t0 = time.time()
    latents = []
    with torch.no_grad():
        for start in range(0, args.num_images, 1024):
            n = min(1024, args.num_images - start)
            images, _ = make_batch(n, seed=args.seed, size=64, start=start)
            latents.append(ae.encode(to_model_range(images), sample=False))
    data = {"latents": torch.cat(latents)}
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
    model = UNetModel(config)
    schedule = DIFFUSION.build_schedule()
    denoiser = Denoiser(model, schedule, DIFFUSION.prediction_type)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ema = EMA(model, args.ema)
    sampler = UniformSampler(schedule.num_timesteps)
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
        idx = torch.randint(0, n, (args.batch,))
        if k:
            idx[:k] = pairs[torch.randint(0, len(pairs), (k,))]
        z0 = data["latents"][idx]
        cap = data["caption_ids"][idx]
        drop = torch.rand(args.batch) < args.cfg_dropout
        cap = torch.where(drop, torch.full_like(cap, data["empty_id"]), cap)
        context, mask = data["embeddings"][cap].float(), data["masks"][cap]
        t, weights = sampler.sample(args.batch)
        lr = args.lr * min(1.0, (step + 1) / 500) * lr_decay(step, args.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        losses = training_losses(denoiser, z0, t, context=context, context_mask=mask)
        loss = (losses["loss"] * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        step += 1
        if step % 100 == 0:
            now = elapsed + time.time() - start
            run.log({"step": step, "loss": f"{loss.item():.5f}", "lr": f"{lr:.2e}", "seconds": f"{now:.0f}"})
            print(f"step {step} loss {loss.item():.4f} ({now:.0f} s)", flush=True)
        if run.due() or run.out_of_time():
            run.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "step": step,
                      "unet_config": config.to_dict(),
                      "elapsed": elapsed + time.time() - start, "rng": rng_state(),
                      **({"prior": prior} if prior else {})})


def lr_decay(step: int, total_steps) -> float:
    """Cosine from 1 down to 0.1 over total_steps, then 0.1 (1 throughout when total_steps is None): ending a run
    on a low rate is what lets the weights settle."""
    return 1.0 if total_steps is None else cosine_decay(step / total_steps, floor=0.1)


def plot_curve(log_csv: Path, column: str, png: Path, title: str) -> None:
    """A loss curve as a small PNG, drawn with PIL (no plotting library needed): log-scale y over steps."""
    from PIL import Image, ImageDraw

    rows = list(csv.DictReader(open(log_csv)))
    steps = np.array([float(r["step"]) for r in rows])
    values = np.array([float(r[column]) for r in rows])
    if len(rows) > 20:  # smooth over ~2 % of the run
        k = max(1, len(rows) // 50)
        values = np.convolve(values, np.ones(k) / k, mode="valid")
        steps = steps[k - 1:]
    w, h, m = 640, 360, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    logv = np.log10(np.maximum(values, 1e-12))
    lo, hi = logv.min(), logv.max() + 1e-9
    xs = m + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (w - 2 * m)
    ys = h - m - (logv - lo) / (hi - lo) * (h - 2 * m)
    draw.rectangle([m, m, w - m, h - m], outline="black")
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(30, 80, 200), width=2)
    draw.text((m, 15), title, fill="black")
    draw.text((m, h - m + 8), f"step {int(steps.min())}", fill="black")
    draw.text((w - m - 80, h - m + 8), f"step {int(steps.max())}", fill="black")
    draw.text((5, m - 12), f"{10 ** hi:.3g}", fill="black")
    draw.text((5, h - m), f"{10 ** lo:.3g}", fill="black")
    img.save(png)


def export(args: argparse.Namespace) -> None:
    """Write the EMA U-Net, the autoencoder and MiniLM as a pipeline folder in our format, then its model card.
    --unet may also be a model folder (shapes-64), whose U-Net is exported unchanged: for an autoencoder whose
    decoder alone was fine-tuned (--decoder-only), the latents that U-Net was trained on are the same."""
    ae = load_autoencoder(args.ae)
    unet_source = training_source("--unet", args.unet)
    st = load_training_state(unet_source) if unet_source.name == "state.pt" else None
    history = training_history(args, st)  # read before the folder is written: --ae or --unet may be the --out folder
    kept = Path(args.out) / HISTORY_FILE  # the model's written history goes on into the new folder
    narrative = kept.read_text() if kept.is_file() else ""
    if st is None:
        model = load_component(unet_source, "unet")
        ae = with_latents_of(ae, load_component(unet_source, "vae"), f"--ae {args.ae}", unet_source)
    else:
        model = UNetModel(unet_config_of(st))
        ema = EMA(model)
        ema.load_state_dict(st["ema"])
        ema.copy_to(model)
    text = HFTextEncoder.minilm(max_length=TEXT_MAX_LENGTH)
    save_pipeline(model.eval(), ae, text, DIFFUSION, args.out)
    out = Path(args.out)
    if narrative:
        (out / HISTORY_FILE).write_text(narrative)
    for part, run_folder, title, earlier in (
            ("unet", args.unet, "U-Net training loss (v-prediction MSE)", history["prior_unet_steps"]),
            ("autoencoder", args.ae, "autoencoder loss (L1 + MSE)", history["prior_ae_steps"])):
        curve = history[f"{part}_curve"]
        if curve is None and not (Path(run_folder) / "log.csv").exists():
            continue  # a model folder shipped without its curve
        if curve is None:
            plot_curve(Path(run_folder) / "log.csv", "loss", out / f"{part}_loss.png",
                       title + (f", after {earlier} steps in earlier runs" if earlier else ""))
        else:
            (out / f"{part}_loss.png").write_bytes(curve)
    print(f"wrote {args.out} (U-Net {history['unet_steps']} steps, {history['unet_minutes']:.0f} min)", flush=True)
    if not args.no_card:
        write_model_card(args, history)


def with_latents_of(ae: Autoencoder, reference: Autoencoder, flag: str, folder: Path) -> Autoencoder:
    """ae with the latent scale of reference, the autoencoder of a model folder whose U-Net is exported unchanged;
    refused unless the two encode alike, since that U-Net needs its latents: the same unscaled latents (posterior
    means; for VQ the pre-quantization latents) of a fixed batch of scenes, to 1e-4. A decoder-only fine-tune of
    reference gives them exactly, a VQ autoencoder folded from it and trained decoder-only (--init-from-kl
    --decoder-only) to float rounding (~1e-5)."""
    x = to_model_range(make_batch(16, seed=4 * 10**6, size=64)[0])
    with torch.no_grad():
        ours, theirs = (rescaled(m, scaling_factor=1.0, shift_factor=None).encode(x, sample=False)
                        for m in (ae, reference))
    if not torch.allclose(ours, theirs, rtol=0, atol=1e-4):
        raise SystemExit(f"{flag}: it does not encode like the autoencoder of {folder}, whose U-Net is exported "
                         f"unchanged (max latent difference {(ours - theirs).abs().max().item():.2g}; train it with "
                         f"--decoder-only --init-from {folder.name}, or --kind vq --decoder-only --init-from-kl "
                         f"{folder.name})")
    return rescaled(ae, scaling_factor=reference.config.scaling_factor, shift_factor=reference.config.shift_factor)


def _curve(folder: Path, name: str) -> bytes | None:
    png = folder / name
    return png.read_bytes() if png.exists() else None


def training_history(args: argparse.Namespace, unet_state: dict | None) -> dict:
    """Steps, minutes and commands behind both parts, including the training of a model folder that the
    autoencoder is (--ae shapes-64), that the U-Net run started from (--init-from shapes-64), or whose U-Net is
    exported unchanged (unet_state None: --unet is a model folder)."""
    ae_source = training_source("--ae", args.ae)
    if ae_source.name == "state.pt":
        ae = autoencoder_history(ae_source)
        ae_steps, ae_minutes, ae_curve, ae_commands = ae["autoencoder_steps"], ae["autoencoder_minutes"], None, \
            ae["commands"]
        ae_prior = ae["prior"] or {"autoencoder_steps": 0}
        ae_folded = ae["decoder_only"] and ae_prior.get("folded_kl", False)
        ae_prior_steps = ae_prior["autoencoder_steps"]
        ae_note = (f" Started from the autoencoder of {Path(ae_prior['source']).name} ({ae_prior_steps} steps), "
                   f"then {ae_steps - ae_prior_steps} steps in this run; the totals count both."
                   if ae_prior_steps else "")
        if ae_folded:
            ae_note += (" This run trained the decoder only (`--decoder-only --init-from-kl`, L1 + MSE on the "
                        "codebook vectors nearest the latents): the encoder is the KL one's mean path folded and "
                        "frozen, so the pre-quantization latents are its posterior means, and the codebook is "
                        "k-means on them.")
        elif ae["decoder_only"]:
            ae_note += (" This run trained the decoder only (`--decoder-only`, on posterior means, L1 + MSE "
                        "without the regularizer): the encoder, and so the latents, are those it started from.")
    else:
        shipped = model_history(ae_source)
        ae_steps, ae_minutes = shipped["autoencoder_steps"], shipped["autoencoder_minutes"]
        ae_curve = _curve(ae_source, "autoencoder_loss.png")
        ae_commands, ae_prior_steps = shipped["commands"], 0
        # the autoencoder of a model folder exported again (--ae shapes-64): its training.json keeps how its last
        # run trained (written by export; folders from before that have no note)
        ae_note, ae_folded = shipped["autoencoder_note"], shipped["autoencoder_folded"]
    if unet_state is None:
        unet_source = training_source("--unet", args.unet)
        shipped = model_history(unet_source)
        prior, unet_commands = {}, shipped["commands"]
        unet_steps, unet_minutes, unet_data = shipped["unet_steps"], shipped["unet_minutes"], shipped["unet_data"]
        unet_curve = _curve(unet_source, "unet_loss.png")
        note = (f"\n  The U-Net of {unet_source.name}, exported unchanged (`--unet {args.unet}`); its training is "
                "counted above.")
    else:
        prior = unet_state.get("prior") or {}
        unet_commands = (Path(args.unet) / "commands.txt").read_text()
        unet_steps = prior.get("unet_steps", 0) + unet_state["step"]
        unet_minutes = prior.get("unet_minutes", 0) + unet_state["elapsed"] / 60
        text_cache = load_training_state(Path(args.unet) / "text.pt")
        unet_data = [len(text_cache["caption_ids"]), len(text_cache["embeddings"]) - 1]
        unet_curve = None
        note = ""
        if prior:
            note = (f"\n  Started from the U-Net of {Path(prior['source']).name} ({prior['unet_steps']} steps, "
                    f"{prior['unet_minutes']:.0f} min), then {unet_state['step']} steps, "
                    f"{unet_state['elapsed'] / 60:.0f} min in this run; the totals above count both.")
    if ae_folded:  # a U-Net trained on the KL latents: the folded VQ encoder gives exactly those
        note += (" It was trained on the KL autoencoder's latents, which are this VQ autoencoder's pre-quantization "
                 "latents: its encoder is the KL encoder, folded and frozen.")
    # one line per invocation, in order; a model folder that both parts started from lists its commands once
    lines = [line.strip() for part in (prior.get("commands", ""), ae_commands, unet_commands)
             for line in part.splitlines() if line.strip()]
    commands = "\n".join(dict.fromkeys(lines))
    return {"ae_steps": ae_steps, "ae_minutes": ae_minutes, "autoencoder_curve": ae_curve, "commands": commands,
            "prior_ae_steps": ae_prior_steps, "ae_note": ae_note, "ae_folded": ae_folded, "unet_steps": unet_steps,
            "unet_minutes": unet_minutes, "unet_curve": unet_curve, "unet_data": unet_data,
            "prior_unet_steps": prior.get("unet_steps", 0), "unet_note": note, "unet_unchanged": unet_state is None}


def _seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def write_model_card(args: argparse.Namespace, history: dict) -> None:
    """Measure the exported model (autoencoder PSNR on unseen scenes, the shapes benchmark, sampling speed) and
    write TRAINING_FILE and, rendered from it, MODEL_CARD.md next to the weights."""
    from pipelines import TextToImagePipeline

    from ..eval.shapes_bench import autoencoder_ceiling, run_shapes_benchmark

    out = Path(args.out)
    pipe = TextToImagePipeline.from_pretrained(out)
    pipe.progress = False
    test_images, _ = make_batch(512, seed=3 * 10**6, size=64)
    x = to_model_range(test_images)
    with torch.no_grad():
        rec = torch.cat([pipe.vae.decode(pipe.vae.encode(x[i:i + 128], sample=False)) for i in range(0, 512, 128)])
    ae_psnr = psnr(rec, x)
    ceiling = {split: round(s["mean"], 3) for split, s in autoencoder_ceiling(pipe.vae, per_task=args.per_task).items()}
    bench = run_shapes_benchmark(pipe, num_inference_steps=20, guidance_scale=3.0, per_task=args.per_task)
    one = _seconds_per_call(lambda: pipe("a red circle above a blue square", num_inference_steps=20,
                                         guidance_scale=3.0, seed=0, output_type="np"), 5)
    prompts = [p.text for p in bench_prompts_sample()]
    many = _seconds_per_call(lambda: pipe(prompts, num_inference_steps=20, guidance_scale=3.0, seed=0,
                                          output_type="np"), 3)
    kind = pipe.vae.config.kind
    record = {"autoencoder_psnr_db": round(ae_psnr, 2), "autoencoder_ceiling": ceiling, "sampler": bench["sampler"],
              "scores": bench["scores"], "per_task": args.per_task,
              "seconds_per_image_benchmark": round(bench["seconds_per_image"], 4),
              "seconds_batch_1": round(one, 4), "images_per_second_batch_32": round(32 / many, 1),
              "autoencoder_steps": history["ae_steps"], "autoencoder_minutes": round(history["ae_minutes"], 1),
              "unet_steps": history["unet_steps"], "unet_minutes": round(history["unet_minutes"], 1),
              "unet_scenes": history["unet_data"][0], "unet_captions": history["unet_data"][1],
              "autoencoder_note": history["ae_note"], "autoencoder_folded": history["ae_folded"],
              "unet_note": history["unet_note"] if history["unet_unchanged"] or history["ae_folded"] else
              AE_CARD[kind]["unet_note"] + history["unet_note"],
              "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
              "autoencoder_parameters": sum(p.numel() for p in pipe.vae.parameters()),
              "commands": history["commands"].splitlines(),
              "export": f"python -m ldm.train.shapes export --ae {args.ae} --unet {args.unet} --out {args.out}",
              "hardware": hardware()}
    write_json(record, out / TRAINING_FILE)
    card = render_model_card(out)
    (out / "MODEL_CARD.md").write_text(card)
    print(card)


def bench_prompts_sample() -> list:
    from ..eval.shapes_eval import benchmark_prompts

    return benchmark_prompts("seen", per_task=6)[:32]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.train.shapes")
    sub = parser.add_subparsers(dest="command", required=True)
    ae = sub.add_parser("autoencoder")
    ae.add_argument("--run", required=True)
    ae.add_argument("--kind", default="kl", choices=list(AE_CONFIGS))
    ae.add_argument("--minutes", type=float, default=20)
    ae.add_argument("--batch", type=int, default=32)
    ae.add_argument("--lr", type=float, default=4e-4)
    ae.add_argument("--total-steps", type=int_at_least(1), default=20000, help="decay the learning rate (cosine, to 0) "
                    "over this many steps of the run, and stop there (or at --minutes, whichever comes first)")
    ae.add_argument("--reg-weight", type=float, default=None, help="weight of the KL term (default 1e-6) or of the "
                    "VQ codebook + commitment loss (default 1)")
    ae.add_argument("--fg-weight", type=float, default=5.0, help="loss weight of object pixels (background: 1)")
    ae.add_argument("--seed", type=int, default=0)
    ae.add_argument("--init-from", metavar="RUN", help="start a new run from the autoencoder of another run or of a "
                    "model folder (shapes-64) of the same --kind: its weights, a fresh optimizer and schedule")
    ae.add_argument("--init-from-kl", metavar="RUN", help="start a --kind vq run from a trained KL run (folded "
                    "encoder, k-means codebook)")
    ae.add_argument("--decoder-only", action="store_true", help="with --init-from: train only the decoder (and "
                    "post_quant_conv), so the latents, and a U-Net trained on them, stay valid")
    ae.set_defaults(func=train_autoencoder)
    un = sub.add_parser("unet")
    un.add_argument("--run", required=True)
    un.add_argument("--ae", required=True)
    un.add_argument("--minutes", type=float, default=60)
    un.add_argument("--batch", type=int, default=64)
    un.add_argument("--lr", type=float, default=5e-4)
    un.add_argument("--ema", type=float, default=0.998)
    un.add_argument("--total-steps", type=int_at_least(1), default=None,
                    help="decay the learning rate (cosine, to 0.1x) over "
                    "this many steps; default: constant")
    un.add_argument("--cfg-dropout", type=float, default=0.1)
    un.add_argument("--num-images", type=int, default=30_000)
    un.add_argument("--and-share", type=float, default=0.0, help="draw this fraction of each batch from the "
                    "two-object scenes captioned 'X and Y' (distinct colors and shapes; ~7%% of the stream)")
    un.add_argument("--seed", type=int, default=0)
    un.add_argument("--transformer-depth", metavar="D", help="transformer blocks per attention layer: one number or "
                    "one per level (\"1,2\"); with --init-from a shallower U-Net, the new blocks start as the "
                    "identity (load_shallower)")
    un.add_argument("--init-from", metavar="RUN", help="start a new run from the EMA weights of another U-Net run, "
                    "or from the U-Net of a model folder (e.g. shapes-64)")
    un.add_argument("--reencode", action="store_true", help="encode the run's scenes again with --ae (after the "
                    "autoencoder has trained further)")
    un.set_defaults(func=train_unet)
    tx = sub.add_parser("prepare-text", help="build the U-Net run's caption cache ahead of time")
    tx.add_argument("--run", required=True)
    tx.add_argument("--num-images", type=int, default=30_000)
    tx.add_argument("--seed", type=int, default=0)
    tx.set_defaults(func=lambda a: prepare_text(a, Path(a.run), HFTextEncoder.minilm(max_length=TEXT_MAX_LENGTH)))
    lt = sub.add_parser("prepare-latents", help="encode the U-Net run's scenes ahead of time")
    lt.add_argument("--run", required=True)
    lt.add_argument("--ae", required=True)
    lt.add_argument("--num-images", type=int, default=30_000)
    lt.add_argument("--seed", type=int, default=0)
    lt.set_defaults(func=lambda a: prepare_latents(a, Path(a.run), load_autoencoder(a.ae)))
    ex = sub.add_parser("export")
    ex.add_argument("--ae", required=True)
    ex.add_argument("--unet", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--no-card", action="store_true", help="skip the benchmark and the model card")
    ex.add_argument("--per-task", type=int, default=36, help="benchmark prompts per task and split")
    card = sub.add_parser("card", help="render a model folder's MODEL_CARD.md again from its training.json")
    card.add_argument("--model", required=True, help="a model folder written by export, or a shipped model's name")
    card.set_defaults(func=rewrite_card)
    ex.set_defaults(func=export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
