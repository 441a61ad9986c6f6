"""Run the shapes benchmark on a pipeline: generate every prompt of both splits with its fixed seed, read each
image back, and report per-task accuracy, the mean, and seconds per image."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from ..data.images import to_model_range, to_uint8
from .shapes_eval import SPLITS, benchmark_prompts, evaluate, format_table, ground_truth, score


def run_shapes_benchmark(pipe, num_inference_steps: int = 20, sampler: Optional[str] = None,
                         guidance_scale: float = 3.0, per_task: int = 36, batch_size: int = 32, splits=SPLITS,
                         seed: int = 0, progress: Optional[callable] = None) -> dict:
    """{"scores": {split: {task: accuracy, ..., "mean": m}}, "correct": {split: [bool per prompt, in order]},
    "seconds_per_image": s, "images": n, "sampler": name, "table": text}; sampler=None is the pipeline's default
    (the model folder's diffusion.sampler). "correct" lets two runs on the same prompts be compared prompt by
    prompt."""
    sampler = pipe.diffusion.sampler if sampler is None else sampler
    scores, correct, seconds, count = {}, {}, 0.0, 0
    for split in splits:
        prompts = benchmark_prompts(split, per_task=per_task, seed=seed)
        results = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            start = time.perf_counter()
            images = pipe([p.text for p in chunk], num_inference_steps=num_inference_steps, sampler=sampler,
                          guidance_scale=guidance_scale, seed=[p.seed for p in chunk], output_type="np").images
            seconds += time.perf_counter() - start
            count += len(chunk)
            for prompt, image in zip(chunk, images):
                results.append((prompt, evaluate((image * 255).round().astype(np.uint8), prompt.expectation)))
            if progress is not None:
                progress(split, i + len(chunk), len(prompts))
        scores[split] = score(results)
        correct[split] = [bool(ok) for _, ok in results]
    return {"scores": scores, "correct": correct, "seconds_per_image": seconds / max(count, 1), "images": count, "sampler": sampler,
            "table": format_table(scores)}


def autoencoder_ceiling(vae, per_task: int = 36, splits=SPLITS, seed: int = 0, batch_size: int = 128) -> dict:
    """The benchmark scored on its own ground truth sent through the autoencoder: each prompt's scene rendered
    (from the prompt's seed), encoded to the posterior mean and decoded. A U-Net whose latents were exactly
    those of the right scene would score this, so it bounds what the latent model can reach. {split: scores}."""
    size = vae.config.resolution
    scores = {}
    for split in splits:
        prompts = benchmark_prompts(split, per_task=per_task, seed=seed)
        x = to_model_range(np.stack([ground_truth(p, size) for p in prompts]))
        with torch.no_grad():
            rec = torch.cat([vae.decode(vae.encode(x[i:i + batch_size], sample=False))
                             for i in range(0, len(x), batch_size)])
        images = to_uint8(rec)
        scores[split] = score([(p, evaluate(image, p.expectation)) for p, image in zip(prompts, images)])
    return scores
