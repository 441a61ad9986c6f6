"""The shapes cascade's MODEL_CARD.md, rendered from its folder: ldm_pipeline.json (the stages), training.json
(what `python -m ldm.train.shapes_sr export` wrote, with the measurements of benchmarks/shapes_cascade.py merged
in by `card --results`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..pipeline_folder import component_config


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("—" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_cascade_card(folder: Path) -> str:
    folder = Path(folder)
    record = json.loads((folder / "training.json").read_text())
    meta = json.loads((folder / "ldm_pipeline.json").read_text())
    base, sr = meta["stages"][0], meta["stages"][1]
    low = sr["low_res"]
    unet = component_config(folder, sr["unet"])
    m = record.get("measurements")
    out = [f"# {folder.name}: the shapes world at 128x128 through a cascade", "",
           "A two-stage cascade (Ho et al. 2021): the shipped shapes-64 latent model draws the scene at 64x64, then a "
           "pixel-space super-resolution U-Net conditioned on that image (upsampled "
           f"{low['upsample']}, concatenated to x_t, corrupted by noise-conditioning augmentation) and on the caption "
           "draws it at 128x128. Trained by this package (`ldm/train/shapes_sr.py`) on its procedural shapes world, "
           "on a 2-core CPU. `CascadePipeline.from_pretrained(\"shapes-cascade\")`, or `ldm generate --model "
           "shapes-cascade`.", "",
           "## Stages",
           f"- Base: shapes-64 (its own card: `weights/{Path(record['base']).name}/MODEL_CARD.md`), "
           f"{base['diffusion']['sampler']}, {base['diffusion']['num_inference_steps']} steps, guidance "
           f"{base['diffusion']['guidance_scale']}.",
           f"- Super-resolution: {record['sr_parameters'] / 1e6:.2f} M parameters, x{low['scale']}, cosine schedule, "
           f"{sr['diffusion']['prediction_type']}-prediction, EMA weights; {sr['diffusion']['sampler']}, "
           f"{sr['diffusion']['num_inference_steps']} steps, guidance {sr['diffusion']['guidance_scale']}. "
           f"Augmentation: Gaussian noise at level s of a {low['schedule']} schedule, s uniform in "
           f"[0, {low['max_noise_level']}] in training; at sampling the default level is {low['noise_level']} "
           "(`noise_level=`). Config: `" + json.dumps(unet) + "`", "",
           "## Training",
           f"- {record['sr_steps']} steps, {record['sr_minutes']:.0f} min of wall time, "
           f"{'with' if record['augment'] else 'without'} augmentation, on 64x64 windows of the 128-px scenes "
           "(the same window of the upsampled 64-px input), 10% of captions dropped for classifier-free guidance.",
           "- Commands:", "", "```", *record["commands"], "```", ""]
    out += ["## Measured", ""]
    if m is None:
        out += ["Not measured yet: run `python benchmarks/shapes_cascade.py --model weights/shapes-cascade --json "
                "results.json`, then `python -m ldm.train.shapes_sr card --model weights/shapes-cascade --results "
                "results.json`.", ""]
        return "\n".join(out)
    out += [f"On {m['prompts']} benchmark prompts (set {m['prompt_set']}, {m['per_task']} per task and split), "
            f"{m['hardware']}. Accuracy is the shapes evaluator read at 128 px.", "",
            "Fed the 64-px ground truth, against the 128-px render of the same scene:", "",
            _table(["upsampler", "PSNR dB", "edge sharpness (share of the ground truth's)", "accuracy"],
                   [[r["upsampler"], r["psnr"], r["sharpness"], r["accuracy"]] for r in m["ground_truth_fed"]]), "",
            f"Fed the base model's samples (base accuracy at 64 px {m['base']['accuracy_64']}, "
            f"{m['base']['seconds_per_image']} s per image; Lanczos to 128 px: {m['base']['lanczos_accuracy_128']}):",
            "",
            _table(["super-resolution stage", "level", "accuracy", "right only here / only with Lanczos",
                    "s / image"],
                   [[r["stage"], r["level"], r["accuracy"], f"{r['only_here']} / {r['only_lanczos']}",
                     r["seconds_per_image"]] for r in m["fed_base"]]), ""]
    if m.get("augmentation_paired"):
        p = m["augmentation_paired"]
        out += [f"Prompt by prompt, with against without augmentation: right only with it {p['only_with']}, only "
                f"without it {p['only_without']}.", ""]
    lv = m["levels"]
    if len(lv["rows"]) > 1:
        out += [f"Augmentation level at sampling (non-truncated), on {lv['prompts']} of the prompts (Lanczos "
                f"{lv['lanczos_accuracy']}):", "",
                _table(["level", "accuracy", "right only here / only with Lanczos"],
                       [[r["level"], r["accuracy"], f"{r['only_here']} / {r['only_lanczos']}"] for r in lv["rows"]]),
                ""]
    out += ["Truncated augmentation (the base stopped at the level's noise and its noisy sample fed as it is) needs a "
            "base that samples pixels; shapes-64 samples latents, so this cascade takes non-truncated augmentation "
            "only (truncated cascades are exercised on pixel-space bases in `tests/test_cascade.py`).", ""]
    th = m["thresholding"]
    if th["rows"]:
        out += [f"Thresholding of x0 in the pixel stage, on {th['prompts']} of the prompts (the ground truth's own "
                f"share of saturated channel values: {th['ground_truth_saturated']}):", "",
                _table(["guidance", "thresholding", "accuracy", "saturated channel values"],
                       [[r["guidance"], r["thresholding"] or "none", r["accuracy"], r["saturated"]]
                        for r in th["rows"]]), ""]
    out += ["Command: `" + m.get("command", "python benchmarks/shapes_cascade.py --model weights/shapes-cascade")
            + "`", ""]
    return "\n".join(out)
