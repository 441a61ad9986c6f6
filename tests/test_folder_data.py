"""Captioned image folders (jsonl / csv / sidecar), their skip report, seeded items, and the latent/text cache."""
import csv
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.folder import CachedLatentDataset, CaptionedImageFolder, cache_latents_and_text, drops_caption
from ldm.nn.autoencoder import Autoencoder, AutoencoderConfig
from ldm.text.base import TextEncoding


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path, size=(24, 24), seed=0, mode="RGB"):
    """A noise image (every crop offset gives different pixels) saved at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def _jsonl(root, rows):
    (root / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


class FakeTextEncoder:
    """encode(list[str]) -> TextEncoding; a prompt's rows depend only on its text, L = 2 + most words in the batch."""

    dim = 8

    def encode(self, prompts):
        length = 2 + max(len(p.split()) for p in prompts)
        emb = torch.zeros(len(prompts), length, self.dim)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for b, p in enumerate(prompts):
            n = 2 + len(p.split())
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            emb[b, :n] = torch.randn(n, self.dim, generator=g)
            mask[b, :n] = True
        return TextEncoding(emb, mask, emb.sum(1))


def _vae(kind="kl", **kw):
    torch.manual_seed(0)
    return Autoencoder(AutoencoderConfig(kind=kind, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                                         num_groups=8, resolution=32, **kw)).eval()


def _captioned(root, n=6, size=(24, 24)):
    """n sidecar pairs img{i}.png + img{i}.txt with captions 'caption {i % 3}' (repeated captions on purpose)."""
    for i in range(n):
        _image(root / f"img{i}.png", size, seed=i)
        (root / f"img{i}.txt").write_text(f"caption {i % 3}")
    return root


def _by_name(ds):
    return {p.relative_to(ds.root).as_posix(): c for p, c in zip(ds.files, ds.captions)}


# ---------------------------------------------------------------------------------------------------- formats


def test_jsonl_pairs_files_and_captions_in_subfolders(tmp_path):
    _image(tmp_path / "a.png", seed=1)
    _image(tmp_path / "sub" / "deep" / "b.jpg", (30, 20), seed=2)
    _image(tmp_path / "c.WEBP", seed=3)
    _jsonl(tmp_path, [{"file_name": "a.png", "text": "an apple"}, {"file_name": "sub/deep/b.jpg", "text": "a bee"},
                      {"file_name": "c.WEBP", "text": "a cat", "extra": 1}])
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,WRONG\n")  # auto prefers metadata.jsonl
    ds = CaptionedImageFolder(tmp_path, resolution=16)
    assert ds.format == "jsonl" and ds.skipped == {}
    assert _by_name(ds) == {"a.png": "an apple", "sub/deep/b.jpg": "a bee", "c.WEBP": "a cat"}
    assert ds.report() == "3 images, skipped 0"
    item = ds[1]
    assert item["caption"] == "a bee" and item["index"] == 1
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0


def test_csv_with_quoted_commas_quotes_and_newlines(tmp_path):
    captions = {"a.png": 'a red, round "ball", on grass', "b.bmp": "two\nlines", "x/c.jpeg": "plain"}
    for k, name in enumerate(captions):
        _image(tmp_path / name, seed=k)
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows(captions.items())
    ds = CaptionedImageFolder(tmp_path, resolution=16, format="auto")
    assert ds.format == "csv" and _by_name(ds) == captions


def test_sidecar_is_recursive_and_case_insensitive(tmp_path):
    _image(tmp_path / "a.png", seed=1)
    (tmp_path / "a.txt").write_text("  an apple \n")
    _image(tmp_path / "nested" / "B.JPG", seed=2)
    (tmp_path / "nested" / "B.txt").write_text("a bee")
    _image(tmp_path / "nested" / "no_caption.png", seed=3)
    _image(tmp_path / "empty.png", seed=4)
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "notes.txt").write_text("not an image's caption")
    ds = CaptionedImageFolder(tmp_path, resolution=16)
    assert ds.format == "sidecar"
    assert _by_name(ds) == {"a.png": "an apple", "nested/B.JPG": "a bee"}
    assert ds.skipped == {"missing caption": ["empty.png", "nested/no_caption.png"]}


# ------------------------------------------------------------------------------------------- skipping, errors


def test_bad_entries_are_skipped_and_reported(tmp_path):
    for name in ("good1.png", "good2.jpg"):
        _image(tmp_path / name, seed=len(name))
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all")
    full = _image(tmp_path / "whole.png", (32, 32), seed=9).read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    _image(tmp_path / "nocap.png", seed=5)
    _jsonl(tmp_path, [{"file_name": "good1.png", "text": "one"}, {"file_name": "good2.jpg", "text": "two"},
                      {"file_name": "garbage.png", "text": "x"}, {"file_name": "truncated.png", "text": "x"},
                      {"file_name": "gone.png", "text": "x"}, {"file_name": "nocap.png", "text": ""},
                      {"file_name": "good1.png"}, '{"file_name": "broken.png", "text": ', "[1, 2]", "",
                      {"file_name": "../escape.png", "text": "x"}])
    ds = CaptionedImageFolder(tmp_path, resolution=16)
    assert _by_name(ds) == {"good1.png": "one", "good2.jpg": "two"}
    assert ds.skipped == {"corrupt image": ["garbage.png", "truncated.png"], "missing file": ["gone.png"],
                          "missing caption": ["nocap.png"], "duplicate entry": ["good1.png"],
                          "malformed line": ["metadata.jsonl:8", "metadata.jsonl:9"], "outside root": ["../escape.png"]}
    report = ds.report()
    assert report.startswith("2 images, skipped 8: 2 corrupt image (garbage.png, truncated.png), 1 missing file")
    assert "2 malformed line (metadata.jsonl:8, metadata.jsonl:9)" in report


def test_no_usable_entries_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "a.txt").write_text("caption")
    _image(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"no usable images in .*'sidecar'.*1 corrupt image, 1 missing caption"):
        CaptionedImageFolder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable images.*no candidate entries"):
        CaptionedImageFolder(empty, format="sidecar")
    (empty / "metadata.csv").write_text("name,caption\nx.png,y\n")
    with pytest.raises(ValueError, match="file_name,text"):
        CaptionedImageFolder(empty)


@pytest.mark.parametrize("kwargs, word", [
    ({"resolution": 0}, "resolution"), ({"resolution": 32.0}, "resolution"), ({"resolution": True}, "resolution"),
    ({"crop": "top"}, "crop"), ({"caption_dropout": 1.5}, "caption_dropout"),
    ({"caption_dropout": -0.1}, "caption_dropout"), ({"format": "parquet"}, "format"), ({"seed": -1}, "seed"),
    ({"random_flip": "yes"}, "random_flip"), ({"root": "does/not/exist"}, "root"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, word):
    _captioned(tmp_path, n=1)
    with pytest.raises(ValueError, match=word):
        CaptionedImageFolder(**{"root": tmp_path, **kwargs})


# --------------------------------------------------------------------------------------- images and randomness


def test_items_are_a_function_of_seed_epoch_index(tmp_path):
    _captioned(tmp_path, n=6, size=(40, 28))
    kw = dict(resolution=16, crop="random", random_flip=True, caption_dropout=0.5, seed=3)
    a, b = CaptionedImageFolder(tmp_path, **kw), CaptionedImageFolder(tmp_path, **kw)  # e.g. two workers
    first = [a[i] for i in range(6)]
    for i in reversed(range(6)):  # another call order, another object
        assert torch.equal(b[i]["pixel_values"], first[i]["pixel_values"]) and b[i]["caption"] == first[i]["caption"]
    a.set_epoch(1)
    moved = [not torch.equal(a[i]["pixel_values"], first[i]["pixel_values"]) for i in range(6)]
    assert sum(moved) >= 4
    a.set_epoch(0)
    assert all(torch.equal(a[i]["pixel_values"], first[i]["pixel_values"]) for i in range(6))
    other_seed = CaptionedImageFolder(tmp_path, **{**kw, "seed": 4})
    assert any(not torch.equal(other_seed[i]["pixel_values"], first[i]["pixel_values"]) for i in range(6))


def test_caption_dropout_rate(tmp_path):
    _captioned(tmp_path, n=8, size=(16, 16))
    ds = CaptionedImageFolder(tmp_path, resolution=8, caption_dropout=0.3)
    dropped = []
    for epoch in range(60):
        ds.set_epoch(epoch)
        dropped += [ds[i]["caption"] == "" for i in range(8)]
    assert abs(np.mean(dropped) - 0.3) < 0.07  # 480 items: 3.3 standard deviations
    rate = np.mean([drops_caption(0, e, i, 0.1) for e in range(50) for i in range(100)])
    assert abs(rate - 0.1) < 0.015
    assert all(CaptionedImageFolder(tmp_path, resolution=8, caption_dropout=1.0)[i]["caption"] == "" for i in range(8))


def test_center_crop_keeps_the_center(tmp_path):
    stripes = np.zeros((20, 40, 3), np.uint8)  # 40 wide: red | green (middle half) | blue
    stripes[:, :10] = (255, 0, 0)
    stripes[:, 10:30] = (0, 255, 0)
    stripes[:, 30:] = (0, 0, 255)
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    Image.fromarray(stripes.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")  # 40 tall, stripes stacked
    for name in ("wide", "tall"):
        (tmp_path / f"{name}.txt").write_text(name)
    exact = CaptionedImageFolder(tmp_path, resolution=20)  # no resize: the crop is exactly the green block
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 20, 20)
    assert all(torch.equal(exact[i]["pixel_values"], green) for i in range(2))
    small = CaptionedImageFolder(tmp_path, resolution=8)  # 40 x 20 -> 16 x 8, then the middle 8 columns
    for i in range(2):
        x = small[i]["pixel_values"]
        assert x.shape == (3, 8, 8) and x[1, 1:-1, 1:-1].min() > 0.95 and x[[0, 2], 1:-1, 1:-1].max() < -0.95
    shifted = CaptionedImageFolder(tmp_path, resolution=20, crop="random")
    seen_red_or_blue = False
    for epoch in range(8):
        shifted.set_epoch(epoch)
        seen_red_or_blue |= any(shifted[i]["pixel_values"][[0, 2]].max() > 0.9 for i in range(2))
    assert seen_red_or_blue


def test_transparency_and_palette_become_rgb_over_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 8:, 3] = 255  # left half transparent, right half opaque red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    _image(tmp_path / "palette.png", mode="P")
    _image(tmp_path / "gray.jpg", mode="L")
    for name in ("alpha", "palette", "gray"):
        (tmp_path / f"{name}.txt").write_text(name)
    ds = CaptionedImageFolder(tmp_path, resolution=16)
    x = ds[ds.captions.index("alpha")]["pixel_values"]
    assert torch.equal(x[:, :, :8], torch.ones(3, 16, 8))
    assert torch.equal(x[:, :, 8:], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 8))
    assert all(ds[i]["pixel_values"].shape == (3, 16, 16) for i in range(3))


# ---------------------------------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("shift", [None, 0.25])
def test_cache_moments_and_text_match_the_encoders(tmp_path, shift):
    ds = CaptionedImageFolder(_captioned(tmp_path, n=7, size=(40, 32)), resolution=32)
    vae, text = _vae(scaling_factor=0.5, shift_factor=shift).train(), FakeTextEncoder()
    cache = cache_latents_and_text(ds, vae, text, batch_size=3)
    assert vae.training  # encoded in eval mode, the caller's mode restored
    vae.eval()
    assert len(cache) == 7 and cache.captions == ["", "caption 0", "caption 1", "caption 2"]
    with torch.no_grad():
        x = torch.stack([ds[i]["pixel_values"] for i in range(7)])
        q = vae.posterior(x)
    torch.testing.assert_close(cache.latent_mean, 0.5 * (q.mean - (shift or 0.0)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.latent_std, 0.5 * q.std, atol=1e-5, rtol=1e-5)
    for i in range(7):
        item, ref = cache[i], text.encode([ds.captions[i]])
        n = ref.mask.shape[1]  # the table is padded to the longest batch: extra rows are zero and masked out
        assert item["text_embeddings"].shape == (cache.text_embeddings.shape[1], 8)
        assert torch.equal(item["text_embeddings"][:n], ref.embeddings[0]) and not item["text_mask"][n:].any()
        assert torch.equal(item["text_mask"][:n], ref.mask[0]) and torch.equal(item["text_pooled"], ref.pooled[0])
        assert item["latents"].shape == (4, 16, 16) and item["index"] == i
    # latents are posterior samples of z: their spread over epochs is the cached std
    samples = []
    for epoch in range(200):
        cache.set_epoch(epoch)
        samples.append(cache[0]["latents"])
    z = torch.stack(samples)
    assert ((z.std(0) / cache.latent_std[0]).mean() - 1).abs() < 0.05
    assert ((z.mean(0) - cache.latent_mean[0]).abs() / cache.latent_std[0]).mean() < 0.15


def test_cache_file_round_trip_and_deterministic_noise(tmp_path):
    ds = CaptionedImageFolder(_captioned(tmp_path / "data", n=6, size=(32, 32)), resolution=32, caption_dropout=0.5,
                              seed=7)
    path = tmp_path / "out" / "cache.safetensors"
    cache = cache_latents_and_text(ds, _vae(), FakeTextEncoder(), batch_size=4, path=path)
    assert [p.name for p in path.parent.iterdir()] == ["cache.safetensors"]  # no temp file left behind
    loaded = CachedLatentDataset.load(path)
    for name in ("latent_mean", "latent_std", "text_embeddings", "text_mask", "caption_ids", "text_pooled"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name)), name
    assert loaded.captions == cache.captions and loaded.files == [f"img{i}.png" for i in range(6)]
    assert (loaded.seed, loaded.caption_dropout) == (7, 0.5) and loaded.info == cache.info
    assert loaded.info["vae_kind"] == "kl" and loaded.info["resolution"] == 32
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        cache.set_epoch(epoch)
        loaded.set_epoch(epoch)
        for i in range(6):
            a, b = cache[i], loaded[i]
            assert all(torch.equal(a[k], b[k]) for k in ("latents", "text_embeddings", "text_mask"))
            dropped = ds[i]["caption"] == ""  # the cache drops captions exactly when the image dataset does
            assert torch.equal(a["text_embeddings"], cache.text_embeddings[0 if dropped else cache.caption_ids[i]])
    cache.set_epoch(0)
    e0 = cache[2]["latents"]
    cache.set_epoch(1)
    assert not torch.equal(cache[2]["latents"], e0)
    cache.set_epoch(0)
    assert torch.equal(cache[2]["latents"], e0)


def test_vq_cache_stores_the_encoding_with_zero_std(tmp_path):
    ds = CaptionedImageFolder(_captioned(tmp_path, n=3, size=(32, 32)), resolution=32)
    vae = _vae("vq", n_embed=16, scaling_factor=1.0)
    cache = cache_latents_and_text(ds, vae, FakeTextEncoder())
    with torch.no_grad():
        z = vae.encode(torch.stack([ds[i]["pixel_values"] for i in range(3)]))
    torch.testing.assert_close(cache.latent_mean, z, atol=1e-5, rtol=1e-5)
    assert not cache.latent_std.any() and torch.equal(cache[1]["latents"], cache.latent_mean[1])


@pytest.mark.parametrize("kwargs", [{"crop": "random"}, {"random_flip": True}])
def test_cache_refuses_random_views(tmp_path, kwargs):
    ds = CaptionedImageFolder(_captioned(tmp_path, n=2), resolution=16, **kwargs)
    with pytest.raises(ValueError, match="one view per image"):
        cache_latents_and_text(ds, _vae(), FakeTextEncoder())


def test_the_caption_table_leaves_a_text_encoder_in_eval_mode():
    """Encoders start in eval mode, so the cache's save-and-restore of the mode never turns dropout on: before,
    a MiniLM came out of encode_caption_table in training mode and encoded the same prompt differently."""
    from ldm.data.folder import encode_caption_table
    from ldm.text import HFTextEncoder
    text = HFTextEncoder.minilm(max_length=16)  # BERT with dropout 0.1
    assert not text.training and not text.model.training
    table, emb, mask, pooled = encode_caption_table(text, ["b red circle", "a blue square", "b red circle"], 2)
    assert table == ["", "a blue square", "b red circle"] and emb.shape[:2] == mask.shape == (3, 16)
    assert not text.training and not text.model.training
    with torch.no_grad():
        again = text.encode(table)
    assert torch.equal(again.embeddings, emb) and torch.equal(again.pooled, pooled)
