"""Teach the shipped shapes model a concept it has never seen: the fruit, vegetable and nut emoji of Noto Color
Emoji, captioned with their Unicode names ("red apple", "aubergine"). A rank-8 LoRA is trained on the CPU in a few
minutes with the library's Trainer, then the base model and the LoRA draw every caption with the same seeds.

    python examples/finetune_emoji.py                      # weights/shapes-64, work folder runs/emoji
    python examples/finetune_emoji.py --base my-pipeline --work /tmp/emoji --steps 800

Writes into --work: data/ (metadata.jsonl + PNGs), run/ (the training run; run/final/lora.safetensors),
before_after.png (rows: target render, base model, with the LoRA) and results.json, and prints a markdown table:
PSNR and a color-histogram distance of the generated images to (a) the training renders and (b) held-out renders
of the same emoji at other sizes (40 and 56 px instead of 48; never trained on), before vs after; the shapes
benchmark (seen split) of the base model, with the LoRA, and after unload_lora (which must equal the base); and the
training time. The font comes from --font, the system's fonts-noto-color-emoji, or `apt-get download` of that
Debian package into --cache (extracted with dpkg-deb).
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.checkpoints import WEIGHTS_DIR
from ldm.eval.shapes_bench import run_shapes_benchmark
from ldm.train.config import TrainConfig
from ldm.train.trainer import Trainer
from pipelines import TextToImagePipeline

# Unicode 14 fruit, vegetables and nuts (Python's unicodedata names them all; the Unicode 15 ones would not be)
EMOJI = ("🍎🍌🍇🍓🍉🍊🍋🍍🥭🍏🍐🍑🍒🫐🥝🍈🍅🫒"
         "🥥🥑🍆🥔🥕🌽🌶🫑🥒🥬🥦🧄🧅🍄🥜🫘🌰🍠")
SYSTEM_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_IN_DEB = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
BITMAP_SIZE = 109  # the one size of NotoColorEmoji's CBDT bitmaps
TRAIN_PX, HELDOUT_PX = 48, (40, 56)  # emoji size on a 64 px canvas (scaled with --resolution)
STEPS, GUIDANCE = 20, 3.0  # DDIM steps and classifier-free guidance of every image drawn here


def find_font(font: str | None, cache: Path) -> Path:
    """--font, else the installed Debian font, else the .deb fetched with apt-get download and unpacked in cache."""
    if font:
        if not Path(font).is_file():
            sys.exit(f"error: --font {font}: no such file")
        return Path(font)
    if SYSTEM_FONT.is_file():
        return SYSTEM_FONT
    extracted = cache / "deb" / FONT_IN_DEB
    if not extracted.is_file():
        print(f"{SYSTEM_FONT} not found: fetching fonts-noto-color-emoji with apt-get download into {cache}")
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", "fonts-noto-color-emoji"], cwd=cache, check=True,
                           capture_output=True, text=True)
            deb = max(cache.glob("fonts-noto-color-emoji_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "deb")], check=True, capture_output=True,
                           text=True)
        except (OSError, ValueError, subprocess.CalledProcessError) as err:
            detail = (getattr(err, "stderr", None) or str(err) or "no .deb was downloaded").strip()
            sys.exit(f"error: no emoji font: {SYSTEM_FONT} is missing and fetching the Debian package failed "
                     f"({detail}). Install fonts-noto-color-emoji or pass --font PATH to NotoColorEmoji.ttf.")
        if not extracted.is_file():
            sys.exit(f"error: the fonts-noto-color-emoji package in {cache} holds no {FONT_IN_DEB}; pass --font PATH")
    return extracted


def render(font: ImageFont.FreeTypeFont, ch: str, size: int, resolution: int) -> Image.Image | None:
    """The emoji scaled (LANCZOS) to `size` px on its longer side, centered on a white square; None if no glyph."""
    left, top, right, bottom = font.getbbox(ch)
    glyph = Image.new("RGBA", (right + 8, bottom + 8), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), ch, font=font, embedded_color=True)
    box = glyph.getbbox()
    if box is None:
        return None
    glyph = glyph.crop(box)
    scale = size / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGBA", (resolution, resolution), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, ((resolution - glyph.width) // 2, (resolution - glyph.height) // 2))
    return canvas.convert("RGB")


def build_dataset(font_path: Path, folder: Path, resolution: int, limit: int | None):
    """Writes folder/metadata.jsonl + PNGs; returns captions, training renders [N,H,W,3] and held-out [N,2,H,W,3]."""
    font = ImageFont.truetype(str(font_path), BITMAP_SIZE)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    captions, train, heldout, skipped = [], [], [], []
    for ch in EMOJI[:limit]:
        caption = unicodedata.name(ch).lower()
        images = [render(font, ch, round(px * resolution / 64), resolution) for px in (TRAIN_PX,) + HELDOUT_PX]
        if any(im is None for im in images):
            skipped.append(caption)
            continue
        name = caption.replace(" ", "_") + ".png"
        images[0].save(folder / name)
        captions.append(caption)
        train.append(np.asarray(images[0]))
        heldout.append(np.stack([np.asarray(im) for im in images[1:]]))
    if skipped:
        print(f"warning: {font_path} has no glyph for {', '.join(skipped)}: left out")
    with open(folder / "metadata.jsonl", "w") as f:
        for caption in captions:
            f.write(json.dumps({"file_name": caption.replace(" ", "_") + ".png", "text": caption}) + "\n")
    return captions, np.stack(train), np.stack(heldout)


def generate(pipe, captions: list[str], resolution: int, per_caption: int, seed: int, chunk: int = 16) -> np.ndarray:
    """uint8 [N, per_caption, H, W, 3]; image j of caption i always has seed seed + i * per_caption + j."""
    out = []
    for i in range(0, len(captions), chunk):
        images = pipe(captions[i:i + chunk], sampler="ddim", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      num_images_per_prompt=per_caption, seed=seed + i * per_caption, height=resolution,
                      width=resolution, output_type="np").images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out).reshape(len(captions), per_caption, resolution, resolution, 3)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1 / max(mse, 1e-10)))


def color_histogram(img: np.ndarray, bins: int = 8) -> np.ndarray | None:
    """Normalized RGB histogram of the non-white pixels (the emoji, not the white canvas); None if all white."""
    px = img.reshape(-1, 3)
    px = px[px.min(axis=1) < 240].astype(np.int64) * bins // 256
    if not len(px):
        return None
    return np.bincount((px[:, 0] * bins + px[:, 1]) * bins + px[:, 2], minlength=bins ** 3) / len(px)


def hist_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total variation between the color histograms: 0 same colors, 1 disjoint (or one image blank)."""
    ha, hb = color_histogram(a), color_histogram(b)
    return 1.0 if ha is None or hb is None else float(0.5 * np.abs(ha - hb).sum())


def scores(generated: np.ndarray, train: np.ndarray, heldout: np.ndarray) -> dict:
    """Mean PSNR / histogram distance of every generated image [N,K,...] to its caption's training and held-out
    renders."""
    pairs = {"train": [(g, train[i]) for i in range(len(train)) for g in generated[i]],
             "heldout": [(g, h) for i in range(len(train)) for g in generated[i] for h in heldout[i]]}
    return {f"{metric}_{split}": float(np.mean([fn(a, b) for a, b in pairs[split]]))
            for split in pairs for metric, fn in (("psnr", psnr), ("hist", hist_distance))}


def shapes_mean(pipe, per_task: int) -> float | None:
    if not per_task:
        return None
    return run_shapes_benchmark(pipe, sampler="ddim", per_task=per_task, splits=("seen",))["scores"]["seen"]["mean"]


def save_grid(rows: list[np.ndarray], path: Path, zoom: int = 2) -> None:
    """rows of [K,H,W,3] images, one row each, 2 px gray gaps, zoomed with nearest neighbour."""
    k, h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + 2), k * (w + 2), 3), 128, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="pipeline folder (default: the shipped weights/shapes-64)")
    parser.add_argument("--work", default="runs/emoji", help="where data/, run/, the grid and results.json go")
    parser.add_argument("--font", help="NotoColorEmoji.ttf (default: the system's, else fetched into --cache)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "ldm" / "emoji"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2, help="images drawn per caption, before and after")
    parser.add_argument("--bench-per-task", type=int, default=12, help="shapes benchmark prompts per task; 0: skip")
    parser.add_argument("--limit", type=int, help="use only the first N emoji (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = Path(args.base) if args.base else WEIGHTS_DIR / "shapes-64"
    if not base.exists():
        sys.exit(f"error: no base model at {base}. " + ("The shipped shapes model has not been trained and exported "
                 "yet (see the README: python -m ldm.train.shapes ... export --out weights/shapes-64); pass --base "
                 "PATH to use another pipeline folder." if args.base is None else "Pass a pipeline folder."))
    work = Path(args.work)
    font = find_font(args.font, Path(args.cache))
    captions, train, heldout = build_dataset(font, work / "data", args.resolution, args.limit)
    batch = min(args.batch_size, len(captions))
    print(f"{len(captions)} emoji from {font} at {args.resolution} px in {work / 'data'}; base model {base}")

    pipe = TextToImagePipeline.from_pretrained(base)
    pipe.progress = False
    before = generate(pipe, captions, args.resolution, args.samples, args.seed)
    bench = {"base": shapes_mean(pipe, args.bench_per_task)}
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    config = TrainConfig(data_dir=str(work / "data"), output_dir=str(work / "run"), base_model=str(base),
                         resolution=args.resolution, cache_latents=True, mode="lora", lora_rank=args.rank,
                         learning_rate=args.lr, max_steps=args.steps, batch_size=batch, checkpoint_every=args.steps,
                         checkpoints_total_limit=1, seed=args.seed)
    shutil.rmtree(config.output_dir, ignore_errors=True)  # the Trainer refuses a folder with old checkpoints
    start = time.perf_counter()
    final = Trainer(config).train()
    train_seconds = time.perf_counter() - start
    log = list(csv.DictReader((work / "run" / "log.csv").read_text().splitlines()))
    tenth = max(1, len(log) // 10)  # one step's loss is one batch's: average a tenth of the run at each end
    loss_first, loss_last = (float(np.mean([float(r["loss"]) for r in rows])) for rows in (log[:tenth], log[-tenth:]))

    pipe.load_lora(final / "lora.safetensors")
    after = generate(pipe, captions, args.resolution, args.samples, args.seed)
    bench["lora"] = shapes_mean(pipe, args.bench_per_task)
    pipe.unload_lora()
    unload_exact = all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())
    bench["unloaded"] = shapes_mean(pipe, args.bench_per_task)

    shown = np.linspace(0, len(captions) - 1, min(10, len(captions))).round().astype(int)
    save_grid([train[shown], before[shown, 0], after[shown, 0]], work / "before_after.png")
    metrics = {"before": scores(before, train, heldout), "after": scores(after, train, heldout),
               # a model that drew exactly the training render: the ceiling for (b)
               "training_render": scores(train[:, None], train, heldout)}
    results = {"base": str(base), "font": str(font), "captions": captions, "train_config": config.to_dict(),
               "train_seconds": train_seconds, "train_loop_seconds": float(log[-1]["seconds"]),
               "loss_first_tenth": loss_first, "loss_last_tenth": loss_last, "metrics": metrics,
               "shapes_seen_mean": bench, "unload_exact": unload_exact, "lora": str(final / "lora.safetensors"),
               "sampling": {"sampler": "ddim", "steps": STEPS, "guidance": GUIDANCE, "per_caption": args.samples,
                            "seed": args.seed}}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    m = metrics
    print(f"\n{len(captions)} emoji x {args.samples} images, DDIM {STEPS} steps, guidance {GUIDANCE}; "
          f"LoRA rank {args.rank}, {args.steps} steps x batch {batch}, lr {args.lr:g}\n")
    print("| measure | base model | with LoRA | training render itself |\n|---|---|---|---|")
    for key, label in (("psnr_train", "PSNR to training renders (dB, higher is closer)"),
                       ("psnr_heldout", "PSNR to held-out renders (dB)"),
                       ("hist_train", "color-histogram distance to training renders (0-1, lower is closer)"),
                       ("hist_heldout", "color-histogram distance to held-out renders")):
        reference = "-" if key.endswith("train") else f"{m['training_render'][key]:.3f}"
        print(f"| {label} | {m['before'][key]:.3f} | {m['after'][key]:.3f} | {reference} |")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\n| shapes benchmark, seen split, {args.bench_per_task}/task | base | with LoRA | after unload_lora |\n"
          f"|---|---|---|---|\n| mean accuracy | {fmt(bench['base'])} | {fmt(bench['lora'])} | "
          f"{fmt(bench['unloaded'])} |")
    print(f"\nunload_lora restores the base U-Net exactly: {unload_exact}")
    print(f"training: {train_seconds:.1f} s wall ({results['train_loop_seconds']:.1f} s in the loop), "
          f"mean loss of the first / last tenth of the steps {loss_first:.4f} -> {loss_last:.4f}")
    print(f"wrote {work / 'before_after.png'} (rows: target, base, LoRA) and {work / 'results.json'}")
    if not unload_exact or bench["unloaded"] != bench["base"]:
        sys.exit("error: unload_lora did not restore the base model exactly")


if __name__ == "__main__":
    main()
