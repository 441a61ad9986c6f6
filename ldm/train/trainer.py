"""Fine-tune a latent text-to-image pipeline on a captioned image folder with accelerate: the whole U-Net (and
optionally the text encoder) or LoRA adapters on its attention projections. `Trainer(config).train() -> Path`.

Reproducibility: step s uses micro-batches s*A .. s*A+A-1 (A = gradient_accumulation_steps). The data order is a
permutation per epoch seeded by (seed, epoch); each micro-batch takes the next G = batch_size * processes indices
(the last partial batch of an epoch is dropped) and rank r keeps slice [r*b, (r+1)*b). Every sample's timestep,
noise and VAE posterior noise come from its own generator seeded by (seed, micro-batch, position in the global
batch), so 2 processes x batch b train on exactly what 1 process x batch 2b does, and a resumed run on exactly what
the uninterrupted one did. Image augmentation and caption dropout are seeded by (seed, epoch, index) in the dataset.

Checkpoints: output_dir/checkpoints/step-N/ (trainable.safetensors, ema.safetensors, state.pt with optimizer,
LR scheduler, step and data position, rng-<rank>.pt, config.json), written into .tmp-step-N/ and renamed into
place, so a directory named step-N is always complete and resume ignores anything else.

Test hook: LDM_TRAIN_DIE_AT_STEP=N ends the process with os._exit (no cleanup, as a kill) right after the checkpoint
of step N is in place; N:partial ends it halfway through writing that checkpoint. Only tests set it.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from ..checkpoints import load_pipeline, load_state_dict, read_json, save_pipeline, save_state_dict, write_json
from ..device import check_device
from ..diffusion import Denoiser, training_losses
from ..random import randint, randn
from ..stage import PipelineParts
from .config import TrainConfig
from .ema import EMA
from .state import load_training_state, rng_state, save_training_state, set_rng_state
from .trainer_utils import (CHECKPOINT_NAME, DiffusionModel, TrainableParams, derived_seed, die_hook, epoch_order,
                            list_checkpoints, lr_lambda)

# changing these between a checkpoint and its resume would load weights into a different model
STRUCTURAL = ("base_model", "mode", "train_text_encoder", "lora_rank", "lora_alpha")

class Trainer:
    def __init__(self, config: TrainConfig, resume: Optional[Union[str, os.PathLike]] = None):
        config.validate()
        self.config, self.resume = config, resume
        self.output = Path(config.output_dir)
        self.checkpoints = self.output / "checkpoints"
        self.acc = None

    # ---- everything that can be wrong is found before the first step ------------------------------------------
    def _resume_dir(self) -> Optional[Path]:
        existing = list_checkpoints(self.checkpoints)
        if self.resume is None:
            if existing:
                raise ValueError(f"output_dir {str(self.output)!r} already holds checkpoints (step-{existing[-1][0]});"
                                 " pass resume='latest' (--resume latest) to continue, or choose a new output_dir")
            return None
        path = existing[-1][1] if self.resume == "latest" and existing else None
        if self.resume != "latest":
            path = Path(self.resume)
            if not (path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name) and (path / "state.pt").is_file()):
                raise ValueError(f"resume must be 'latest' or a checkpoint folder step-N with a state.pt; got "
                                 f"{str(self.resume)!r}")
        if path is not None:
            saved = read_json(path / "config.json")
            for name in STRUCTURAL + ("ema_decay",):
                was, now = saved.get(name), getattr(self.config, name)
                if (was != now) if name != "ema_decay" else ((was is None) != (now is None)):
                    raise ValueError(f"{name} is {now!r} but the checkpoint {path} was trained with {was!r}")
        return path

    def _check_model(self, parts) -> None:
        c, f = self.config, parts.vae.downsample_factor
        if c.resolution % f:
            raise ValueError(f"resolution must be a multiple of the autoencoder's downsampling factor {f}; "
                             f"got {c.resolution}")
        if c.loss == "hybrid" and parts.diffusion.variance_type not in ("learned", "learned_range"):
            raise ValueError(f"loss 'hybrid' needs a model with a learned variance; {c.base_model or 'the default'} "
                             f"has variance_type {parts.diffusion.variance_type!r} (use loss 'simple')")
        if c.sample_every and c.sample_steps > parts.diffusion.num_timesteps:
            raise ValueError(f"sample_steps must be at most {parts.diffusion.num_timesteps}; got {c.sample_steps}")

    def _setup(self):
        """Load, check and build everything; the output folder is created only once all checks have passed."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        from ..data.folder import CaptionedImageFolder, cache_latents_and_text

        c = self.config
        resume = self._resume_dir()
        if c.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("log 'tensorboard' needs the tensorboard package (pip install tensorboard); or use 'csv'")
        try:
            parts = load_pipeline(c.base_model)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"base_model {c.base_model!r} cannot be loaded: {err}") from err
        self._check_model(parts)
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if c.train_text_encoder else []
        if c.device is not None:
            check_device(c.device)  # a ValueError naming the device when it is not there
        # cpu=True is what makes accelerate run several CPU processes (torchrun, gloo) as one job, not as copies
        on_cpu = c.device == "cpu" or (c.device is None and not torch.cuda.is_available())
        acc = self.acc = Accelerator(gradient_accumulation_steps=c.gradient_accumulation_steps,
                                     mixed_precision=c.mixed_precision, log_with=None, kwargs_handlers=handlers,
                                     cpu=on_cpu)
        if acc.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ValueError(f"distributed_type {acc.distributed_type.name} shards weights or optimizer state, and "
                             "this trainer's checkpoints assume every process holds them whole: use DDP (MULTI_GPU)")
        if int(os.environ.get("WORLD_SIZE", "1")) != acc.num_processes:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up {acc.num_processes} "
                             "process(es): launch with accelerate launch or torchrun")
        dataset = CaptionedImageFolder(c.data_dir, c.resolution, c.crop, c.random_flip, c.caption_dropout,
                                       c.data_format, c.seed)
        self.global_batch = c.batch_size * acc.num_processes
        if len(dataset) < self.global_batch:
            raise ValueError(f"batch_size x processes = {self.global_batch} is more than the {len(dataset)} images "
                             f"in {c.data_dir}")
        acc.print(f"data: {dataset.report()}")
        set_seed(c.seed)  # the same initial LoRA weights on every rank
        self.unet, self.vae, self.text_encoder, self.diffusion = parts.unet, parts.vae, parts.text_encoder, \
            parts.diffusion
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(c.train_text_encoder)
        self.unet.requires_grad_(c.mode == "full")
        if c.mode == "lora":
            from .lora import add_lora
            add_lora(self.unet, rank=c.lora_rank, alpha=c.lora_alpha)
        self.unet.gradient_checkpointing = c.gradient_checkpointing
        device = acc.device
        frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.mixed_precision, torch.float32)
        frozen_dtype = frozen_dtype if device.type == "cuda" else torch.float32
        self.vae.to(device, frozen_dtype).eval()
        self.text_encoder.to(device, torch.float32 if c.train_text_encoder else frozen_dtype)
        self.unet.to(device)
        self.dataset = cache_latents_and_text(dataset, self.vae, self.text_encoder) if c.cache_latents else dataset
        model = DiffusionModel(self.unet, self.text_encoder, c.train_text_encoder)
        self.params = TrainableParams(model)
        self.optimizer = torch.optim.AdamW(list(self.params.named.values()), lr=c.learning_rate,
                                           weight_decay=c.weight_decay)
        # stepped by hand once per optimizer step: accelerate's wrapper steps it once per process
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(c.lr_scheduler, c.warmup_steps, c.max_steps))
        self.ema = EMA(self.params, c.ema_decay) if c.ema_decay is not None else None
        self.step, self.epoch, self.index, self.elapsed = 0, 0, 0, 0.0
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.denoiser = Denoiser(self.model, parts.diffusion.build_schedule(), parts.diffusion.prediction_type,
                                 parts.diffusion.variance_type)
        if resume is not None:
            self._load_checkpoint(resume)
        else:
            torch.manual_seed(derived_seed(c.seed, "rank", acc.process_index))  # dropout masks differ across ranks
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            for stale in self.checkpoints.glob(".*-step-*"):  # what a killed run was writing: never resumed from
                shutil.rmtree(stale, ignore_errors=True)
            write_json(c.to_dict(), self.output / "config.json")
            self._open_log()
        acc.wait_for_everyone()

    # ---- training ---------------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to max_steps (from the checkpoint if resuming) and write output_dir/final; returns its path.
        accelerate's process-wide state belongs to the run and is reset when it ends, so another Trainer (say with
        another mixed_precision) can follow in the same process."""
        try:
            self._setup()
            self._loop()
            return self._write_final()
        finally:
            if self.acc is not None:
                from accelerate.state import AcceleratorState, GradientState

                self.acc.end_training()  # destroys the process group of a distributed run
                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()
                self.acc = None

    def _loop(self) -> None:
        c = self.config
        acc, start = self.acc, time.time() - self.elapsed
        if self.resume == "latest" and not self.step:
            acc.print(f"no checkpoint in {self.checkpoints}: starting from step 0")
        elif self.step:
            acc.print(f"resumed from step {self.step} (epoch {self.epoch}, image {self.index} of the epoch)")
        batches = self._batches()
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not acc.is_main_process, desc="train")
        while self.step < c.max_steps:
            self.model.train()
            self.text_encoder.train(c.train_text_encoder)
            total, lr = torch.zeros((), device=acc.device), self.optimizer.param_groups[0]["lr"]
            for k in range(c.gradient_accumulation_steps):
                batch = next(batches)
                with acc.accumulate(self.model):
                    loss = self._loss(batch, self.step * c.gradient_accumulation_steps + k)
                    acc.backward(loss)
                    if acc.sync_gradients and c.max_grad_norm is not None:
                        acc.clip_grad_norm_(list(self.params.named.values()), c.max_grad_norm)
                    self.optimizer.step()
                    if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                total += loss.detach() / c.gradient_accumulation_steps
            if self.ema is not None:
                self.ema.update(self.params)
            self.step += 1
            mean_loss = acc.gather(total[None]).mean().item()
            self.elapsed = time.time() - start
            self._log(mean_loss, lr)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if c.sample_every and self.step % c.sample_every == 0:
                self._sample()
            if self.step % c.checkpoint_every == 0 or self.step == c.max_steps:
                self._save_checkpoint()
        bar.close()

    def _batches(self):
        """This rank's micro-batches from the saved data position on; self.epoch/index follow what was consumed."""
        c, n, b, rank = self.config, len(self.dataset), self.config.batch_size, self.acc.process_index
        while True:
            if self.index + self.global_batch > n:
                self.epoch, self.index = self.epoch + 1, 0
            self.dataset.set_epoch(self.epoch)
            order = epoch_order(c.seed, self.epoch, n)
            starts = range(self.index, n - self.global_batch + 1, self.global_batch)
            sampler = [order[s + rank * b:s + (rank + 1) * b] for s in starts]
            loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=c.num_workers,
                                collate_fn=default_collate)
            for s, batch in zip(starts, loader):
                self.index = s + self.global_batch
                yield batch

    def _loss(self, batch: dict, micro: int) -> torch.Tensor:
        c, device = self.config, self.acc.device
        first = self.acc.process_index * c.batch_size
        # CPU generators on every device: the same seed draws the same noise and timesteps on a GPU
        gens = [torch.Generator().manual_seed(derived_seed(c.seed, "sample", micro, first + i))
                for i in range(c.batch_size)]
        if "latents" in batch:
            x0 = batch["latents"].to(device)
            cond = {"context": batch["text_embeddings"].to(device), "context_mask": batch["text_mask"].to(device)}
        else:
            with torch.no_grad():
                pixels = batch["pixel_values"].to(device, next(self.vae.parameters()).dtype)
                x0 = self.vae.encode(pixels, generator=gens).float()
            cond = {"captions": list(batch["caption"])}
        noise = randn(x0.shape, gens, x0.dtype, device)
        t = randint(self.denoiser.schedule.num_timesteps, (len(gens),), gens, device)
        losses = training_losses(self.denoiser, x0, t, noise, loss_type=c.loss, snr_gamma=c.snr_gamma, **cond)
        return losses["loss"].mean()

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        acc, step = self.acc, self.step
        final, tmp = self.checkpoints / f"step-{step}", self.checkpoints / f".tmp-step-{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"global": rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        save_training_state(rng, tmp / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            save_state_dict(self.params.state_dict(), tmp / "trainable.safetensors")
            if self.ema is not None:
                save_state_dict(self.ema.shadow, tmp / "ema.safetensors")
            die_hook(f"{step}:partial")
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            state = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                     "scaler": scaler, "step": step, "epoch": self.epoch, "index": self.index, "elapsed": self.elapsed,
                     "ema_num_updates": self.ema.num_updates if self.ema else 0, "num_processes": acc.num_processes}
            save_training_state(state, tmp / "state.pt")
            write_json(self.config.to_dict(), tmp / "config.json")
        acc.wait_for_everyone()
        if acc.is_main_process:
            old = self.checkpoints / f".old-step-{step}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            limit = self.config.checkpoints_total_limit
            for _, path in (list_checkpoints(self.checkpoints)[:-limit] if limit else []):
                shutil.rmtree(path)
        acc.wait_for_everyone()
        die_hook(f"{step}")

    def _load_checkpoint(self, folder: Path) -> None:
        acc = self.acc
        self.params.load_state_dict(load_state_dict(folder / "trainable.safetensors"))
        state = load_training_state(folder / "state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if acc.scaler is not None and state["scaler"] is not None:
            acc.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict({"decay": self.config.ema_decay, "num_updates": state["ema_num_updates"],
                                      "shadow": load_state_dict(folder / "ema.safetensors")})
        self.step, self.epoch, self.index, self.elapsed = state["step"], state["epoch"], state["index"], \
            state["elapsed"]
        rng_file = folder / f"rng-{acc.process_index}.pt"
        if rng_file.is_file():  # last, after everything that draws from the global RNGs was built
            rng = load_training_state(rng_file)
            set_rng_state(rng["global"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            acc.print(f"{folder} was written by {state['num_processes']} processes: rank {acc.process_index} reseeds")
            torch.manual_seed(derived_seed(self.config.seed, "rank", acc.process_index, self.step))

    # ---- outputs ----------------------------------------------------------------------------------------------
    @contextmanager
    def _ema_weights(self):
        """The EMA weights in the trainable parameters for the duration (nothing changes without EMA)."""
        if self.ema is None:
            yield
            return
        backup = {k: v.clone() for k, v in self.params.state_dict().items()}
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.params.load_state_dict(backup)

    def _open_log(self) -> None:
        path = self.output / "log.csv"
        if self.config.log == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=self.step + 1)
            return
        rows = list(csv.reader(open(path, newline=""))) if path.is_file() else []
        rows = [r for r in rows[1:] if r and int(r[0]) <= self.step]  # drop steps a killed run did not checkpoint
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["step", "loss", "lr", "seconds"]] + rows)

    def _log(self, loss: float, lr: float) -> None:
        if not self.acc.is_main_process:
            return
        if self.config.log == "tensorboard":
            self.writer.add_scalar("loss", loss, self.step)
            self.writer.add_scalar("lr", lr, self.step)
            return
        with open(self.output / "log.csv", "a", newline="") as f:
            csv.writer(f).writerow([self.step, f"{loss:.6f}", f"{lr:.6g}", f"{self.elapsed:.1f}"])

    def _sample(self) -> None:
        """A row of images, one per sample prompt, with a fixed seed (EMA weights if enabled)."""
        from PIL import Image

        from pipelines import TextToImagePipeline

        if self.acc.is_main_process:
            c = self.config
            pipe = TextToImagePipeline(self.unet, self.vae, self.text_encoder, self.diffusion)
            pipe.progress = False
            self.unet.eval()
            self.text_encoder.eval()
            with self._ema_weights(), self.acc.autocast():
                images = pipe(list(c.sample_prompts), num_inference_steps=c.sample_steps,
                              guidance_scale=c.sample_guidance, seed=0, height=c.resolution, width=c.resolution,
                              output_type="np").images
            self.unet.train()
            path = self.output / "samples" / f"step-{self.step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)).save(path)
        self.acc.wait_for_everyone()

    def _write_final(self) -> Path:
        """mode full: a pipeline folder (EMA weights if enabled); mode lora: lora.safetensors (+ lora_ema)."""
        final = self.output / "final"
        if self.acc.is_main_process:
            info = {"step": str(self.step), "base_model": str(self.config.base_model)}
            if self.config.mode == "full":
                with self._ema_weights():
                    save_pipeline(PipelineParts.single(self.unet, self.vae.float(), self.text_encoder.float(),
                                                      self.diffusion), final)
            else:
                from .lora import save_lora
                tmp = self.output / ".tmp-final"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                save_lora(self.unet, tmp / "lora.safetensors", metadata=info)
                if self.ema is not None:
                    with self._ema_weights():
                        save_lora(self.unet, tmp / "lora_ema.safetensors", metadata={**info, "ema": "true"})
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            write_json(self.config.to_dict(), final / "train_config.json")
            if self.config.log == "tensorboard":
                self.writer.close()
        self.acc.wait_for_everyone()
        return final

