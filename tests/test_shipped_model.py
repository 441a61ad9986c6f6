"""The model shipped in weights/shapes-64: it loads offline by default and by name, it is deterministic from a
seed whatever the batch, and it draws what single-object prompts ask for, read back by the exact evaluator."""
import numpy as np
import pytest
import torch

from ldm.checkpoints import DEFAULT_MODEL, WEIGHTS_DIR
from ldm.eval.shapes_eval import benchmark_prompts, evaluate
from pipelines import TextToImagePipeline

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / DEFAULT_MODEL).exists(), reason="weights/shapes-64 not shipped")

# Measured on the shipped weights at 20 DDIM steps, guidance 3.0: see MODEL_CARD.md. The thresholds sit below
# the measured accuracy so that they catch a broken model or pipeline (a prompt-blind generator scores < 0.5).
SINGLE_OBJECT_THRESHOLD = 0.75


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


def test_single_object_accuracy(pipe):
    prompts = benchmark_prompts("seen", per_task=20)[:20]
    assert {p.task for p in prompts} == {"single_object"}
    images = pipe([p.text for p in prompts], num_inference_steps=20, guidance_scale=3.0,
                  seed=[p.seed for p in prompts], output_type="np").images
    hits = [evaluate((im * 255).round().astype(np.uint8), p.expectation) for p, im in zip(prompts, images)]
    assert np.mean(hits) >= SINGLE_OBJECT_THRESHOLD, f"single-object accuracy {np.mean(hits):.2f}"
