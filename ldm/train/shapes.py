"""The recipe that trains the shipped shapes-64 model on the CPU: a KL (or VQ) autoencoder on rendered shapes
scenes, then a cross-attention U-Net on its latents conditioned on frozen MiniLM token embeddings, with
classifier-free caption dropout and EMA. Runs against a time budget, checkpoints atomically every few
minutes and resumes from the last checkpoint, so it can be spread over several sessions.

    python -m ldm.train.shapes autoencoder --run runs/ae --minutes 20
    python -m ldm.train.shapes unet --run runs/unet --ae runs/ae --minutes 60
    python -m ldm.train.shapes export --ae runs/ae --unet runs/unet --out weights/shapes-64

The autoencoder run is in shapes_autoencoder.py, the U-Net run in shapes_unet.py, what they share (configs, run
folders, the learning-rate decay) in shapes_common.py and the model card in shapes_card.py; this file holds the
export (measure, record, card) and the command line.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import load_component, read_json, resolve, save_pipeline, write_json
from ..stage import PipelineParts
from ..cli import int_at_least
from ..eval.metrics import psnr
from ..files import write_text
from ..nn.autoencoder import Autoencoder
from ..nn.unet import UNetModel
from ..text import HFTextEncoder
from .ema import EMA
from .shapes_autoencoder import autoencoder_history, load_autoencoder, rescaled, train_autoencoder
from .shapes_card import AE_CARD, HISTORY_FILE, TRAINING_FILE, model_history, render_model_card, rewrite_card
from .shapes_common import AE_CONFIGS, DIFFUSION, TEXT_MAX_LENGTH, hardware, plot_curve, scenes, training_source
from .shapes_unet import prepare_latents, prepare_text, train_unet, unet_config_of
from .state import load_training_state


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
    save_pipeline(PipelineParts.single(model.eval(), ae, text, DIFFUSION), args.out)
    out = Path(args.out)
    if narrative:
        write_text(out / HISTORY_FILE, narrative)
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
    record = training_record(args, history, model, ae)  # written with or without the measurements
    if not args.no_card:
        record.update(measure(args, out))
    write_json(record, out / TRAINING_FILE)
    if not args.no_card:
        card = render_model_card(out)
        write_text(out / "MODEL_CARD.md", card)
        print(card)


def with_latents_of(ae: Autoencoder, reference: Autoencoder, flag: str, folder: Path) -> Autoencoder:
    """ae with the latent scale of reference, the autoencoder of a model folder whose U-Net is exported unchanged;
    refused unless the two encode alike, since that U-Net needs its latents: the same unscaled latents (posterior
    means; for VQ the pre-quantization latents) of a fixed batch of scenes, to 1e-4. A decoder-only fine-tune of
    reference gives them exactly, a VQ autoencoder folded from it and trained decoder-only (--init-from-kl
    --decoder-only) to float rounding (~1e-5)."""
    x = scenes(4 * 10**6, 16)
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


def training_record(args: argparse.Namespace, history: dict, unet: UNetModel, ae: Autoencoder) -> dict:
    """The exported folder's TRAINING_FILE without the measurements: steps, minutes, data, notes, commands."""
    return {"autoencoder_steps": history["ae_steps"], "autoencoder_minutes": round(history["ae_minutes"], 1),
            "unet_steps": history["unet_steps"], "unet_minutes": round(history["unet_minutes"], 1),
            "unet_scenes": history["unet_data"][0], "unet_captions": history["unet_data"][1],
            "autoencoder_note": history["ae_note"], "autoencoder_folded": history["ae_folded"],
            "unet_note": history["unet_note"] if history["unet_unchanged"] or history["ae_folded"] else
            AE_CARD[ae.config.kind]["unet_note"] + history["unet_note"],
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "autoencoder_parameters": sum(p.numel() for p in ae.parameters()),
            "commands": history["commands"].splitlines(),
            "export": f"python -m ldm.train.shapes export --ae {args.ae} --unet {args.unet} --out {args.out}"}


def measure(args: argparse.Namespace, out: Path) -> dict:
    """The exported model's figures for its card: autoencoder PSNR on unseen scenes, the ground-truth ceiling, the
    shapes benchmark and sampling speed, all at the folder's own sampling defaults."""
    from pipelines import TextToImagePipeline

    from ..eval.shapes_bench import autoencoder_ceiling, run_shapes_benchmark

    pipe = TextToImagePipeline.from_pretrained(out)
    pipe.progress = False
    x = scenes(3 * 10**6, 512)
    with torch.no_grad():
        rec = torch.cat([pipe.vae.decode(pipe.vae.encode(x[i:i + 128], sample=False)) for i in range(0, 512, 128)])
    ceiling = {split: round(s["mean"], 3) for split, s in autoencoder_ceiling(pipe.vae, per_task=args.per_task).items()}
    steps, guidance = pipe.diffusion.default_steps, pipe.diffusion.guidance_scale
    bench = run_shapes_benchmark(pipe, num_inference_steps=steps, guidance_scale=guidance, per_task=args.per_task)
    one = _seconds_per_call(lambda: pipe("a red circle above a blue square", num_inference_steps=steps,
                                         guidance_scale=guidance, seed=0, output_type="np"), 5)
    prompts = [p.text for p in bench_prompts_sample()]
    many = _seconds_per_call(lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, seed=0,
                                          output_type="np"), 3)
    return {"autoencoder_psnr_db": round(psnr(rec, x), 2), "autoencoder_ceiling": ceiling,
            "sampler": bench["sampler"], "spacing": pipe.diffusion.spacing,
            "sigma_schedule": pipe.diffusion.sigma_schedule, "scores": bench["scores"], "per_task": args.per_task,
            "seconds_per_image_benchmark": round(bench["seconds_per_image"], 4),
            "seconds_batch_1": round(one, 4), "images_per_second_batch_32": round(32 / many, 1),
            "hardware": hardware()}


def remeasure(args: argparse.Namespace) -> None:
    """Measure a model folder again at its stored defaults (after its sampler or grid changed, or on another
    machine): its training.json's figures are replaced, its training record kept, and its card re-rendered."""
    folder = resolve(args.model)
    if not (folder / TRAINING_FILE).is_file():
        raise SystemExit(f"--model {args.model!r}: no {TRAINING_FILE} there (a folder written by export)")
    record = read_json(folder / TRAINING_FILE)
    figures = measure(args, folder)
    figures["measured_on"] = figures.pop("hardware")  # "hardware" stays the machine it was trained on
    record.update(figures)
    write_json(record, folder / TRAINING_FILE)
    card = render_model_card(folder)
    write_text(folder / "MODEL_CARD.md", card)
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
    ms = sub.add_parser("measure", help="measure a model folder again at its stored defaults and re-render its card")
    ms.add_argument("--model", required=True, help="a model folder written by export, or a shipped model's name")
    ms.add_argument("--per-task", type=int, default=36, help="benchmark prompts per task and split")
    ms.set_defaults(func=remeasure)
    ex.set_defaults(func=export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
