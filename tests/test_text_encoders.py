"""Text encoders: offline CLIP tokenizer vs open_clip, diffusers' CLIP recipe, OpenCLIP <-> HF key maps, T5, MiniLM."""
import dataclasses
import io
import json
import warnings

import open_clip
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import ByT5Tokenizer, CLIPTextModel, CLIPTokenizer

from ldm.text import (BertTextEncoder, CLIPEncoderConfig, CLIPTextEncoder, HFTextEncoder, OpenCLIPEncoderConfig,
                      OpenCLIPTextEncoder, T5EncoderConfig, T5TextEncoder, TextEncoding, hf_to_openclip_text,
                      hf_to_sd1_text_keys, load_text_encoder, openclip_text_to_hf, sd1_text_keys_to_hf)
from ldm.text.base import CONFIG_NAME
from ldm.text.clip import SD2
from ldm.text.tokenizers import CLIP_VOCAB_SIZE, clean_clip_text, clip_tokenizer, clip_tokenizer_files

STRINGS = [
    "a photo of a cat", "Hello, World!!! ... ?", "!!!", "wow!", "  extra   spaces\tand\nnewlines  ",
    "CAPS and MiXeD CaSe", "numbers 1234567 3.14159 1e-5 #42 $9.99", "emoji 🐱🚀👍🏽 and ✨",
    "unicode café naïve Ωmega 日本語 한국어 Привет", "it's don't we'll they're I'm you've he'd",
    "&amp; &lt;b&gt; html", "“curly quotes” and ‘single’", "ﬁ ligature ｆｕｌｌ width", "mojibake: Ã©",
    "e\u0301 combining", "a" * 300, " ".join(["long text"] * 60), "", "x <|endoftext|> y",
]
PROMPTS = ["a red circle", "An astronaut riding a horse on the moon, trending on artstation!", ""]
TINY_T5 = T5EncoderConfig(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, max_length=32)
TINY_OPENCLIP = OpenCLIPEncoderConfig(width=32, heads=4, layers=3, output_dim=24)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd1_tiny():
    return CLIPTextEncoder.tiny()


@pytest.fixture(scope="module")
def minilm():
    return HFTextEncoder.minilm(max_length=64)


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    sentences = ["a red circle on a white background", "a photo of a cat sitting on a mat",
                 "an astronaut riding a horse on the moon", "the quick brown fox jumps over the lazy dog",
                 "a blue square next to a green triangle", "oil painting of a lighthouse at sunset"] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=50,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    path.write_bytes(model.getvalue())
    return path


def _close(a, b, atol=1e-5):
    diff = (a - b).abs().max().item()
    assert diff <= atol, diff
    return diff


# ---------------------------------------------------------------- CLIP tokenizer


def test_clip_vocab_files_laid_out_as_clips(tmp_path):
    folder = clip_tokenizer_files(str(tmp_path))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == CLIP_VOCAB_SIZE == 49408 and merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 256, 49406, 49407)
    reference = open_clip.tokenizer.SimpleTokenizer().encoder  # same table, its specials spelt <start_of_text>
    assert {t: i for t, i in vocab.items() if i < 49406} == {t: i for t, i in reference.items() if i < 49406}
    assert "".join(merges[1].split()) == next(t for t, i in vocab.items() if i == 512)


def test_clip_tokenizer_ids_equal_open_clip():
    reference = open_clip.tokenize(STRINGS)  # [N, 77]: sot, ids (truncated), eot, zeros
    sd2 = CLIPTextEncoder.tiny(pad_token="!", tokenization="original")
    with pytest.warns(UserWarning, match=r"prompts\[16\]: 45 "):  # 120 tokens, 75 kept
        ids, mask = sd2.tokenize(STRINGS)
    assert torch.equal(ids[:, 0], reference)
    assert torch.equal(mask[:, 0].sum(1), (reference != 0).sum(1))
    # The HF tokenizer alone (SD1 pad) agrees wherever CLIP's ftfy/html cleaning is a no-op.
    tok = clip_tokenizer()
    for s, ref in zip(STRINGS, reference):
        if clean_clip_text(s) == " ".join(s.split()).lower() and "<|" not in s:
            raw = tok(s, padding="max_length", max_length=77, truncation=True).input_ids
            assert raw[:int((ref != 0).sum())] == ref[ref != 0].tolist(), s
    # Known quirk kept in "diffusers" mode: SD2's pad '!' is a special token, so '!' in a prompt becomes id 0.
    diffusers_sd2 = CLIPTextEncoder.tiny(pad_token="!")
    assert diffusers_sd2.token_ids(["wow!"]) == [[2781, 0]] and sd2.token_ids(["wow!"]) == [[2781, 256]]


# ---------------------------------------------------------------- CLIPTextEncoder


@pytest.mark.parametrize("pad_token, act", [("<|endoftext|>", "quick_gelu"), ("!", "gelu")])
def test_clip_encoder_is_diffusers_recipe(pad_token, act, sd1_tiny):
    enc = sd1_tiny if pad_token != "!" else CLIPTextEncoder.tiny(pad_token="!", hidden_act=act)
    prompts = PROMPTS + ["word " * 90]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = enc.encode(prompts)
    assert any("prompts[3]: 15" in str(w.message) for w in caught)  # 90 words, 75 kept
    tokens = enc.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = enc.model(tokens.input_ids)
    assert isinstance(out, TextEncoding) and out.embeddings.shape == (4, 77, 32) and out.mask.dtype == torch.bool
    assert torch.equal(out.embeddings, ref[0]) and torch.equal(out.pooled, ref.pooler_output)
    assert torch.equal(out.mask, tokens.attention_mask.bool())
    assert enc.max_length == 77 and enc.dim == 32


def test_clip_skip_is_the_earlier_layer_then_final_norm(sd1_tiny):
    skip = CLIPTextEncoder(dataclasses.replace(sd1_tiny.config, clip_skip=1), sd1_tiny.model, sd1_tiny.tokenizer)
    weights = {k: v for k, v in sd1_tiny.model.state_dict().items() if "layers.2." not in k}
    two_layers = CLIPTextEncoder.from_state_dict(weights, CLIPTextEncoder.tiny(num_layers=2).config)
    with torch.no_grad():
        a, b, full = skip.encode(PROMPTS), two_layers.encode(PROMPTS), sd1_tiny.encode(PROMPTS)
    _close(a.embeddings, b.embeddings, atol=1e-6)
    assert torch.equal(a.pooled, full.pooled) and (a.embeddings - full.embeddings).abs().max() > 1e-3


def test_attention_mask_only_changes_padding(sd1_tiny):
    masked = CLIPTextEncoder(dataclasses.replace(sd1_tiny.config, use_attention_mask=True), sd1_tiny.model,
                             sd1_tiny.tokenizer)
    with torch.no_grad():
        a, b = sd1_tiny.encode(PROMPTS), masked.encode(PROMPTS)
    _close(a.embeddings[a.mask], b.embeddings[b.mask], atol=1e-5)  # causal: real tokens never see padding
    assert (a.embeddings[~a.mask] - b.embeddings[~a.mask]).abs().max() > 1e-3


def test_chunked_windows_and_empty_chunks(sd1_tiny):
    chunked = CLIPTextEncoder(dataclasses.replace(sd1_tiny.config, chunked=True), sd1_tiny.model, sd1_tiny.tokenizer)
    with torch.no_grad():
        out = chunked.encode(["cat " * 160, "a dog"])  # 160 tokens -> windows of 75, 75, 10
        first, second, third = sd1_tiny.encode(["cat " * 75, "cat " * 75, "cat " * 10]).embeddings
        dog, empty = sd1_tiny.encode(["a dog", ""]).embeddings
        pooled = sd1_tiny.encode(["cat " * 75, "a dog"]).pooled
    assert out.embeddings.shape == (2, 3 * 77, 32) and out.mask.sum(1).tolist() == [77 + 77 + 12, 4 + 2 + 2]
    assert torch.equal(out.embeddings[0], torch.cat([first, second, third]))
    assert torch.equal(out.embeddings[1], torch.cat([dog, empty, empty]))
    assert torch.equal(out.pooled, pooled)
    assert chunked.tokenize(["cat " * 150])[0].shape == (1, 2, 77)
    assert chunked.tokenize(["cat " * 151])[0].shape == (1, 3, 77)


@pytest.mark.parametrize("bad, word", [([], "empty"), (["ok", 3], r"prompts\[1\]"), ("a cat", "list"),
                                       ([None], r"prompts\[0\]")])
def test_bad_prompts(bad, word, sd1_tiny):
    with pytest.raises(ValueError, match="prompts") as err:
        sd1_tiny.encode(bad)
    assert err.match(word)


def test_clip_save_is_a_diffusers_folder(tmp_path, sd1_tiny):
    sd1_tiny.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in keys) and len(keys) == len(sd1_tiny.model.state_dict())
    assert (tmp_path / "tokenizer" / "vocab.json").read_text(encoding="utf-8") == \
        (clip_tokenizer_files() / "vocab.json").read_text(encoding="utf-8")
    # Read back by plain transformers, as diffusers would, and by us without our json.
    model = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)
    (tmp_path / CONFIG_NAME).unlink()
    again = CLIPTextEncoder.from_pretrained(tmp_path)
    assert again.config == sd1_tiny.config
    ids = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids)[0], sd1_tiny.encode(PROMPTS).embeddings)
        assert torch.equal(again.encode(PROMPTS).embeddings, sd1_tiny.encode(PROMPTS).embeddings)


# ---------------------------------------------------------------- OpenCLIP and key maps


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_openclip_tower_matches_converted_clip(layer):
    oc = OpenCLIPTextEncoder(dataclasses.replace(TINY_OPENCLIP, layer=layer))
    prompts = PROMPTS + ["“fancy” &amp; emoji 🚀!!"]
    with torch.no_grad():
        out = oc.encode(prompts)
        ids = open_clip.tokenize(prompts)
        # SD2's FrozenOpenCLIPEmbedder, written out: blocks up to the chosen one, then ln_final.
        x = oc.tower.token_embedding(ids) + oc.tower.positional_embedding
        for block in oc.tower.transformer.resblocks[:3 - (layer == "penultimate")]:
            x = block(x, attn_mask=oc.tower.attn_mask)
        _close(out.embeddings, oc.tower.ln_final(x), atol=1e-6)
        torch.testing.assert_close(out.pooled, oc.tower(ids), rtol=0, atol=1e-6)
        hf = oc.to_clip(projection=layer == "last")
        converted = hf.encode(prompts)
    assert hf.config.num_layers == (2 if layer == "penultimate" else 3)
    assert torch.equal(hf.tokenize(prompts)[0][:, 0], ids)
    diff = _close(converted.embeddings, out.embeddings, atol=1e-5)
    if layer == "last":
        diff = max(diff, _close(converted.pooled, out.pooled, atol=1e-5))
    print(f"openclip -> CLIPTextModel ({layer}) max |diff| = {diff:.2e}")


def test_openclip_key_maps_round_trip():
    tower = OpenCLIPTextEncoder(TINY_OPENCLIP).tower
    sd2 = {"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()}
    sd2["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    sd2["model.diffusion_model.out.0.weight"] = torch.ones(3)  # the rest of a single file is left alone
    hf = openclip_text_to_hf(sd2, projection=True)
    back = hf_to_openclip_text(hf)
    assert set(back) == {k for k in sd2 if k.startswith("cond_stage_model.") and not k.endswith("logit_scale")}
    assert all(torch.equal(back[k], sd2[k]) for k in back)
    again = openclip_text_to_hf(back, projection=True)
    assert set(again) == set(hf) and all(torch.equal(again[k], hf[k]) for k in hf)
    assert hf["text_projection.weight"].shape == (24, 32)
    penultimate = openclip_text_to_hf(sd2, penultimate=True)
    assert not any(".layers.2." in k for k in penultimate) and "text_projection.weight" not in penultimate
    assert len(penultimate) == len(CLIPTextEncoder.tiny(num_layers=2).model.state_dict())
    with pytest.raises(ValueError, match="unrecognised"):
        openclip_text_to_hf({**sd2, "cond_stage_model.model.transformer.resblocks.0.attn.extra": torch.ones(1)})
    with pytest.raises(ValueError, match="no key"):
        openclip_text_to_hf({"first_stage_model.x": torch.ones(1)})


def test_sd1_key_map_with_and_without_position_ids(sd1_tiny):
    hf = sd1_tiny.model.state_dict()
    sd1 = hf_to_sd1_text_keys(hf)
    assert sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [list(range(77))]
    without = {k: v for k, v in sd1.items() if not k.endswith("position_ids")}
    a, b = sd1_text_keys_to_hf(sd1), sd1_text_keys_to_hf(without)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    round_trip = hf_to_sd1_text_keys(a)
    assert set(round_trip) == set(sd1) and all(torch.equal(round_trip[k], sd1[k]) for k in sd1)
    loaded = CLIPTextEncoder.from_state_dict(a, sd1_tiny.config)
    with torch.no_grad():
        assert torch.equal(loaded.encode(PROMPTS).embeddings, sd1_tiny.encode(PROMPTS).embeddings)
    drifted = dict(sd1)
    drifted["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] - 1e-3
    with pytest.warns(UserWarning, match="position_ids"):
        sd1_text_keys_to_hf(drifted)


# ---------------------------------------------------------------- T5


def test_t5_byt5_tokens_and_mask():
    enc = T5TextEncoder(TINY_T5)
    prompts = ["a red circle", "héllo wörld ✨", "", "x" * 40]  # the last one is truncated to 31 bytes + </s>
    ref_tok = ByT5Tokenizer(extra_ids=0)(prompts, padding="max_length", max_length=32, truncation=True,
                                         return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = enc.tokenize(prompts)
        with torch.no_grad():
            out = enc.encode(prompts)
            ref = enc.model(input_ids=ref_tok.input_ids, attention_mask=ref_tok.attention_mask).last_hidden_state
            # Bidirectional attention: with the mask, real tokens do not depend on how far a prompt is padded.
            longer = T5TextEncoder(dataclasses.replace(TINY_T5, max_length=48), enc.model).encode(prompts[:3])
    assert torch.equal(ids[:, 0], ref_tok.input_ids) and torch.equal(mask[:, 0], ref_tok.attention_mask.bool())
    assert torch.equal(out.embeddings, ref) and out.pooled is None and out.embeddings.shape == (4, 32, 32)
    _close(out.embeddings[:3][out.mask[:3]], longer.embeddings[longer.mask], atol=1e-5)


def test_t5_sentencepiece_tokens(spm_file):
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    config = dataclasses.replace(TINY_T5, tokenizer="sentencepiece", vocab_size=sp.get_piece_size())
    enc = T5TextEncoder(config, spm_file=spm_file)
    prompts = ["a red circle on the moon", "zebra quantum!", "A  Lighthouse"]
    ids, mask = enc.tokenize(prompts)
    for row, m, p in zip(ids[:, 0], mask[:, 0], prompts):
        expected = sp.encode(p) + [1]
        assert row.tolist() == expected + [0] * (32 - len(expected)) and int(m.sum()) == len(expected)
    assert 2 in ids[1, 0].tolist()  # unseen letters map to <unk>
    with torch.no_grad():
        assert enc.encode(prompts).embeddings.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="spm_file"):
        T5TextEncoder(config)
    with pytest.raises(ValueError, match="vocab_size"):
        T5TextEncoder(dataclasses.replace(config, vocab_size=10), spm_file=spm_file)


# ---------------------------------------------------------------- MiniLM


def test_minilm_embeddings_are_meaningful(minilm):
    prompts = ["a red circle", "a red disk", "a blue square on a white background"]
    with torch.no_grad():
        out = minilm.encode(prompts)
        tokens = minilm.tokenizer(prompts, padding=True, return_tensors="pt")
        hidden = minilm.model(**tokens).last_hidden_state
    m = tokens.attention_mask.unsqueeze(-1).float()
    diff = _close(out.pooled, (hidden * m).sum(1) / m.sum(1), atol=1e-5)  # sentence-transformers mean pooling
    print(f"MiniLM mean pooling vs padding=True reference max |diff| = {diff:.2e}")
    assert out.embeddings.shape == (3, 64, 384) and minilm.dim == 384
    assert out.mask.sum(1).tolist() == tokens.attention_mask.sum(1).tolist()
    v = torch.nn.functional.normalize(out.pooled, dim=-1)
    similar, unrelated = (v[0] @ v[1]).item(), (v[0] @ v[2]).item()
    print(f"cos(red circle, red disk) = {similar:.3f}, cos(red circle, blue square ...) = {unrelated:.3f}")
    assert similar > unrelated + 0.1


def test_our_bert_matches_transformers_on_the_bundled_minilm(minilm):
    """BertTextEncoder (plain torch, `tokenizers`) against transformers' BertModel + tokenizer, same weights."""
    ours = BertTextEncoder.minilm(max_length=64)
    prompts = ["a red circle", "An orange CIRCLE to the left of a cyan square, small!", "", "naïve café " * 3]
    with torch.no_grad():
        a, b = ours.encode(prompts), minilm.encode(prompts)
    assert ours.token_ids(prompts) == minilm.token_ids(prompts) and torch.equal(a.mask, b.mask)
    real = _close(a.embeddings[a.mask], b.embeddings[b.mask], atol=1e-5)
    padded = _close(a.embeddings, b.embeddings, atol=1e-4)  # masked-out positions: masking arithmetic differs
    pooled = _close(a.pooled, b.pooled, atol=1e-5)
    print(f"BertTextEncoder vs transformers: tokens {real:.1e}, with padding {padded:.1e}, pooled {pooled:.1e}")
    assert ours.special == minilm.special and ours.dim == minilm.dim == 384


# ---------------------------------------------------------------- save / load


def _encoders(spm_file, sd1_tiny, minilm):
    sp_size = spm.SentencePieceProcessor(model_file=str(spm_file)).get_piece_size()
    return {
        "clip": CLIPTextEncoder.tiny(pad_token="!", clip_skip=1, tokenization="original"),
        "clip-projection": CLIPTextEncoder.tiny(projection_dim=16, chunked=True),
        "openclip": OpenCLIPTextEncoder(TINY_OPENCLIP),
        "t5-byt5": T5TextEncoder(TINY_T5),
        "t5-spm": T5TextEncoder(dataclasses.replace(TINY_T5, tokenizer="sentencepiece", vocab_size=sp_size),
                                spm_file=spm_file),
        "hf": minilm,
        "bert": BertTextEncoder.minilm(max_length=32),
    }


def test_save_load_round_trip_every_kind(tmp_path, spm_file, sd1_tiny, minilm):
    prompts = PROMPTS + ["word " * 80]
    for name, enc in _encoders(spm_file, sd1_tiny, minilm).items():
        enc.save_pretrained(tmp_path / name)
        loaded = load_text_encoder(tmp_path / name)
        assert type(loaded) is type(enc) and loaded.config == enc.config, name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, b = enc.encode(prompts), loaded.encode(prompts)
        assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.mask, b.mask), name
        assert (a.pooled is None and b.pooled is None) or torch.equal(a.pooled, b.pooled), name


def test_load_rejects_unknown_kind_and_bad_config(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"kind": "word2vec", "config": {}}))
    with pytest.raises(ValueError, match="unknown text encoder kind 'word2vec'"):
        load_text_encoder(tmp_path)
    with pytest.raises(ValueError, match="no ldm_text_encoder.json"):
        load_text_encoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown T5EncoderConfig fields: colour"):
        T5EncoderConfig.from_dict({"d_model": 8, "colour": "red"})
    with pytest.raises(ValueError, match="tokenization"):
        CLIPEncoderConfig(tokenization="sloppy")


def test_clip_rejects_a_model_of_another_shape(sd1_tiny):
    with pytest.raises(ValueError, match="does not match"):
        CLIPTextEncoder(dataclasses.replace(sd1_tiny.config, num_layers=2), sd1_tiny.model, sd1_tiny.tokenizer)
    with pytest.raises(ValueError, match="pads with"):
        CLIPTextEncoder(dataclasses.replace(sd1_tiny.config, pad_token="!"), sd1_tiny.model, sd1_tiny.tokenizer)


# ---------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_sd1_sd2_shapes():
    sd1, sd2 = CLIPTextEncoder.sd1(), CLIPTextEncoder.sd2()
    assert sum(p.numel() for p in sd1.model.parameters()) == 123_060_480
    assert (sd2.dim, sd2.model.config.num_hidden_layers, sd2.model.config.hidden_act) == (1024, 23, "gelu")
    vit_h = OpenCLIPTextEncoder.from_open_clip_config("ViT-H-14")
    converted = vit_h.to_clip()
    assert converted.config == dataclasses.replace(SD2, tokenization="original")
    prompts = ["a photograph of an astronaut riding a horse"]
    with torch.no_grad():
        diff = _close(converted.encode(prompts).embeddings, vit_h.encode(prompts).embeddings, atol=1e-4)
        print(f"ViT-H-14 tower -> SD2-shaped CLIPTextModel max |diff| = {diff:.2e}")
        assert sd1.encode(prompts).embeddings.shape == (1, 77, 768)
