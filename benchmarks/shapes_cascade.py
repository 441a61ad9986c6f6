"""The shapes cascade measured: its super-resolution stage against Lanczos upsampling, fed ground truth and fed the
base model's own samples; noise-conditioning augmentation levels; thresholding in the pixel stage; seconds per
stage. Prints markdown tables.

    python benchmarks/shapes_cascade.py --model weights/shapes-cascade --control runs/noaug-cascade --json r.json

- Fed ground truth: each benchmark prompt's scene rendered at 64 px, upsampled to 128 by the stage (at its default
  level) or by Lanczos, against the same scene rendered at 128: PSNR, edge sharpness (mean gradient magnitude as a
  fraction of the ground truth's) and benchmark accuracy read at 128 (the evaluator on the 128-px ground truth is
  the ceiling).
- Fed the base: the published prompt set drawn by the base at its defaults, once; then upsampled by Lanczos, by
  the stage at its default level and by the --control stage (the same recipe trained without augmentation) at its
  own, scored at 128 px, paired prompt by prompt.
- Levels: the stage at each --levels (non-truncated augmentation) on the first --sweep-per-task prompts of each
  task and split (an image depends only on its prompt's seed, so a subset's images are the full set's).
- Thresholding: the stage at guidance 5, 10, 20 with none / static / dynamic thresholding of x0, on the first
  --threshold-per-task prompts: accuracy and saturation (share of channel values at 0 or 255; the ground truth's
  own share, from black and white grounds and pure colors, is the reference).
"""
from __future__ import annotations

import argparse
import math
import sys
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


def right(images: np.ndarray, prompts) -> list[bool]:
    return [bool(evaluate(im, p.expectation)) for im, p in zip(images, prompts)]


def paired(a: list[bool], b: list[bool]) -> tuple[int, int]:
    """(right only in a, right only in b)."""
    return sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))


def first(prompts, per_task: int) -> list[int]:
    """Indices of the first per_task prompts of each task and split (the prompt set is a prefix-stable stream)."""
    return [i for i, p in enumerate(prompts) if p.seed % 1000 < per_task]


def base_samples(pipe: CascadePipeline, prompts) -> tuple[torch.Tensor, float]:
    """The base model's 64-px images ([-1, 1]) of the prompts at its defaults, and its seconds per image."""
    start, out = time.perf_counter(), []
    for i in range(0, len(prompts), 32):
        chunk = prompts[i:i + 32]
        texts = [p.text for p in chunk]
        run = pipe.base.check_common(texts, None, None, None, None, 0.0, None, 1, "np")
        generators, _ = pipe.base.generators(len(chunk), [p.seed for p in chunk], None)
        out.append(pipe.base.stage.decode(pipe.base.generate(texts, run, 1, 64, 64, None, generators, None)))
    return torch.cat(out), (time.perf_counter() - start) / len(prompts)


def load(folder: str) -> CascadePipeline:
    pipe = CascadePipeline.from_pretrained(folder)
    pipe.progress = False
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-cascade")
    parser.add_argument("--control", default=None, help="a cascade whose stage was trained without augmentation")
    parser.add_argument("--per-task", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="*", default=[0, 250], help="augmentation levels to sweep")
    parser.add_argument("--sweep-per-task", type=int, default=12)
    parser.add_argument("--guidance", type=float, nargs="*", default=[5.0, 10.0, 20.0],
                        help="guidance scales for the thresholding table (none: skip it)")
    parser.add_argument("--threshold-per-task", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the figures here (for the model card)")
    args = parser.parse_args()
    command = "python benchmarks/shapes_cascade.py " + " ".join(sys.argv[1:])
    pipe = load(args.model)
    stages = [("with augmentation", pipe)] + ([("without augmentation (control)", load(args.control))]
                                              if args.control else [])
    prompts = [p for split in SPLITS for p in benchmark_prompts(split, per_task=args.per_task, seed=args.seed)]
    level = pipe.stages[0].low_res.noise_level
    results = {"prompts": len(prompts), "prompt_set": args.seed, "per_task": args.per_task, "hardware": hardware(),
               "command": command}
    print(f"{len(prompts)} prompts (set {args.seed}, {args.per_task} per task and split); {hardware()}\n")

    # fed ground truth
    gt64 = np.stack([ground_truth(p, 64) for p in prompts])
    gt128 = np.stack([ground_truth(p, 128) for p in prompts])
    rows = [(f"super-resolution stage, {name}, level {c.stages[0].low_res.noise_level}",
             upscale(c, prompts, to_model_range(gt64), c.stages[0].low_res.noise_level)[0]) for name, c in stages]
    rows += [("Lanczos", lanczos(gt64, 128)), ("128-px ground truth", gt128)]
    print("Fed the 64-px ground truth, against the 128-px render:\n")
    print("| upsampler | PSNR dB | edge sharpness | accuracy at 128 px |\n|---|---|---|---|")
    ref = sharpness(gt128)
    results["ground_truth_fed"] = []
    for name, images in rows:
        row = {"upsampler": name, "psnr": None if images is gt128 else round(psnr(images, gt128), 2),
               "sharpness": round(sharpness(images) / ref, 3), "accuracy": round(accuracy(images, prompts), 3)}
        results["ground_truth_fed"].append(row)
        print(f"| {name} | {row['psnr'] if row['psnr'] is not None else '—'} | {row['sharpness']:.3f} | "
              f"{row['accuracy']:.3f} |")

    # fed the base model's own samples
    low, base_seconds = base_samples(pipe, prompts)
    base64 = to_uint8((low.permute(0, 2, 3, 1).numpy() + 1) / 2)
    lz_ok = right(lanczos(base64, 128), prompts)
    results["base"] = {"accuracy_64": round(accuracy(base64, prompts), 3), "seconds_per_image": round(base_seconds, 4),
                       "lanczos_accuracy_128": round(float(np.mean(lz_ok)), 3)}
    print(f"\nFed the base model's samples (base at 64 px: accuracy {results['base']['accuracy_64']:.3f}, "
          f"{base_seconds:.3f} s / image):\n")
    print("| upsampler | level | accuracy at 128 px | right only here / only with Lanczos | s / image (stage) |")
    print("|---|---|---|---|---|")
    print(f"| Lanczos | — | {np.mean(lz_ok):.3f} | — | — |")
    results["fed_base"] = []
    for name, c in stages:
        lv = c.stages[0].low_res.noise_level
        images, seconds = upscale(c, prompts, low, lv)
        ok = right(images, prompts)
        here, there = paired(ok, lz_ok)
        print(f"| super-resolution stage, {name} | {lv} | {np.mean(ok):.3f} | {here} / {there} | {seconds:.3f} |")
        results["fed_base"].append({"stage": name, "level": lv, "accuracy": round(float(np.mean(ok)), 3),
                                    "only_here": here, "only_lanczos": there, "seconds_per_image": round(seconds, 4),
                                    "right": "".join("1" if a else "0" for a in ok)})
    if args.control:
        a, b = (r["right"] for r in results["fed_base"])
        with_, without = paired([x == "1" for x in a], [x == "1" for x in b])
        results["augmentation_paired"] = {"only_with": with_, "only_without": without}
        print(f"\nwith vs without augmentation, prompt by prompt: right only with {with_}, only without {without}")

    # augmentation levels, on a subset
    keep = first(prompts, args.sweep_per_task)
    sub, sub_low = [prompts[i] for i in keep], low[keep]
    default_ok = [results["fed_base"][0]["right"][i] == "1" for i in keep]
    sub_lz = [lz_ok[i] for i in keep]
    results["levels"] = {"prompts": len(sub), "lanczos_accuracy": round(float(np.mean(sub_lz)), 3), "rows": []}
    if args.levels:
        print(f"\nAugmentation level at sampling (non-truncated; {len(sub)} prompts, Lanczos {np.mean(sub_lz):.3f}):\n")
        print("| level | accuracy at 128 px | right only here / only with Lanczos |\n|---|---|---|")
    for lv in sorted(set(args.levels) | {level}):
        ok = default_ok if lv == level else right(upscale(pipe, sub, sub_low, lv)[0], sub)
        here, there = paired(ok, sub_lz)
        results["levels"]["rows"].append({"level": lv, "accuracy": round(float(np.mean(ok)), 3), "only_here": here,
                                          "only_lanczos": there})
        if args.levels:
            print(f"| {lv} | {np.mean(ok):.3f} | {here} / {there} |")

    # thresholding, on a smaller subset
    keep = first(prompts, args.threshold_per_task)
    sub, sub_low, sub_gt = [prompts[i] for i in keep], low[keep], gt128[keep]
    results["thresholding"] = {"prompts": len(sub), "rows": [],
                               "ground_truth_saturated": round(float(np.mean((sub_gt == 0) | (sub_gt == 255))), 3)}
    if args.guidance:
        print(f"\nThresholding in the pixel stage (fed the base's samples, level {level}; {len(sub)} prompts; the "
              f"ground truth's saturated share {results['thresholding']['ground_truth_saturated']}):\n")
        print("| guidance | thresholding | accuracy at 128 px | saturated values |\n|---|---|---|---|")
    for guidance in args.guidance:
        for kind in (False, "static", "dynamic"):  # False: none (None would be the model's own)
            images, _ = upscale(pipe, sub, sub_low, level, guidance=guidance, thresholding=kind)
            saturated = float(np.mean((images == 0) | (images == 255)))
            acc = accuracy(images, sub)
            print(f"| {guidance:g} | {kind or 'none'} | {acc:.3f} | {saturated:.3f} |")
            results["thresholding"]["rows"].append({"guidance": guidance, "thresholding": kind,
                                                    "accuracy": round(acc, 3), "saturated": round(saturated, 3)})
    if args.json:
        write_json(results, args.json)


if __name__ == "__main__":
    main()
