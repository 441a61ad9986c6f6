"""The shapes cascade measured: its super-resolution stage against Lanczos upsampling, fed ground truth and fed the
base model's own samples; noise-conditioning augmentation levels; thresholding in the pixel stage; seconds per
stage. Prints markdown tables.

    python benchmarks/shapes_cascade.py --model weights/shapes-cascade [--per-task 36] [--levels 0 50 100 200]

- Fed ground truth: each benchmark prompt's scene rendered at 64 px, upsampled to 128 by the stage (at its default
  level) or by Lanczos, against the same scene rendered at 128: PSNR, edge sharpness (mean gradient magnitude as a
  fraction of the ground truth's) and benchmark accuracy read at 128 (the evaluator on the 128-px ground truth is
  the ceiling).
- Fed the base: the published prompt set drawn by the base at its defaults, once; then upsampled by Lanczos and by
  the stage at each --levels (non-truncated augmentation), scored at 128 px, paired against Lanczos.
- Thresholding: the stage at guidance 5, 10, 20 with none / static / dynamic thresholding of x0: accuracy and
  saturation (share of channel values at 0 or 255; the ground truth's own share, from black and white grounds and
  pure colors, is the reference).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from PIL import Image

from ldm.checkpoints import write_json
from ldm.data.images import to_model_range
from ldm.eval.shapes_eval import SPLITS, benchmark_prompts, evaluate, ground_truth
from ldm.train.shapes_common import hardware

from pipelines import CascadePipeline


def lanczos(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")


def sharpness(images: np.ndarray) -> float:
    """Mean gradient magnitude of the gray images (finite differences)."""
    gray = images.astype(np.float64).mean(-1)
    return float(np.mean(np.abs(np.diff(gray, axis=1))) + np.mean(np.abs(np.diff(gray, axis=2))))


def to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def upscale(pipe: CascadePipeline, prompts, low: torch.Tensor, level: int, guidance=None,
            thresholding=None, batch: int = 16) -> tuple[np.ndarray, float]:
    """The stage's 128-px images of `low` ([-1, 1], 64 px) under the prompts, non-truncated at `level`."""
    sr = pipe.stages[0]
    out, seconds = [], 0.0
    for i in range(0, len(prompts), batch):
        texts = [p.text for p in prompts[i:i + batch]]
        run = sr.check_common(texts, None, None, guidance, None, 0.0, None, 1, "np")
        generators, _ = sr.generators(len(texts), [p.seed for p in prompts[i:i + batch]], None)
        start = time.perf_counter()
        x = sr.upscale(texts, run, 1, low[i:i + batch], level, False, thresholding, generators, None)
        seconds += time.perf_counter() - start
        out.append(to_uint8(sr.decode(x, "np")))
    return np.concatenate(out), seconds / len(prompts)


def accuracy(images: np.ndarray, prompts) -> float:
    return float(np.mean([evaluate(im, p.expectation) for im, p in zip(images, prompts)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-cascade")
    parser.add_argument("--per-task", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 50, 100, 200, 350])
    parser.add_argument("--guidance", type=float, nargs="*", default=[5.0, 10.0, 20.0])
    parser.add_argument("--json", default=None, help="write the figures here (for the model card)")
    args = parser.parse_args()
    results = {"prompts": None, "prompt_set": args.seed, "per_task": args.per_task, "hardware": hardware()}
    pipe = CascadePipeline.from_pretrained(args.model)
    pipe.progress = False
    prompts = [p for split in SPLITS for p in benchmark_prompts(split, per_task=args.per_task, seed=args.seed)]
    results["prompts"] = len(prompts)
    sr = pipe.stages[0].low_res
    print(f"{len(prompts)} prompts (set {args.seed}, {args.per_task} per task and split); stage default level "
          f"{sr.noise_level}\n")

    # fed ground truth
    gt64 = np.stack([ground_truth(p, 64) for p in prompts])
    gt128 = np.stack([ground_truth(p, 128) for p in prompts])
    ours, _ = upscale(pipe, prompts, to_model_range(gt64), sr.noise_level)
    lz = lanczos(gt64, 128)
    print("Fed the 64-px ground truth, against the 128-px render:\n")
    print("| upsampler | PSNR dB | edge sharpness | accuracy at 128 px |\n|---|---|---|---|")
    ref = sharpness(gt128)
    results["ground_truth_fed"] = []
    for name, images in (("super-resolution stage", ours), ("Lanczos", lz), ("128-px ground truth", gt128)):
        row = {"upsampler": name, "psnr": None if images is gt128 else round(psnr(images, gt128), 2),
               "sharpness": round(sharpness(images) / ref, 3), "accuracy": round(accuracy(images, prompts), 3)}
        results["ground_truth_fed"].append(row)
        print(f"| {name} | {row['psnr'] if row['psnr'] is not None else '—'} | {row['sharpness']:.3f} | "
              f"{row['accuracy']:.3f} |")

    # fed the base model's own samples
    start = time.perf_counter()
    base_x = []
    for i in range(0, len(prompts), 32):
        chunk = prompts[i:i + 32]
        texts = [p.text for p in chunk]
        run = pipe.base.check_common(texts, None, None, None, None, 0.0, None, 1, "np")
        generators, _ = pipe.base.generators(len(chunk), [p.seed for p in chunk], None)
        x = pipe.base.generate(texts, run, 1, 64, 64, None, generators, None)
        base_x.append(pipe.base.stage.decode(x))
    base_seconds = (time.perf_counter() - start) / len(prompts)
    low = torch.cat(base_x)
    base64 = to_uint8((low.permute(0, 2, 3, 1).numpy() + 1) / 2)
    lz = lanczos(base64, 128)
    lz_ok = [evaluate(im, p.expectation) for im, p in zip(lz, prompts)]
    print(f"\nFed the base model's samples (base at 64 px: accuracy {accuracy(base64, prompts):.3f}, "
          f"{base_seconds:.3f} s / image):\n")
    print("| upsampler | level | accuracy at 128 px | right only here / only with Lanczos | s / image (stage) |")
    print("|---|---|---|---|---|")
    print(f"| Lanczos | — | {np.mean(lz_ok):.3f} | — | — |")
    results["base"] = {"accuracy_64": round(accuracy(base64, prompts), 3), "seconds_per_image": round(base_seconds, 4),
                       "lanczos_accuracy_128": round(float(np.mean(lz_ok)), 3)}
    results["levels"] = []
    for level in args.levels:
        images, seconds = upscale(pipe, prompts, low, level)
        ok = [evaluate(im, p.expectation) for im, p in zip(images, prompts)]
        here = sum(a and not b for a, b in zip(ok, lz_ok))
        there = sum(b and not a for a, b in zip(ok, lz_ok))
        print(f"| super-resolution stage | {level} | {np.mean(ok):.3f} | {here} / {there} | {seconds:.3f} |")
        results["levels"].append({"level": level, "accuracy": round(float(np.mean(ok)), 3), "only_here": here,
                                  "only_lanczos": there, "seconds_per_image": round(seconds, 4)})

    results["thresholding"] = []
    print("\nThresholding in the pixel stage (fed the base's samples, default level):\n")
    print("| guidance | thresholding | accuracy at 128 px | saturated values |\n|---|---|---|---|")
    gt_saturated = np.mean((gt128 == 0) | (gt128 == 255))
    print(f"| — | 128-px ground truth | {accuracy(gt128, prompts):.3f} | {gt_saturated:.3f} |")
    for guidance in args.guidance:
        for kind in (None, "static", "dynamic"):
            images, _ = upscale(pipe, prompts, low, sr.noise_level, guidance=guidance, thresholding=kind)
            saturated = float(np.mean((images == 0) | (images == 255)))
            acc = accuracy(images, prompts)
            print(f"| {guidance:g} | {kind or 'none'} | {acc:.3f} | {saturated:.3f} |")
            results["thresholding"].append({"guidance": guidance, "thresholding": kind, "accuracy": round(acc, 3),
                                            "saturated": round(saturated, 3)})
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
