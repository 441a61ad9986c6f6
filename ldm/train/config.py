"""The fine-tuning run, as one frozen dataclass: what `ldm train` flags and `--config file.json` fill in, and what a
checkpoint's config.json records. Checks that need no model live here; those that need the model (latent factor,
learned variance, loadable base) run in the Trainer before its first step."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from ..config import JsonConfig, is_int, is_number

MODES = ("full", "lora")
LOSSES = ("simple", "hybrid", "vlb")
LR_SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = (None, "cpu", "cuda", "mps")
CROPS = ("center", "random")
DATA_FORMATS = ("auto", "jsonl", "csv", "sidecar")
LOGGERS = ("csv", "tensorboard")


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """A fine-tuning run. batch_size is per process (the global batch is batch_size x processes); one step is one
    optimizer update over gradient_accumulation_steps micro-batches. None for base_model means the shipped default;
    None for lora_alpha means alpha = rank; None for ema_decay / snr_gamma / max_grad_norm / checkpoints_total_limit
    turns that feature off (keep every checkpoint for the last)."""

    data_dir: str
    output_dir: str
    base_model: Optional[str] = None
    data_format: str = "auto"
    resolution: int = 64
    crop: str = "center"
    random_flip: bool = False
    caption_dropout: float = 0.1
    cache_latents: bool = False
    mode: str = "full"
    train_text_encoder: bool = False
    lora_rank: int = 4
    lora_alpha: Optional[float] = None
    loss: str = "simple"
    snr_gamma: Optional[float] = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 1000
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    ema_decay: Optional[float] = None
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: Optional[int] = 2
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_guidance: float = 3.0
    log: str = "csv"
    weight_decay: float = 1e-2
    num_workers: int = 0
    device: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.sample_prompts, list):
            object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        self.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        missing = [f.name for f in fields(cls) if f.name in ("data_dir", "output_dir") and f.name not in d]
        if missing:
            raise ValueError(f"{', '.join(missing)} is required (the image folder and where the run writes)")
        return super().from_dict(d)

    def validate(self) -> None:
        """ValueError naming the first bad field and what it allows."""
        for name in ("data_dir", "output_dir"):
            value = getattr(self, name)
            self._require(name, isinstance(value, str) and value.strip(), "a non-empty path")
        self._require("base_model", self.base_model is None or (isinstance(self.base_model, str) and self.base_model),
               "None (the shipped default) or a non-empty path or model name")
        for name, allowed in (("data_format", DATA_FORMATS), ("crop", CROPS), ("mode", MODES), ("loss", LOSSES),
                              ("lr_scheduler", LR_SCHEDULERS), ("mixed_precision", MIXED_PRECISION),
                              ("log", LOGGERS)):
            self._require(name, getattr(self, name) in allowed, f"one of {', '.join(allowed)}")
        for name in ("random_flip", "cache_latents", "train_text_encoder", "gradient_checkpointing"):
            self._require(name, isinstance(getattr(self, name), bool), "true or false")
        for name in ("resolution", "lora_rank", "max_steps", "batch_size", "gradient_accumulation_steps",
                     "checkpoint_every", "sample_steps"):
            self._require(name, is_int(getattr(self, name)) and getattr(self, name) > 0, "a positive integer")
        for name in ("warmup_steps", "seed", "sample_every", "num_workers"):
            self._require(name, is_int(getattr(self, name)) and getattr(self, name) >= 0, "an integer >= 0")
        self._require("checkpoints_total_limit", self.checkpoints_total_limit is None or
               (is_int(self.checkpoints_total_limit) and self.checkpoints_total_limit > 0),
               "None (keep all) or a positive integer")
        self._require("caption_dropout", is_number(self.caption_dropout) and 0 <= self.caption_dropout <= 1,
                      "a number in [0, 1]")
        self._require("learning_rate", is_number(self.learning_rate) and self.learning_rate > 0, "a number > 0")
        self._require("weight_decay", is_number(self.weight_decay) and self.weight_decay >= 0, "a number >= 0")
        self._require("sample_guidance", is_number(self.sample_guidance) and self.sample_guidance >= 0, "a number >= 0")
        for name in ("lora_alpha", "snr_gamma", "max_grad_norm"):
            value = getattr(self, name)
            self._require(name, value is None or (is_number(value) and value > 0), "None or a number > 0")
        self._require("ema_decay", self.ema_decay is None or (is_number(self.ema_decay) and 0 < self.ema_decay < 1),
               "None (no EMA) or a number in (0, 1)")
        self._require("sample_prompts", isinstance(self.sample_prompts, tuple) and
               all(isinstance(p, str) and p.strip() for p in self.sample_prompts), "a list of non-empty strings")
        self._require("sample_prompts", not self.sample_every or self.sample_prompts,
               f"at least one prompt when sample_every > 0 (sample_every={self.sample_every})")
        self._require("train_text_encoder", not (self.train_text_encoder and self.mode == "lora"),
               "false in mode 'lora' (LoRA adapts the U-Net only; use mode 'full' to train the text encoder)")
        self._require("cache_latents", not (self.cache_latents and self.train_text_encoder),
               "false with train_text_encoder (the cache freezes the text embeddings)")
        self._require("cache_latents", not (self.cache_latents and (self.crop != "center" or self.random_flip)),
               "false with crop 'random' or random_flip (the cache holds one view per image)")
        self._require("warmup_steps", self.warmup_steps <= self.max_steps, f"at most max_steps ({self.max_steps})")
        self._require("device", self.device in DEVICES, "None (a CUDA GPU if there is one, else the CPU), 'cpu', "
                      "'cuda' or 'mps'")

    def _require(self, name: str, ok: Any, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {allowed}; got {getattr(self, name)!r}")

