"""DeepFloyd IF stage I and stage II: diffusers IFPipeline / IFSuperResolutionPipeline folders (tiny random weights
in IF's layouts: a T5 encoder with its SentencePiece tokenizer, trained here; GELU U-Nets with added-KV attention,
pooled text and learned-range variance; DDPM with dynamic thresholding; stage II's image upsampled, then noised)
load with our from_pretrained and draw diffusers' images from the same prompt and seed, within 1e-3 in [0, 1].

Few steps on purpose: random weights under guidance 7 and dynamic thresholding are chaotic. diffusers against
itself, with its two equivalent added-KV attention kernels (AttnAddedKVProcessor2_0 vs AttnAddedKVProcessor),
differs by 2.3e-4 at 4 steps of stage I, 9.6e-3 at 8 and 0.27 at 16; ours against diffusers by 2.6e-4, 2.0e-2
and 0.45 (without thresholding: 8.5e-5, 1.1e-4, 7.4e-5)."""
import io

import numpy as np
import pytest
import sentencepiece as spm
import torch
from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from pipelines import SuperResolutionPipeline, TextToImagePipeline

from test_pipelines import ATOL, randomize
from test_unet_if import IF_STAGE1, IF_STAGE2

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["A Red Circle on a white background", "two blue squares"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A SentencePiece model trained here (no T5 tokenizer exists offline), as T5's tokenizer reads it, and a
    tiny random T5 encoder of its vocabulary."""
    sentences = ["a red circle on a white background", "two blue squares on black", "a green triangle",
                 "an astronaut riding a horse", "the quick brown fox jumps over the lazy dog"] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=60,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    folder = tmp_path_factory.mktemp("t5tok")
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(folder, extra_ids=0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                      num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                      dropout_rate=0.0))
    return tokenizer, randomize(encoder, 5, 0.3), folder / "spiece.model"


def scheduler(max_value: float) -> DDPMScheduler:
    return DDPMScheduler(variance_type="learned_range", beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=max_value)


def save(pipe, folder, spiece):
    pipe.save_pretrained(folder)
    if not (folder / "tokenizer" / "spiece.model").exists():  # IF's folders ship it
        (folder / "tokenizer" / "spiece.model").write_bytes(spiece.read_bytes())
    return folder


@pytest.fixture(scope="module")
def stage1(t5, tmp_path_factory):
    tokenizer, encoder, spiece = t5
    unet = randomize(UNet2DConditionModel(**dict(IF_STAGE1, sample_size=16, encoder_hid_dim=32)), 1)
    theirs = IFPipeline(tokenizer=tokenizer, text_encoder=encoder, unet=unet, scheduler=scheduler(1.5),
                        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    folder = save(theirs, tmp_path_factory.mktemp("if") / "stage1", spiece)
    ours = TextToImagePipeline.from_pretrained(folder)
    ours.progress = False
    return theirs, ours


@pytest.fixture(scope="module")
def stage2(t5, tmp_path_factory):
    tokenizer, encoder, spiece = t5
    unet = randomize(UNet2DConditionModel(**dict(IF_STAGE2, encoder_hid_dim=32)), 2)
    theirs = IFSuperResolutionPipeline(
        tokenizer=tokenizer, text_encoder=encoder, unet=unet, scheduler=scheduler(1.0),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    folder = save(theirs, tmp_path_factory.mktemp("if") / "stage2", spiece)
    ours = SuperResolutionPipeline.from_pretrained(folder)
    ours.progress = False
    return theirs, ours


def test_the_t5_prompt_path_is_ifs(stage1):
    theirs, ours = stage1
    with torch.no_grad():
        expected, _ = theirs.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clean_caption=False)
        got = ours.text_encoder.encode(PROMPTS).embeddings
    assert got.shape == expected.shape == (2, 77, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_if_stage1_draws_diffusers_image(stage1, guidance):
    theirs, ours = stage1
    assert ours.diffusion.default_steps == 100 and ours.diffusion.guidance_scale == 7.0
    assert ours.diffusion.thresholding == {"kind": "dynamic", "percentile": 0.95, "max_value": 1.5}
    kwargs = dict(num_inference_steps=4, guidance_scale=guidance, output_type="np")
    expected = theirs(PROMPTS[0], generator=torch.Generator().manual_seed(3), clean_caption=False, **kwargs).images
    got = ours(PROMPTS[0], seed=3, **kwargs).images
    assert got.shape == expected.shape == (1, 16, 16, 3)
    print(f"IF stage I, guidance {guidance}: max |ours - diffusers| = {np.abs(got - expected).max():.1e}")
    assert np.abs(got - expected).max() < ATOL


@pytest.mark.parametrize("noise_level", [250, 0])
def test_if_stage2_draws_diffusers_image(stage2, noise_level):
    theirs, ours = stage2
    assert ours.low_res.scale == 4 and ours.low_res.noise_level == 250 and ours.diffusion.guidance_scale == 4.0
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    kwargs = dict(num_inference_steps=3, noise_level=noise_level, output_type="np")
    expected = theirs(PROMPTS[1], image=image, generator=torch.Generator().manual_seed(4), clean_caption=False,
                      **kwargs).images
    got = ours(PROMPTS[1], image, seed=4, **kwargs).images
    assert got.shape == expected.shape == (1, 32, 32, 3)
    print(f"IF stage II, noise level {noise_level}: max |ours - diffusers| = {np.abs(got - expected).max():.1e}")
    assert np.abs(got - expected).max() < ATOL


def test_if_folders_round_trip_through_our_format(stage2, tmp_path):
    _, ours = stage2
    ours.save_pretrained(tmp_path / "ours")
    again = SuperResolutionPipeline.from_pretrained(tmp_path / "ours")
    again.progress = False
    assert again.low_res == ours.low_res and again.diffusion == ours.diffusion
    image = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    kwargs = dict(num_inference_steps=2, seed=1, output_type="np")
    assert np.array_equal(again("a", image, **kwargs).images, ours("a", image, **kwargs).images)


def test_if_stages_as_one_cascade_draw_diffusers_two_calls(stage1, stage2):
    """Stage I then stage II, one generator through both (diffusers) and one seed through the cascade (ours)."""
    from pipelines import CascadePipeline

    (first, ours1), (second, ours2) = stage1, stage2
    g = torch.Generator().manual_seed(7)
    low = first(PROMPTS[0], num_inference_steps=2, generator=g, output_type="pt", clean_caption=False).images
    expected = second(PROMPTS[0], image=low, height=64, width=64, num_inference_steps=2, noise_level=100,
                      generator=g, output_type="np", clean_caption=False).images
    cascade = CascadePipeline(ours1, [ours2])
    got = cascade(PROMPTS[0], num_inference_steps=[2, 2], noise_level=100, seed=7, output_type="np")
    assert got.images.shape == expected.shape == (1, 64, 64, 3)
    print(f"IF stages I + II as a cascade: max |ours - diffusers| = {np.abs(got.images - expected).max():.1e}")
    assert np.abs(got.images - expected).max() < ATOL
    with pytest.raises(ValueError, match="noise_at"):  # IF noises after upsampling: truncation would not fit
        cascade(PROMPTS[0], augmentation="truncated", num_inference_steps=1)
    with pytest.raises(ValueError, match="thresholding"):  # checked before stage I runs
        cascade(PROMPTS[0], thresholding=[None, "hard"], num_inference_steps=1)


def test_sharded_and_fp16_variant_weights_load(stage1, tmp_path):
    """Real IF folders shard the T5 encoder (model-0000k-of-0000n.safetensors + an index) and offer fp16 variants."""
    import shutil

    theirs, ours = stage1
    folder = tmp_path / "if"
    theirs.save_pretrained(folder)
    shutil.copy(ours.text_encoder.tokenizer.model_file, folder / "tokenizer" / "spiece.model")
    for f in (folder / "text_encoder").glob("*.safetensors"):
        f.unlink()
    theirs.text_encoder.save_pretrained(folder / "text_encoder", max_shard_size="20KB")
    assert len(list((folder / "text_encoder").glob("model-*.safetensors"))) > 1
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    theirs.unet.save_pretrained(folder / "unet", variant="fp16")
    again = TextToImagePipeline.from_pretrained(folder)
    again.progress = False
    kwargs = dict(num_inference_steps=2, seed=0, output_type="np")
    assert np.array_equal(again(PROMPTS[1], **kwargs).images, ours(PROMPTS[1], **kwargs).images)
