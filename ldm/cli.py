"""The `ldm` command."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .device import DTYPES
from .sampling import SAMPLERS


def _oracle_table(args: argparse.Namespace) -> int:
    """Sample Gaussian data with its closed-form optimal denoiser through every sampler and print how close
    each lands to the true mean and std: the diffusion core, checked end to end in a second."""
    from .diffusion import NoiseSchedule, gaussian_denoiser
    from .random import randn
    from .sampling import sample

    schedule = NoiseSchedule.from_name(args.schedule)
    mean, std = 0.3, 0.5
    denoise = gaussian_denoiser(mean, std)
    print(f"x0 ~ N({mean}, {std}^2), {args.samples} samples, {args.schedule} schedule, T={schedule.num_timesteps}")
    print(f"{'sampler':<36}{'mean':>8}{'std':>8}{'std/true':>10}{'seconds':>9}")
    runs = [("ddpm", 1000, {}), ("ddpm", 50, {}), ("ddpm", 50, {"variance": "fixed_large"}),
            ("ddim", 50, {}), ("ddim", 50, {"eta": 1.0}), ("langevin", 100, {}), ("dpmpp_2m", 20, {})]
    runs += [(name, 20, {}) for name in SAMPLERS if name not in {r[0] for r in runs}]  # every registered one
    for name, steps, options in runs:
        g = torch.Generator().manual_seed(0)
        x_T = randn((args.samples, 4), g, torch.float64)
        start = time.perf_counter()
        x = sample(denoise, x_T, schedule, steps, name, generator=g, **options)
        elapsed = time.perf_counter() - start
        label = f"{name} {steps} steps" + "".join(f" {k}={v}" for k, v in options.items())
        s = (x - x.mean(0)).std().item()
        print(f"{label:<36}{x.mean().item():>8.3f}{s:>8.3f}{s / std:>10.3f}{elapsed:>9.2f}")
    return 0


DEMO_PROMPTS = ["a red circle above a blue square", "two green triangles", "a large yellow star",
                "a purple diamond in the top left corner", "three pink circles on a black background",
                "an orange circle to the left of a cyan square", "a small blue triangle at the bottom right",
                "a green star"]


def _demo(args: argparse.Namespace) -> int:
    """A grid of the shipped model's images for a handful of prompts (one column each), written to a PNG."""
    import numpy as np
    from PIL import Image

    from pipelines import CascadePipeline, TextToImagePipeline

    from .checkpoints import stage_count

    try:
        out = _output_paths(args.output, 1)[0]
        cls = CascadePipeline if stage_count(args.model) > 1 else TextToImagePipeline
        pipe = cls.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=_device(args.device))
        pipe.progress = False
        start = time.perf_counter()
        images = pipe(DEMO_PROMPTS, num_inference_steps=args.steps, seed=0, num_images_per_prompt=2,
                      output_type="np").images
        elapsed = time.perf_counter() - start
        n = len(DEMO_PROMPTS)
        rows = [np.concatenate([images[2 * j + r] for j in range(n)], axis=1) for r in range(2)]
        grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
        zoom = max(1, 128 // images.shape[1])  # 64-px images shown at 2x
        _save_images([Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST)],
                     [out])
    except (UsageError, ValueError, OSError, FloatingPointError) as err:
        print(f"ldm demo: error: {err}", file=sys.stderr)
        return 2
    for k, prompt in enumerate(DEMO_PROMPTS):
        print(f"column {k + 1}: {prompt}")
    steps = "the model's own steps" if args.steps is None else f"{args.steps} steps"
    print(f"{2 * n} images of {images.shape[1]}x{images.shape[2]}, {steps}, {elapsed:.2f} s")
    print(out.resolve())
    return 0


SAMPLER_CHOICES = list(SAMPLERS)
SAMPLER_HELP = "default: the model's own (diffusion.sampler in its folder; ddim where none is stored)"
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # -o suffix -> PIL format
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)


class UsageError(Exception):
    """A bad command-line input found before any work: printed as one line, exit code 2."""


def _device(name: str) -> str:
    """--device auto: a CUDA GPU if there is one, else an Apple GPU, else the CPU."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def _output_paths(output: str, count: int) -> list:
    """The files -o names for `count` images (out.png, or out-0.png, out-1.png, ...), checked before any drawing:
    a known image suffix and a folder that exists or can be made, and is writable."""
    import os
    from pathlib import Path

    out = Path(output)
    if out.is_dir():
        raise UsageError(f"-o/--output {output!r} is a folder; give a file name such as {output}/out.png")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"-o/--output must end in {', '.join(IMAGE_SUFFIXES)}; got {output!r}")
    folder = out.parent
    while not folder.exists():  # the nearest folder that exists must let us make the rest
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"-o/--output {output!r}: cannot write into {str(folder)!r}")
    return [out if count == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(count)]


def _save_images(images, paths) -> list[str]:
    """Each image written atomically (a temporary file, then a rename): an existing file is never half-overwritten."""
    from .files import atomic_path

    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        with atomic_path(path) as tmp:
            image.save(tmp, format=IMAGE_FORMATS[path.suffix.lower()])
    return [str(p) for p in paths]


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"--image {path!r}: no such file") from None
    except UnidentifiedImageError:
        raise UsageError(f"--image {path!r} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except OSError as err:  # a truncated or unreadable file
        raise UsageError(f"--image {path!r} cannot be read: {err}") from None


def _generate(args: argparse.Namespace) -> int:
    """Text-to-image or image-to-image from the command line; prints the written paths."""
    from pipelines import CascadePipeline, ImageToImagePipeline, TextToImagePipeline

    from .checkpoints import stage_count

    try:
        paths = _output_paths(args.output, args.num_images)
        image = _read_image(args.image) if args.command == "img2img" else None
        cascade = args.command == "generate" and stage_count(args.model) > 1
        kwargs = dict(negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      sampler=args.sampler, sampler_options=_sampler_options(args.sampler_option),
                      num_images_per_prompt=args.num_images, seed=args.seed)
        if cascade:  # every stage with the given steps, guidance and sampler (or each its own default)
            pipe = CascadePipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=_device(args.device))
            if args.eta:
                kwargs["sampler_options"] = {**(kwargs["sampler_options"] or {}), "eta": args.eta}
        else:
            cls = ImageToImagePipeline if args.command == "img2img" else TextToImagePipeline
            pipe = cls.from_pretrained(args.model, allow_pickle=args.allow_pickle, dtype=DTYPES[args.dtype],
                                       device=_device(args.device))
            kwargs["eta"] = args.eta
        if args.command == "img2img":
            out = pipe(args.prompt, image=image, strength=args.strength, **kwargs)
        else:
            out = pipe(args.prompt, height=args.height, width=args.width, **kwargs)
        written = _save_images(out.images, paths)
    except (UsageError, ValueError, OSError, FloatingPointError) as err:  # FileNotFoundError is an OSError
        print(f"ldm {args.command}: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _sampler_options(pairs: list[str]) -> dict:
    """--sampler-option KEY=VALUE pairs as a dict; VALUE is read as JSON (1, 0.5, true, "text") or else as text."""
    import json

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--sampler-option expects KEY=VALUE (e.g. eta=1.0); got {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _add_generation_args(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("prompt")
    cmd.add_argument("--model", default=None, help="our folder, a diffusers folder, an SD .safetensors file, or the "
                                                    "name of a shipped model (default: the shipped default)")
    cmd.add_argument("--negative", default=None, help="negative prompt")
    cmd.add_argument("--steps", type=int_at_least(1), default=None, help="default: the model's own (shapes-64: 20; "
                     "50 where a folder stores none)")
    cmd.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; default: the "
                     "model's own (shapes-64: 3; 7.5 where a folder stores none)")
    cmd.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES, help=SAMPLER_HELP)
    cmd.add_argument("--eta", type=float, default=0.0, help="ddim's eta (the same as --sampler-option eta=...)")
    cmd.add_argument("--sampler-option", action="append", metavar="KEY=VALUE", help="an option of the sampler, "
                     "repeatable (" + "; ".join(f"{name}: {', '.join(spec.options) or 'none'}"
                                                for name, spec in SAMPLERS.items()) + ")")
    cmd.add_argument("--seed", type=int_at_least(0), default=0, help="image k gets seed + k")
    cmd.add_argument("--num-images", type=int_at_least(1), default=1)
    _add_device_args(cmd)
    cmd.add_argument("--allow-pickle", action="store_true", help="allow .ckpt pickles (weights_only loading)")
    cmd.add_argument("-o", "--output", default="out.png")
    cmd.set_defaults(func=_generate)


def _add_device_args(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or mps; auto (the default): cuda if "
                     "available, else mps, else cpu")
    cmd.add_argument("--dtype", default="float32", choices=list(DTYPES))


def _bench(args: argparse.Namespace) -> int:
    """`ldm bench shapes`: per-task accuracy on seen and held-out compositions, and seconds per image."""
    from pipelines import TextToImagePipeline

    from .eval.shapes_bench import run_shapes_benchmark

    try:
        pipe = TextToImagePipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=_device(args.device))
        pipe.progress = False
        steps = pipe.diffusion.default_steps if args.steps is None else args.steps
        guidance = pipe.diffusion.guidance_scale if args.guidance is None else args.guidance
        result = run_shapes_benchmark(pipe, steps, args.sampler, guidance, per_task=args.per_task,
                                      batch_size=args.batch_size, seed=args.seed)
    except (ValueError, OSError) as err:
        print(f"ldm bench: error: {err}", file=sys.stderr)
        return 2
    print(f"shapes benchmark: model {args.model or 'shapes-64 (default)'}, {result['sampler']} {steps} steps, "
          f"guidance {guidance}, {result['images']} images"
          + (f", prompt set {args.seed} (not the published one, 0)" if args.seed else ""))
    print(result["table"])
    print(f"seconds per image: {result['seconds_per_image']:.4f} (batches of {args.batch_size}, "
          f"{torch.get_num_threads()} threads)")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Fine-tune a pipeline on a captioned image folder (TrainConfig fields from --config, then from the flags)."""
    import json
    from dataclasses import fields

    from .train.config import TrainConfig
    from .train.trainer import Trainer

    names = {f.name for f in fields(TrainConfig)}
    try:
        values = {}
        if getattr(args, "config", None):
            with open(args.config) as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise ValueError(f"--config {args.config} must hold a JSON object of TrainConfig fields")
        values.update({k: v for k, v in vars(args).items() if k in names})
        if "dtype" in vars(args):  # --dtype: the compute dtype, as mixed precision over float32 weights
            values["mixed_precision"] = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
        final = Trainer(TrainConfig.from_dict(values), resume=getattr(args, "resume", None)).train()
    except (ValueError, OSError) as err:  # json.JSONDecodeError is a ValueError
        print(f"ldm train: error: {err}", file=sys.stderr)
        return 2
    print(final)
    return 0


def int_at_least(low: int):
    """argparse type: an integer >= low, refused by argparse with the argument's name otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def number_or_none(text: str):
    return None if text.lower() == "none" else float(text)


def int_or_none(text: str):
    return None if text.lower() == "none" else int(text)


def _add_train_args(cmd: argparse.ArgumentParser) -> None:
    """Every flag defaults to 'not given' (SUPPRESS), so --config values stay unless a flag overrides them."""
    from .train import config as tc

    flag = argparse.BooleanOptionalAction
    add = cmd.add_argument
    add("--config", help="JSON file of TrainConfig fields (flags override it)")
    add("--data", dest="data_dir", help="captioned image folder (metadata.jsonl, metadata.csv or img + img.txt)")
    add("--output", dest="output_dir", help="run folder: checkpoints/, samples/, log.csv, final/")
    add("--base", dest="base_model", help="base model: our folder, a diffusers folder, an SD .safetensors file or a "
                                          "shipped model's name (default: the shipped default)")
    add("--resume", help="'latest' (the newest checkpoint in --output; a fresh start if none) or a step-N folder")
    add("--format", dest="data_format", choices=tc.DATA_FORMATS)
    add("--resolution", type=int)
    add("--crop", choices=tc.CROPS)
    add("--random-flip", action=flag)
    add("--caption-dropout", type=float)
    add("--cache-latents", action=flag, help="encode images and captions once (needs --crop center, no flip)")
    add("--mode", choices=tc.MODES)
    add("--train-text-encoder", action=flag)
    add("--lora-rank", type=int)
    add("--lora-alpha", type=number_or_none)
    add("--loss", choices=tc.LOSSES)
    add("--snr-gamma", type=number_or_none, help="min-SNR-gamma loss weighting, e.g. 5 (default: none)")
    add("--lr", dest="learning_rate", type=float)
    add("--lr-scheduler", choices=tc.LR_SCHEDULERS)
    add("--warmup-steps", type=int)
    add("--steps", dest="max_steps", type=int)
    add("--batch-size", type=int, help="per process")
    add("--grad-accum", dest="gradient_accumulation_steps", type=int)
    add("--mixed-precision", choices=tc.MIXED_PRECISION)
    add("--gradient-checkpointing", action=flag)
    add("--ema-decay", type=number_or_none, help="e.g. 0.999 (default: no EMA)")
    add("--max-grad-norm", type=number_or_none, help="gradient clipping norm, or 'none'")
    add("--weight-decay", type=float)
    add("--seed", type=int)
    add("--checkpoint-every", type=int)
    add("--checkpoints-total-limit", type=int_or_none, help="checkpoints kept (default 2; 'none': all)")
    add("--sample-every", type=int)
    add("--sample-prompt", dest="sample_prompts", action="append", help="repeat for several prompts")
    add("--sample-steps", type=int)
    add("--sample-guidance", type=float)
    add("--log", choices=tc.LOGGERS)
    add("--num-workers", type=int, help="data-loading worker processes")
    add("--device", choices=["cpu", "cuda", "mps"], help="default: a CUDA GPU if there is one, else the CPU")
    add("--dtype", choices=list(DTYPES), help="compute dtype: bfloat16/float16 train in mixed precision over "
                                              "float32 weights (the same as --mixed-precision bf16/fp16)")
    cmd.set_defaults(func=_train)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent text-to-image diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    oracle = sub.add_parser("oracle", help="run every sampler on Gaussian data with the exact denoiser")
    oracle.add_argument("--schedule", default="cosine", choices=["linear", "scaled_linear", "cosine"])
    oracle.add_argument("--samples", type=int, default=10_000)
    oracle.set_defaults(func=_oracle_table)
    demo = sub.add_parser("demo", help="what `make demo` runs: a grid of images from the shipped model")
    demo.add_argument("--model", default=None)
    demo.add_argument("--steps", type=int_at_least(1), default=None, help="default: the model's own")
    _add_device_args(demo)
    demo.add_argument("-o", "--output", default="out/demo.png")
    demo.set_defaults(func=_demo)
    generate = sub.add_parser("generate", help="text-to-image")
    _add_generation_args(generate)
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--width", type=int, default=None)
    img2img = sub.add_parser("img2img", help="image-to-image (SDEdit)")
    _add_generation_args(img2img)
    img2img.add_argument("--image", required=True)
    img2img.add_argument("--strength", type=float, default=0.8)
    bench = sub.add_parser("bench", help="benchmarks: `ldm bench shapes`")
    bench.add_argument("suite", choices=["shapes"])
    bench.add_argument("--model", default=None)
    bench.add_argument("--steps", type=int_at_least(1), default=None, help="default: the model's own")
    bench.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES, help=SAMPLER_HELP)
    bench.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    _add_device_args(bench)
    bench.add_argument("--per-task", type=int_at_least(1), default=36)
    bench.add_argument("--batch-size", type=int_at_least(1), default=32)
    bench.add_argument("--seed", type=int_at_least(0), default=0, help="prompt set (prompts and their seeds); 0 is the published "
                       "benchmark, others are held-out sets for tuning sampler settings without fitting it")
    bench.set_defaults(func=_bench)
    train = sub.add_parser("train", help="fine-tune a model on a captioned image folder (full or LoRA)",
                           argument_default=argparse.SUPPRESS)
    _add_train_args(train)
    args = parser.parse_args(argv)
    if getattr(args, "samples", 2) < 2:
        parser.error("--samples must be at least 2")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
