"""The model shipped in weights/shapes-64: it loads offline by default and by name, it is deterministic from a
seed whatever the batch, and it follows the color a prompt names, read back by the exact evaluator's palette
segmentation."""
import numpy as np
import pytest
import torch

from ldm.checkpoints import DEFAULT_MODEL, WEIGHTS_DIR
from ldm.data.shapes import COLORS
from ldm.eval.shapes_eval import benchmark_prompts, evaluate, segment
from pipelines import TextToImagePipeline

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / DEFAULT_MODEL).exists(), reason="weights/shapes-64 not shipped")

# The shipped checkpoint is still short of its targets (MODEL_CARD.md: benchmark mean 0.82 seen / 0.67 held-out).
# Measured on the fixed prompts below (20 steps of the model's default sampler, DPM-Solver++(2M), guidance 3, 2
# threads): the named color is the dominant object color in 24 of 24 "colors" images (a prompt-blind model ~1/8);
# single-object accuracy on 24 "a <shape>" prompts is 0.83 (20/24; the previous U-Nets 18/24 and 17/24), and
# 0.00 (0/24) when the same seeds are asked for another shape. The thresholds leave room for rounding
# differences across machines (a few prompts) and catch a broken pipeline, text encoder or checkpoint, or a
# regression.
DOMINANT_COLOR_THRESHOLD = 0.85
SINGLE_OBJECT_PROMPTS = 24
SINGLE_OBJECT_THRESHOLD = 0.55
SINGLE_OBJECT_MARGIN = 0.3


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    p = TextToImagePipeline.from_pretrained()
    p.progress = False
    return p


def test_default_and_named_loading(pipe):
    named = TextToImagePipeline.from_pretrained("shapes-64")
    for a, b in zip(pipe.unet.state_dict().values(), named.unet.state_dict().values()):
        assert torch.equal(a, b)
    image = pipe("a red circle above a blue square", num_inference_steps=4, seed=0).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_deterministic_from_seed_whatever_the_batch(pipe):
    prompts = ["a yellow star", "two green squares"]
    kw = dict(num_inference_steps=6, guidance_scale=3.0, output_type="np")
    both = pipe(prompts, seed=[7, 8], **kw).images
    again = pipe(prompts, seed=[7, 8], **kw).images
    alone = pipe(prompts[1], seed=8, **kw).images
    np.testing.assert_array_equal(both, again)
    np.testing.assert_allclose(both[1], alone[0], atol=1e-5)  # batched vs single matmuls differ in rounding only
    assert np.abs(both[0] - both[1]).mean() > 0.01


def named_color_accuracy(pipe) -> float:
    """Fraction of the 24 fixed "colors" prompts whose image has the named color as its dominant object color."""
    prompts = [p for p in benchmark_prompts("seen", per_task=24) if p.task == "colors"]
    images = pipe([p.text for p in prompts], num_inference_steps=20, guidance_scale=3.0,
                  seed=[p.seed for p in prompts], output_type="np").images
    names = list(COLORS)
    hits = []
    for prompt, image in zip(prompts, images):
        index, alpha, _ = segment(image * 255)
        objects = index[(index >= 0) & (alpha >= 0.5)]
        dominant = names[np.bincount(objects, minlength=len(names)).argmax()] if objects.size else None
        hits.append(dominant == prompt.expectation.objects[0].color)
    return float(np.mean(hits))


def test_draws_the_named_color(pipe):
    accuracy = named_color_accuracy(pipe)
    assert accuracy >= DOMINANT_COLOR_THRESHOLD, f"named color dominant in {accuracy:.2f} of images"


def single_object_accuracy(pipe, prompts, texts) -> float:
    images = pipe(texts, num_inference_steps=20, guidance_scale=3.0, seed=[p.seed for p in prompts],
                  output_type="np").images
    return float(np.mean([evaluate((image * 255).round().astype(np.uint8), p.expectation)
                          for p, image in zip(prompts, images)]))


def test_single_object_accuracy(pipe):
    """"a star", "a circle", ... : the fitted shape must be the named one. Control: the same seeds, each asked
    for another shape (the next prompt's), scored against the original expectation: what the model draws anyway."""
    prompts = [p for p in benchmark_prompts("seen", per_task=SINGLE_OBJECT_PROMPTS) if p.task == "single_object"]
    others = prompts[1:] + prompts[:1]
    assert all(p.expectation.objects[0].shape != o.expectation.objects[0].shape for p, o in zip(prompts, others))
    prompted = single_object_accuracy(pipe, prompts, [p.text for p in prompts])
    control = single_object_accuracy(pipe, prompts, [o.text for o in others])
    assert prompted >= SINGLE_OBJECT_THRESHOLD, f"single-object accuracy {prompted:.2f}"
    assert prompted >= control + SINGLE_OBJECT_MARGIN, f"prompted {prompted:.2f} vs other-shape control {control:.2f}"


VQ_MODEL = "shapes-64-vq"


@pytest.mark.skipif(not (WEIGHTS_DIR / VQ_MODEL).exists(), reason="weights/shapes-64-vq not shipped")
def test_vq_model_samples_and_decodes_through_its_codebook_and_follows_the_prompt():
    torch.set_num_threads(2)
    vq = TextToImagePipeline.from_pretrained(VQ_MODEL)
    vq.progress = False
    assert vq.vae.config.kind == "vq"
    kw = dict(num_inference_steps=6, guidance_scale=3.0, seed=3)
    latents = vq("a red circle above a blue square", output_type="latent", **kw).images
    again = vq("a red circle above a blue square", output_type="latent", **kw).images
    assert torch.equal(latents, again)
    # the U-Net works on the pre-quantization latent; decoding snaps each position to its nearest code
    scale = vq.vae.config.scaling_factor
    codes = vq.vae.quantize.lookup(vq.vae.quantize.indices(latents / scale)) * scale
    with torch.no_grad():
        np.testing.assert_allclose(vq.vae.decode(latents).numpy(), vq.vae.decode(codes).numpy(), atol=1e-5)
    image = vq("a red circle above a blue square", **kw).images[0]
    assert image.size == (64, 64)
    # through its codebook it follows the prompt like the KL model (measured: colors 24/24, single object 17/24)
    assert named_color_accuracy(vq) >= DOMINANT_COLOR_THRESHOLD
    prompts = [p for p in benchmark_prompts("seen", per_task=SINGLE_OBJECT_PROMPTS) if p.task == "single_object"]
    assert single_object_accuracy(vq, prompts, [p.text for p in prompts]) >= SINGLE_OBJECT_THRESHOLD
