"""The shapes recipe's autoencoder run (KL or VQ; full, decoder-only, or a VQ decoder on a folded KL encoder) and
the helpers that read autoencoders back from runs and model folders."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from ..checkpoints import load_component
from ..eval.metrics import psnr
from ..nn.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderOutput
from ..nn.vq_init import fold_kl_encoder, kmeans
from .shapes_card import model_history
from .shapes_common import AE_CONFIGS, Run, scenes, training_source
from .state import load_training_state, rng_state, set_rng_state
from .trainer_utils import cosine_decay


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
    val = scenes(10**6, 256)
    start = time.time()
    # the learning rate is 0 from --total-steps on (cosine to 0), so the run ends there or at --minutes
    while not run.out_of_time() and step < args.total_steps:
        x = scenes(args.seed * 10**7 + step, args.batch)
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
    x = scenes(seed * 10**7 + 5 * 10**6, num_images)
    vq.load_state_dict({**state, "quantize.embedding.weight": vq.quantize.embedding.weight})
    with torch.no_grad():
        z = torch.cat([vq._moments(x[i:i + 512]) for i in range(0, num_images, 512)])
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
    with torch.no_grad():
        z = model.encode(scenes(2 * 10**6, 512), sample=False)
    return rescaled(model, scaling_factor=round(1 / z.std().item(), 5))


def rescaled(ae: Autoencoder, **latent_scale) -> Autoencoder:
    """A copy of ae (eval mode) with another scaling_factor / shift_factor: same weights, other latent units."""
    scaled = Autoencoder(AutoencoderConfig.from_dict({**ae.config.to_dict(), **latent_scale}))
    scaled.load_state_dict(ae.state_dict())
    return scaled.eval()
