"""The fine-tuning trainer on a tiny random pipeline and 8 captioned 32-px images: full and LoRA training lower a
fixed held-out loss, the LoRA file loads into a pipeline and changes its images, every bad input fails before the
first step, and a run killed halfway through writing a checkpoint resumes to exactly the uninterrupted result."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm.cli import main
from ldm.data.folder import CaptionedImageFolder
from ldm.diffusion import Denoiser, training_losses
from ldm.nn.unet import UNetModel
from ldm.train.config import TrainConfig
from ldm.train.state import load_training_state
from ldm.train.trainer import Trainer
from pipelines import TextToImagePipeline
from test_checkpoints import randomize, tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
COLORS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]


def make_images(folder: Path) -> Path:
    """8 images of 32 px, a colour gradient each, with a caption naming the colour (img.png + img.txt)."""
    folder.mkdir(parents=True)
    rgb = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1),
           "magenta": (1, 0, 1), "white": (1, 1, 1), "black": (0.1, 0.1, 0.1)}
    ramp = np.linspace(0.3, 1.0, 32)[None, :, None]
    for k, name in enumerate(COLORS):
        img = (ramp * np.array(rgb[name])[None, None, :] * np.ones((32, 1, 1)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(f"a {name} gradient")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    tiny_pipeline(1).save_pretrained(root / "base")
    return {"base": str(root / "base"), "data": str(make_images(root / "data"))}


def config(setup, output, **kw) -> TrainConfig:
    values = dict(data_dir=setup["data"], output_dir=str(output), base_model=setup["base"], resolution=32,
                  batch_size=4, max_steps=8, checkpoint_every=100, caption_dropout=0.0)
    return TrainConfig(**{**values, **kw})


def held_out_loss(pipe, data: str) -> float:
    """L_simple on all 8 images at 8 fixed timesteps with fixed noise (VAE posterior means)."""
    ds = CaptionedImageFolder(data, resolution=32)
    x = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    g = torch.Generator().manual_seed(123)
    denoiser = Denoiser(pipe.unet, pipe.schedule, pipe.diffusion.prediction_type)
    with torch.no_grad():
        x0 = pipe.vae.encode(x, sample=False)
        context, _ = pipe.encode_prompts(ds.captions)
        losses = [training_losses(denoiser, x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=g),
                                  context=context)["loss"].mean() for t in range(50, 1000, 125)]
    return float(torch.stack(losses).mean())


def test_full_finetuning_lowers_the_loss_and_writes_a_pipeline(setup, tmp_path):
    out = tmp_path / "run"
    final = Trainer(config(setup, out, learning_rate=3e-3, max_steps=16, ema_decay=0.9, sample_every=8,
                           sample_prompts=("a red gradient", "a blue gradient"), sample_steps=2)).train()
    assert final == out / "final"
    before = held_out_loss(TextToImagePipeline.from_pretrained(setup["base"]), setup["data"])
    after = held_out_loss(TextToImagePipeline.from_pretrained(final), setup["data"])  # EMA weights
    assert after < 0.9 * before, (before, after)
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds" and [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 17)]
    for step in (8, 16):
        assert Image.open(out / "samples" / f"step-{step}.png").size == (64, 32)  # one 32-px image per prompt
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-16"]
    assert TrainConfig.from_dict(json.loads((final / "train_config.json").read_text())).ema_decay == 0.9


def test_lora_lowers_the_loss_and_loads_into_a_pipeline(setup, tmp_path):
    out = tmp_path / "lora"
    final = Trainer(config(setup, out, mode="lora", lora_rank=4, learning_rate=3e-2, ema_decay=0.5)).train()
    assert sorted(p.name for p in final.iterdir()) == ["lora.safetensors", "lora_ema.safetensors", "train_config.json"]
    pipe = TextToImagePipeline.from_pretrained(setup["base"])
    pipe.progress = False

    def image():
        return pipe("a red gradient", num_inference_steps=3, guidance_scale=2.0, seed=0, height=32, width=32,
                    output_type="np").images[0]

    before_image, before = image(), held_out_loss(pipe, setup["data"])
    pipe.load_lora(final / "lora.safetensors")
    after_image, after = image(), held_out_loss(pipe, setup["data"])
    assert np.abs(after_image - before_image).max() > 1e-3
    pipe.unload_lora()
    pipe.load_lora(final / "lora.safetensors", scale=-1.0)
    reversed_ = held_out_loss(pipe, setup["data"])
    pipe.unload_lora()
    # adapters on this tiny random U-Net's attention move the loss little (about 0.4 %), but they move it the way
    # a learned descent direction does: down at scale +1, up at scale -1 (a random direction goes up both ways)
    assert after < before - 2e-3 and reversed_ > before, (before, after, reversed_)
    assert np.array_equal(image(), before_image)  # unload_lora restored the base
    pipe.load_lora(final / "lora_ema.safetensors")
    assert held_out_loss(pipe, setup["data"]) < before - 2e-3


def test_cached_latents_mixed_precision_and_text_encoder_training(setup, tmp_path):
    """The other paths run end to end: cached latents + bf16 autocast + gradient checkpointing + min-SNR weights;
    and text-encoder training, which changes the text encoder (frozen otherwise)."""
    base = TextToImagePipeline.from_pretrained(setup["base"])
    final = Trainer(config(setup, tmp_path / "cached", max_steps=2, cache_latents=True, mixed_precision="bf16",
                           gradient_checkpointing=True, snr_gamma=5.0, caption_dropout=0.5)).train()
    tuned = TextToImagePipeline.from_pretrained(final)
    text = [(base.text_encoder.state_dict()[k], v) for k, v in tuned.text_encoder.state_dict().items()]
    assert all(torch.equal(a, b) for a, b in text)
    assert any(not torch.equal(base.unet.state_dict()[k], v) for k, v in tuned.unet.state_dict().items())
    final = Trainer(config(setup, tmp_path / "text", max_steps=2, train_text_encoder=True, learning_rate=1e-3,
                           lr_scheduler="linear", num_workers=1)).train()
    tuned = TextToImagePipeline.from_pretrained(final)
    text = [(base.text_encoder.state_dict()[k], v) for k, v in tuned.text_encoder.state_dict().items()]
    assert any(not torch.equal(a, b) for a, b in text)


BAD_CONFIGS = [
    (dict(mode="dreambooth"), "mode must be one of full, lora"),
    (dict(loss="l1"), "loss must be one of simple, hybrid, vlb"),
    (dict(lr_scheduler="step"), "lr_scheduler must be one of"),
    (dict(mixed_precision="fp8"), "mixed_precision must be one of"),
    (dict(crop="left"), "crop must be one of"),
    (dict(log="wandb"), "log must be one of csv, tensorboard"),
    (dict(learning_rate=0.0), "learning_rate must be a number > 0"),
    (dict(learning_rate=-1e-4), "learning_rate must be a number > 0"),
    (dict(max_steps=0), "max_steps must be a positive integer"),
    (dict(batch_size=-2), "batch_size must be a positive integer"),
    (dict(batch_size=2.5), "batch_size must be a positive integer"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be a positive integer"),
    (dict(resolution=0), "resolution must be a positive integer"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive integer"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(warmup_steps=20), "warmup_steps must be at most max_steps"),
    (dict(caption_dropout=1.5), "caption_dropout must be a number in [0, 1]"),
    (dict(ema_decay=1.0), "ema_decay must be None (no EMA) or a number in (0, 1)"),
    (dict(snr_gamma=0), "snr_gamma must be None or a number > 0"),
    (dict(lora_rank=0), "lora_rank must be a positive integer"),
    (dict(mode="lora", train_text_encoder=True), "train_text_encoder must be false in mode 'lora'"),
    (dict(cache_latents=True, random_flip=True), "cache_latents must be false with crop 'random' or random_flip"),
    (dict(sample_every=5), "sample_prompts must be at least one prompt"),
    (dict(sample_prompts=("ok", "")), "sample_prompts must be a list of non-empty strings"),
    (dict(data_dir=""), "data_dir must be a non-empty path"),
    (dict(device="tpu"), "device must be None (a CUDA GPU if there is one, else the CPU), 'cpu', 'cuda' or 'mps'"),
]


@pytest.mark.parametrize("kw,message", BAD_CONFIGS, ids=[m.split(" ")[0] + f"-{i}" for i, (_, m) in
                                                           enumerate(BAD_CONFIGS)])
def test_bad_config_values_name_the_field(setup, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config(setup, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_model_and_data_errors_come_before_the_first_step(setup, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (dict(resolution=36), None, "resolution must be a multiple of the autoencoder's downsampling factor 8"),
        (dict(base_model=str(tmp_path / "missing")), None, "base_model .* cannot be loaded: no model at"),
        (dict(loss="hybrid"), None, "loss 'hybrid' needs a model with a learned variance"),
        (dict(batch_size=16), None, "batch_size x processes = 16 is more than the 8 images"),
        (dict(data_dir=str(empty)), None, "no usable images"),
        (dict(data_dir=str(tmp_path / "nope")), None, "root must be an existing directory"),
        (dict(sample_every=1, sample_prompts=("x",), sample_steps=5000), None, "sample_steps must be at most 1000"),
        ({}, str(tmp_path / "step-3"), "resume must be 'latest' or a checkpoint folder step-N"),
    ]
    if importlib.util.find_spec("tensorboard") is None:
        cases.append((dict(log="tensorboard"), None, "needs the tensorboard package"))
    for kw, resume, message in cases:
        with pytest.raises(ValueError, match=message):
            Trainer(config(setup, out, **kw), resume=resume).train()
        assert not out.exists(), kw
    # checkpoints already in output_dir: continuing needs resume="latest"; a structural change is refused
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "config.json").write_text(
        json.dumps(config(setup, out).to_dict()))
    with pytest.raises(ValueError, match="already holds checkpoints .*resume='latest'"):
        Trainer(config(setup, out)).train()
    with pytest.raises(ValueError, match="mode is 'lora' but the checkpoint .* was trained with 'full'"):
        Trainer(config(setup, out, mode="lora"), resume="latest").train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_cli_flags_and_config_file(setup, tmp_path, capsys):
    data, base = setup["data"], setup["base"]
    assert main(["train", "--data", data, "--output", str(tmp_path / "a"), "--lr", "-1"]) == 2
    assert "learning_rate must be a number > 0; got -1.0" in capsys.readouterr().err
    assert main(["train", "--data", data, "--output", str(tmp_path / "a"), "--base", base, "--resolution", "36"]) == 2
    assert "resolution must be a multiple" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path / "a")]) == 2
    assert "data_dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["train", "--data", data, "--output", str(tmp_path / "a"), "--mode", "dreambooth"])
    assert err.value.code == 2 and "invalid choice: 'dreambooth'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["train", "--data", data, "--output", str(tmp_path / "a"), "--steps", "ten"])
    assert err.value.code == 2
    assert not (tmp_path / "a").exists()
    # a config file, overridden by flags
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"data_dir": data, "output_dir": str(tmp_path / "b"), "base_model": base,
                                              "resolution": 32, "max_steps": 5, "learning_rate": 0.5,
                                              "batch_size": 2}))
    assert main(["train", "--config", str(file), "--steps", "1", "--lr", "2e-4", "--mode", "lora",
                 "--lora-rank", "2", "--sample-prompt", "a", "--sample-prompt", "b", "--no-random-flip",
                 "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "b" / "final"))
    saved = TrainConfig.from_dict(json.loads((tmp_path / "b" / "config.json").read_text()))
    assert (saved.max_steps, saved.learning_rate, saved.mode, saved.lora_rank, saved.batch_size,
            saved.sample_prompts, saved.device, saved.mixed_precision) == (1, 2e-4, "lora", 2, 2, ("a", "b"),
                                                                           "cpu", "bf16")
    if not torch.cuda.is_available():  # a device that is not here: one line before the first step
        assert main(["train", "--config", str(file), "--output", str(tmp_path / "c"), "--device", "cuda"]) == 2
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()


def test_killed_run_resumes_exactly(setup, tmp_path, one_thread):
    """Run A: 6 steps uninterrupted. Run B (a subprocess running `ldm train`): killed with os._exit halfway
    through writing the step-6 checkpoint, i.e. after step 4's; then resumed with resume='latest'. B must pick
    step-4 (not the partial .tmp-step-6) and end bit-for-bit equal to A: weights, EMA, optimizer, LR schedule,
    data position and every logged loss. Exercised: U-Net dropout (global RNG), random crops, flips, caption
    dropout, gradient accumulation, warmup + cosine LR, EMA; 24 images per 8-image epoch, so epochs roll over."""
    pipe = tiny_pipeline(1)  # the same model with dropout, so the restored global RNG state matters
    pipe.unet = randomize(UNetModel(dataclasses.replace(pipe.unet.config, dropout=0.1)), 1)
    pipe.save_pretrained(tmp_path / "base")
    kw = dict(base_model=str(tmp_path / "base"), max_steps=6, batch_size=2, gradient_accumulation_steps=2,
              checkpoint_every=2, crop="random", random_flip=True, caption_dropout=0.5, ema_decay=0.9,
              lr_scheduler="cosine", warmup_steps=2, learning_rate=1e-3, seed=7)
    # float sums differ with the thread count, and the killed run is a subprocess with OMP_NUM_THREADS=1: every
    # part runs on one thread (the one_thread fixture) so that bit-equality tests resumption, not the thread count
    Trainer(config(setup, tmp_path / "A", **kw)).train()

    args = ["train", "--data", setup["data"], "--output", str(tmp_path / "B"), "--base", str(tmp_path / "base"),
            "--resolution", "32", "--steps", "6", "--batch-size", "2", "--grad-accum", "2", "--checkpoint-every",
            "2", "--crop", "random", "--random-flip", "--caption-dropout", "0.5", "--ema-decay", "0.9",
            "--lr-scheduler", "cosine", "--warmup-steps", "2", "--lr", "1e-3", "--seed", "7"]
    env = {**os.environ, "LDM_TRAIN_DIE_AT_STEP": "6:partial", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-m", "ldm.cli"] + args, env=env, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == 137, killed.stderr[-2000:]
    ckpts = tmp_path / "B" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step-6", "step-2", "step-4"]
    assert not (ckpts / ".tmp-step-6" / "state.pt").exists()  # died halfway through it
    assert len((tmp_path / "B" / "log.csv").read_text().splitlines()) == 7  # header + steps 1..6

    Trainer(config(setup, tmp_path / "B", **kw), resume="latest").train()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-4", "step-6"]  # checkpoints_total_limit=2
    a, b = tmp_path / "A" / "checkpoints" / "step-6", ckpts / "step-6"
    for name in ("trainable.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    sa, sb = load_training_state(a / "state.pt"), load_training_state(b / "state.pt")
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    for i, state in sa["optimizer"]["state"].items():
        assert all(torch.equal(v, sb["optimizer"]["state"][i][k]) for k, v in state.items())
    assert sa["lr_scheduler"] == sb["lr_scheduler"]
    assert (sa["step"], sa["epoch"], sa["index"], sa["ema_num_updates"]) == \
        (sb["step"], sb["epoch"], sb["index"], sb["ema_num_updates"]) == (6, 2, 8, 6)
    losses = [[r.split(",")[:3] for r in (tmp_path / run / "log.csv").read_text().splitlines()] for run in "AB"]
    assert losses[0] == losses[1] and len(losses[0]) == 7
