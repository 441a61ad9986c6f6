"""The model shipped in weights/shapes-64: it loads offline by default and by name, it is deterministic from a
seed whatever the batch, and it follows the color a prompt names, read back by the exact evaluator's palette
segmentation."""
import numpy as np
import pytest
import torch

from ldm.checkpoints import DEFAULT_MODEL, WEIGHTS_DIR
from ldm.data.shapes import COLORS
from ldm.eval.shapes_eval import benchmark_prompts, segment
from pipelines import TextToImagePipeline

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / DEFAULT_MODEL).exists(), reason="weights/shapes-64 not shipped")

# The shipped checkpoint is undertrained (MODEL_CARD.md: shapes benchmark mean 0.05, single-object accuracy 0.06),
# so a single-object accuracy threshold would prove nothing yet. What it does learn is color: on the 24 fixed
# "colors" prompts below the named color is the dominant object color in 16 of 24 images (0.67; a prompt-blind
# model scores ~1/8). The threshold catches a broken pipeline, text encoder or checkpoint.
DOMINANT_COLOR_THRESHOLD = 0.5


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


def test_draws_the_named_color(pipe):
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
    assert np.mean(hits) >= DOMINANT_COLOR_THRESHOLD, f"named color dominant in {np.mean(hits):.2f} of images"


VQ_MODEL = "shapes-64-vq"


@pytest.mark.skipif(not (WEIGHTS_DIR / VQ_MODEL).exists(), reason="weights/shapes-64-vq not shipped")
def test_vq_model_samples_and_decodes_through_its_codebook():
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
