"""Quality per network call on the shipped shapes-64 model: the shapes benchmark for each sampler and grid at 5, 10
and 20 steps, with seconds per image and the network calls each image took (counted, not assumed). Prints the
markdown table of docs/benchmarks.md ("Samplers on shapes-64") row by row.

Choices are made on tuning prompt sets (--seed 1, the default; prompts and seeds differ from the published set,
seed 0), so a sampler or grid is not picked by fitting the published numbers. Every configuration draws the same
prompts with the same seeds, so differences are paired: the second table compares each configuration with the
model's stored default at 20 steps prompt by prompt (prompts right only with it / only with the default, and
the paired standard error of the difference, sqrt(b + c - (b - c)^2 / n) / n); the s.e. in the first table is
that of one accuracy (binomial, over the images of both splits).

Run: `python benchmarks/shapes_samplers.py [--seed 1] [--per-task 24] [--steps 5 10 20] [--samplers ...]
[--grids trailing karras ...] [--out results.jsonl]`; with --out, configurations already in the file are
skipped, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys

import torch

from ldm.eval.shapes_bench import run_shapes_benchmark
from ldm.sampling import SAMPLERS
from pipelines import TextToImagePipeline

GRIDS = {"trailing": dict(spacing="trailing", steps_offset=0, sigma_schedule=None),
         "leading": dict(spacing="leading", steps_offset=1, sigma_schedule=None),
         "karras": dict(spacing="linspace", steps_offset=0, sigma_schedule="karras"),
         "exponential": dict(spacing="linspace", steps_offset=0, sigma_schedule="exponential"),
         "linspace": dict(spacing="linspace", steps_offset=0, sigma_schedule=None),
         "beta": dict(spacing="linspace", steps_offset=0, sigma_schedule="beta")}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def paired(row: dict, ref: dict) -> tuple[float, int, int, float]:
    """(difference in mean accuracy, prompts right only in row, only in ref, paired s.e. of the difference)."""
    a = [x for split in ("seen", "heldout") for x in row["correct"][split]]
    b = [x for split in ("seen", "heldout") for x in ref["correct"][split]]
    n, only_a, only_b = len(a), sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    return (only_a - only_b) / n, only_a, only_b, math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-task", type=int, default=24)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON lines of results; done configurations are skipped")
    args = parser.parse_args()

    pipe = TextToImagePipeline.from_pretrained(args.model)
    pipe.progress = False
    stored = pipe.diffusion
    calls = [0]
    pipe.unet.register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    done = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                row = json.loads(line)
                if (row.get("seed", 1), row.get("per_task", 24)) == (args.seed, args.per_task):  # same prompts
                    done[(row["sampler"], row["grid"], row["steps"])] = row
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; prompt set {args.seed}, {args.per_task} prompts per task "
          f"and split; stored default: {stored.sampler} on {stored.spacing}"
          + (f" + {stored.sigma_schedule}" if stored.sigma_schedule else "") + "\n")
    for grid in args.grids:
        pipe.diffusion = dataclasses.replace(stored, **GRIDS[grid])
        for sampler in args.samplers:
            for steps in args.steps:
                key = (sampler, grid, steps)
                if key not in done:
                    calls[0] = 0
                    result = run_shapes_benchmark(pipe, steps, sampler, stored.guidance_scale,
                                                  per_task=args.per_task, batch_size=args.batch_size, seed=args.seed)
                    batches = 2 * math.ceil(result["images"] / 2 / args.batch_size)
                    done[key] = {"sampler": sampler, "grid": grid, "steps": steps, "seed": args.seed,
                                 "per_task": args.per_task, "calls": calls[0] / batches,
                                 "seen": result["scores"]["seen"]["mean"],
                                 "heldout": result["scores"]["heldout"]["mean"], "images": result["images"],
                                 "correct": result["correct"], "seconds_per_image": result["seconds_per_image"]}
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(done[key]) + "\n")
                    print(f"{sampler} {grid} {steps}: done", file=sys.stderr, flush=True)
    steps_cols = " | ".join(f"{n} steps" for n in args.steps)
    print(f"Mean accuracy (seen + held-out) / network calls per image at each step count; seconds per image at "
          f"{args.steps[-1]} steps.\n")
    print(f"| sampler | grid | {steps_cols} | s / image |")
    print("|---|---|" + "---|" * len(args.steps) + "---|")
    for grid in args.grids:
        for sampler in args.samplers:
            rows = [done[(sampler, grid, n)] for n in args.steps]
            cells = " | ".join(f"{(r['seen'] + r['heldout']) / 2:.3f} / {r['calls']:g}" for r in rows)
            print(f"| {sampler} | {grid} | {cells} | {rows[-1]['seconds_per_image']:.3f} |")
    n = done[(args.samplers[0], args.grids[0], args.steps[0])]["images"]
    print(f"\nStandard error of one mean: {math.sqrt(0.25 / n):.3f} at most ({n} images).")
    stored_grid = next((g for g, v in GRIDS.items() if all(getattr(stored, k) == x for k, x in v.items())), None)
    ref = done.get((stored.sampler, stored_grid, 20))
    if ref is None:
        return
    print(f"\nAgainst the stored default ({stored.sampler}, {stored_grid}, 20 steps), prompt by prompt:\n")
    print("| sampler | grid | steps | difference | right only here / only with the default | paired s.e. |")
    print("|---|---|---|---|---|---|")
    for (sampler, grid, steps), row in done.items():
        if row is not ref:
            diff, only_a, only_b, se = paired(row, ref)
            print(f"| {sampler} | {grid} | {steps} | {diff:+.3f} | {only_a} / {only_b} | {se:.3f} |")


if __name__ == "__main__":
    main()
