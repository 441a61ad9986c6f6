"""Captioned image folders (HF ImageFolder metadata.jsonl, metadata.csv, or img.png + img.txt sidecars) and a
cache of their frozen-encoder outputs (VAE posterior moments, text embeddings) so training skips both encoders.

All randomness of an item (crop offset, flip, caption dropout, latent noise) is drawn from a numpy Generator
seeded by (seed, epoch, index, stream): an item depends on nothing else, so a resumed run or any worker layout
sees the same data. The dropout stream is shared by both datasets, so a cached item drops its caption exactly
when the image item at the same (seed, epoch, index) does.
"""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import is_int, is_number
from ..files import atomic_path
from .images import to_model_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FORMATS = ("auto", "jsonl", "csv", "sidecar")
CROPS = ("center", "random")
CROP_STREAM, FLIP_STREAM, DROPOUT_STREAM, NOISE_STREAM = 0, 1, 2, 3
CACHE_METADATA_KEY = "ldm_latent_cache"


def item_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """The generator of one random decision of one item: a pure function of (seed, epoch, index, stream)."""
    return np.random.default_rng([seed, epoch, index, stream])


def drops_caption(seed: int, epoch: int, index: int, p: float) -> bool:
    """Caption dropout for classifier-free guidance (Ho & Salimans 2022, sec. 3.2): True with probability p."""
    return p > 0 and item_rng(seed, epoch, index, DROPOUT_STREAM).random() < p


def _check_seed(name: str, value: Any) -> int:
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _wrap_index(i: int, n: int) -> int:
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} items")
    return int(i) % n


def _check_probability(name: str, value: Any) -> float:
    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def load_rgb(path: str | Path) -> Image.Image:
    """Fully decoded RGB image: EXIF orientation applied, transparency (alpha, palette) composited over white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
    if im.mode == "P" or im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _image_problem(path: Path) -> Optional[str]:
    """Why the file cannot be used (None when it can): verify() checks structure, a full load catches truncation."""
    if not path.is_file():
        return "missing file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "not an image file"
    try:
        with Image.open(path) as im:
            im.verify()
        load_rgb(path)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... on bad files
        return "corrupt image"
    return None


class CaptionedImageFolder(torch.utils.data.Dataset):
    """Images with captions under `root`, as [-1, 1] tensors resized (shorter side) and cropped to `resolution`.

    Unusable entries are skipped at construction and listed in `skipped` (reason -> entries); `report()` is the
    line a trainer prints. Items are dicts {"pixel_values" [3, R, R] float32, "caption" ("" when dropped), "index"}.
    """

    def __init__(self, root: str | Path, resolution: int = 64, crop: str = "center", random_flip: bool = False,
                 caption_dropout: float = 0.0, format: str = "auto", seed: int = 0):
        if not is_int(resolution) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if not isinstance(random_flip, bool):
            raise ValueError(f"random_flip must be a bool, got {random_flip!r}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root must be an existing directory, got {str(root)!r}")
        self.resolution, self.crop, self.random_flip = int(resolution), crop, random_flip
        self.caption_dropout = _check_probability("caption_dropout", caption_dropout)
        self.seed, self.epoch = _check_seed("seed", seed), 0
        if format == "auto":
            format = ("jsonl" if (self.root / "metadata.jsonl").is_file()
                      else "csv" if (self.root / "metadata.csv").is_file() else "sidecar")
        self.format = format
        self.skipped: dict[str, list[str]] = {}  # reason -> entries, in file order
        candidates = {"jsonl": self._read_jsonl, "csv": self._read_csv, "sidecar": self._read_sidecar}[format]()
        self._files, self._captions, seen = [], [], set()
        for entry, path, caption in candidates:
            caption, key = caption.strip(), path.resolve()
            problem = (_image_problem(path) or ("duplicate entry" if key in seen else None)
                       or (None if caption else "missing caption"))
            if problem:
                self._skip(problem, entry)
                continue
            seen.add(key)
            self._files.append(path)
            self._captions.append(caption)
        if not self._files:
            counts = ", ".join(f"{len(v)} {k}" for k, v in self.skipped.items()) or "no candidate entries"
            raise ValueError(f"no usable images in {str(self.root)!r} (format {self.format!r}): {counts}")

    # -- the three layouts: generators of (entry for the report, image path, caption) --------------------------

    def _skip(self, reason: str, entry: str) -> None:
        self.skipped.setdefault(reason, []).append(entry)

    def _listed(self, file_name: Any, text: Any, entry: str):
        """A metadata row -> (entry, path, caption), or None after recording why it is unusable."""
        if not isinstance(file_name, str) or not file_name.strip():
            self._skip("malformed line", entry)
            return None
        path = self.root / file_name.strip()
        if not path.resolve().is_relative_to(self.root.resolve()):
            self._skip("outside root", file_name)
            return None
        return file_name, path, text if isinstance(text, str) else ""

    def _read_jsonl(self):
        meta = self.root / "metadata.jsonl"
        for n, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None  # reported below, with the other malformed lines
            if not isinstance(obj, dict):
                self._skip("malformed line", f"{meta.name}:{n}")
                continue
            row = self._listed(obj.get("file_name"), obj.get("text"), f"{meta.name}:{n}")
            if row:
                yield row

    def _read_csv(self):
        meta = self.root / "metadata.csv"
        with open(meta, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file_name", "text"} <= set(reader.fieldnames):
                raise ValueError(f"{meta} must have a header with columns file_name,text, got {reader.fieldnames}")
            for record in reader:
                row = self._listed(record.get("file_name"), record.get("text"), f"{meta.name}:{reader.line_num}")
                if row:
                    yield row

    def _read_sidecar(self):
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            entry, text_file = path.relative_to(self.root).as_posix(), path.with_suffix(".txt")
            try:
                caption = text_file.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError):
                caption = ""  # no (readable) caption file: reported as a missing caption
            yield entry, path, caption

    # -- public interface --------------------------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    @property
    def captions(self) -> list[str]:
        return list(self._captions)

    def report(self) -> str:
        """'N images, skipped M: 2 corrupt image (a.png, b.png), ...' (at most 5 names a reason)."""
        total = sum(len(v) for v in self.skipped.values())
        parts = []
        for reason, entries in self.skipped.items():
            names = ", ".join(entries[:5]) + (f", ... {len(entries) - 5} more" if len(entries) > 5 else "")
            parts.append(f"{len(entries)} {reason} ({names})")
        return f"{len(self)} images, skipped {total}" + (": " + ", ".join(parts) if parts else "")

    def set_epoch(self, epoch: int) -> None:
        """Epoch whose crops, flips and dropouts items draw. DataLoader workers copy the dataset when they start:
        call it before iterating the epoch (with persistent_workers the workers would keep the old epoch)."""
        self.epoch = _check_seed("epoch", epoch)

    def __len__(self) -> int:
        return len(self._files)

    def pixel_values(self, i: int, epoch: int) -> torch.Tensor:
        """Image i as [3, R, R] in [-1, 1]: shorter side resized to R (bicubic, antialiased), cropped, maybe flipped."""
        img, r = load_rgb(self._files[i]), self.resolution
        w, h = img.size
        scale = r / min(w, h)
        size = (max(r, round(w * scale)), max(r, round(h * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        if self.crop == "center":
            left, top = (size[0] - r) // 2, (size[1] - r) // 2
        else:
            rng = item_rng(self.seed, epoch, i, CROP_STREAM)
            left, top = int(rng.integers(0, size[0] - r + 1)), int(rng.integers(0, size[1] - r + 1))
        img = img.crop((left, top, left + r, top + r))
        if self.random_flip and item_rng(self.seed, epoch, i, FLIP_STREAM).random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_model_range(np.asarray(img))

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _wrap_index(i, len(self))
        dropped = drops_caption(self.seed, self.epoch, i, self.caption_dropout)
        return {"pixel_values": self.pixel_values(i, self.epoch), "caption": "" if dropped else self._captions[i],
                "index": i}


class CachedLatentDataset(torch.utils.data.Dataset):
    """Cached encoder outputs: latents z = mean + std * noise (scaled like Autoencoder.encode) and the per-caption
    text embeddings; row 0 of the text table is the unconditional caption "".

    latent_mean / latent_std [N, C, h, w]; text_embeddings [T, L, D], text_mask [T, L], text_pooled [T, D] or
    None; caption_ids [N] (row of each image's caption); captions: the T strings of the table; files: the image
    of each row; info: provenance saved with the file (root, resolution, vae kind, scaling/shift factor).
    """

    def __init__(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, text_embeddings: torch.Tensor,
                 text_mask: torch.Tensor, caption_ids: torch.Tensor, captions: list[str],
                 text_pooled: Optional[torch.Tensor] = None, caption_dropout: float = 0.0, seed: int = 0,
                 files: Optional[list[str]] = None, info: Optional[dict[str, Any]] = None):
        n, t = latent_mean.shape[0], text_embeddings.shape[0]
        shapes = {k: tuple(v.shape) for k, v in [("latent_mean", latent_mean), ("latent_std", latent_std),
                  ("text_embeddings", text_embeddings), ("text_mask", text_mask), ("caption_ids", caption_ids)]}
        if (latent_mean.ndim != 4 or latent_std.shape != latent_mean.shape or text_embeddings.ndim != 3
                or text_mask.shape != text_embeddings.shape[:2] or caption_ids.shape != (n,)):
            raise ValueError(f"expected latents [N, C, h, w], text_embeddings [T, L, D], text_mask [T, L], "
                             f"caption_ids [N], got {shapes}")
        if len(captions) != t or captions[:1] != [""] or (n and not 0 <= caption_ids.min() <= caption_ids.max() < t):
            raise ValueError(f"captions must be the {t} text-table strings, '' first, and caption_ids rows of it")
        self.latent_mean, self.latent_std = latent_mean.float(), latent_std.float()
        self.text_embeddings, self.text_mask = text_embeddings.float(), text_mask.bool()
        self.text_pooled = None if text_pooled is None else text_pooled.float()
        self.caption_ids, self.captions = caption_ids.long(), list(captions)
        self.caption_dropout = _check_probability("caption_dropout", caption_dropout)
        self.seed, self.epoch = _check_seed("seed", seed), 0
        self.files, self.info = list(files or []), dict(info or {})

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_seed("epoch", epoch)

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _wrap_index(i, len(self))
        noise = item_rng(self.seed, self.epoch, i, NOISE_STREAM).standard_normal(self.latent_mean.shape[1:])
        latents = self.latent_mean[i] + self.latent_std[i] * torch.from_numpy(noise.astype(np.float32))
        row = 0 if drops_caption(self.seed, self.epoch, i, self.caption_dropout) else int(self.caption_ids[i])
        item = {"latents": latents, "text_embeddings": self.text_embeddings[row].clone(),
                "text_mask": self.text_mask[row].clone(), "index": i}
        if self.text_pooled is not None:
            item["text_pooled"] = self.text_pooled[row].clone()
        return item

    def save(self, path: str | Path) -> None:
        """safetensors file (tensors + a JSON metadata string), written to a temp file then renamed: atomic."""
        path = Path(path)
        names = ("latent_mean", "latent_std", "caption_ids", "text_embeddings", "text_mask", "text_pooled")
        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in names if getattr(self, k) is not None}
        meta = {"captions": self.captions, "caption_dropout": self.caption_dropout, "seed": self.seed,
                "files": self.files, "info": self.info}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={CACHE_METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "CachedLatentDataset":
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(CACHE_METADATA_KEY)
            if raw is None:
                raise ValueError(f"{path} is not a latent cache: no {CACHE_METADATA_KEY!r} metadata")
            t = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(raw)
        return cls(t["latent_mean"], t["latent_std"], t["text_embeddings"], t["text_mask"], t["caption_ids"],
                   meta["captions"], t.get("text_pooled"), meta["caption_dropout"], meta["seed"], meta["files"],
                   meta["info"])


@contextlib.contextmanager
def _eval_mode(*modules: Any):
    """Encoders in eval mode (no dropout) for the duration, then back to the caller's mode."""
    modes = [(m, m.training) for m in modules if isinstance(m, torch.nn.Module)]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


@torch.no_grad()
def encode_caption_table(text_encoder, captions, batch_size: int = 16):
    """Every distinct caption encoded once: (table, embeddings [N, L, D], mask [N, L], pooled [N, D] or None) on
    the CPU in float32, table[0] = "" (the unconditional caption), the rest sorted. A chunked encoder's L may
    differ between batches: shorter ones are padded (masked out)."""
    table = [""] + sorted(set(captions) - {""})
    with _eval_mode(text_encoder):
        encodings = [text_encoder.encode(table[k:k + batch_size]) for k in range(0, len(table), batch_size)]
    length = max(e.mask.shape[1] for e in encodings)
    pad = torch.nn.functional.pad
    emb = torch.cat([pad(e.embeddings.float().cpu(), (0, 0, 0, length - e.mask.shape[1])) for e in encodings])
    mask = torch.cat([pad(e.mask.bool().cpu(), (0, length - e.mask.shape[1]), value=False) for e in encodings])
    pooled = (None if any(e.pooled is None for e in encodings)
              else torch.cat([e.pooled.float().cpu() for e in encodings]))
    return table, emb, mask, pooled


@torch.no_grad()
def encode_latents(dataset, vae, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of `dataset` (anything with len() and pixel_values(i, epoch) in [-1, 1]: a CaptionedImageFolder,
    a ShapesDataset) encoded once by the frozen autoencoder, epoch 0's view: (mean, std) [N, C, h, w] on the CPU in
    float32, mapped like Autoencoder.encode. KL: mean' = s * (mean - shift), std' = s * std, so mean' + std' * eps
    is a posterior sample of z and mean' is encode(x, sample=False); VQ: mean' = encode(x), std' = 0."""
    if not is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    config, device = vae.config, next(vae.parameters()).device
    shift = config.shift_factor if config.shift_factor is not None else 0.0
    means, stds = [], []
    with _eval_mode(vae):
        for start in range(0, len(dataset), batch_size):
            x = torch.stack([dataset.pixel_values(i, 0) for i in range(start, min(start + batch_size, len(dataset)))])
            x = x.to(device)
            if config.kind == "kl":
                q = vae.posterior(x)
                mean, std = config.scaling_factor * (q.mean - shift), config.scaling_factor * q.std
            else:
                mean = vae.encode(x)
                std = torch.zeros_like(mean)
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def cache_latents_and_text(dataset: CaptionedImageFolder, vae, text_encoder, batch_size: int = 16,
                           path: str | Path | None = None) -> CachedLatentDataset:
    """Encode every image once with the frozen VAE (encode_latents) and every distinct caption (plus "") once with
    the text encoder (encode_caption_table). Saved to `path` when given."""
    if dataset.crop != "center" or dataset.random_flip:
        raise ValueError("cache_latents_and_text needs crop='center' and random_flip=False: the cache stores one "
                         f"view per image, got crop={dataset.crop!r}, random_flip={dataset.random_flip}")
    if not is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    mean, std = encode_latents(dataset, vae, batch_size)
    table, emb, mask, pooled = encode_caption_table(text_encoder, dataset.captions, batch_size)
    row_of = {c: k for k, c in enumerate(table)}
    config = vae.config
    info = {"root": str(dataset.root), "format": dataset.format, "resolution": dataset.resolution,
            "vae_kind": config.kind, "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor}
    cache = CachedLatentDataset(mean, std, emb, mask,
                                torch.tensor([row_of[c] for c in dataset.captions], dtype=torch.long), table,
                                pooled, dataset.caption_dropout, dataset.seed,
                                [p.relative_to(dataset.root).as_posix() for p in dataset.files], info)
    if path is not None:
        cache.save(path)
    return cache
