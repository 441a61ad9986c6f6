"""The shapes benchmark runner end to end: a generator that draws exactly what each prompt asks scores 1.0 on
every task, one that ignores the prompt scores low, and `ldm bench shapes` runs on a saved model."""
import numpy as np
import pytest

from ldm.cli import main
from ldm.data.shapes import render
from ldm.diffusion.config import DiffusionConfig
from ldm.eval.shapes_bench import run_shapes_benchmark
from ldm.eval.shapes_eval import TASKS, benchmark_prompts, scene_for
from pipelines import PipelineOutput
from test_checkpoints import tiny_pipeline


class Oracle:
    """Renders the scene each prompt describes (seeded by the prompt's seed), as a perfect model would."""

    diffusion = DiffusionConfig(sampler="dpmpp_2m")  # what a sampler=None run asks for

    def __init__(self, ignore_prompt=False):
        self.expect = {p.text: p.expectation for split in ("seen", "heldout") for p in benchmark_prompts(split, 2)}
        self.ignore_prompt = ignore_prompt
        self.calls = []

    def __call__(self, prompts, seed, output_type, **kwargs):
        self.calls.append(kwargs)
        first = self.expect[prompts[0]]
        images = [render(scene_for(first if self.ignore_prompt else self.expect[p], np.random.default_rng(s)), 64)
                  for p, s in zip(prompts, seed)]
        return PipelineOutput(np.stack(images).astype(np.float32) / 255.0)


def test_perfect_generator_scores_one_and_a_prompt_blind_one_does_not():
    oracle = Oracle()
    result = run_shapes_benchmark(oracle, num_inference_steps=7, sampler="ddim", per_task=2, batch_size=5)
    assert result["images"] == 2 * 2 * len(TASKS)
    for split in ("seen", "heldout"):
        assert result["scores"][split] == {**{t: 1.0 for t in TASKS}, "mean": 1.0}
    assert oracle.calls[0]["num_inference_steps"] == 7 and oracle.calls[0]["sampler"] == result["sampler"] == "ddim"
    blind_oracle = Oracle(ignore_prompt=True)
    blind = run_shapes_benchmark(blind_oracle, per_task=2, batch_size=24)
    assert blind["scores"]["seen"]["mean"] < 0.5
    for split in ("seen", "heldout"):  # prompt by prompt, in order: the mean is theirs
        assert len(blind["correct"][split]) == 2 * len(TASKS)
        assert np.mean(blind["correct"][split]) == pytest.approx(blind["scores"][split]["mean"])
    assert all(result["correct"]["seen"])
    assert blind_oracle.calls[0]["sampler"] == blind["sampler"] == "dpmpp_2m"  # the model's default


def test_cli_bench_on_a_saved_model(tmp_path, capsys):
    tiny_pipeline(1).save_pretrained(tmp_path / "tiny")
    assert main(["bench", "shapes", "--model", str(tmp_path / "tiny"), "--steps", "2", "--per-task", "1"]) == 0
    out = capsys.readouterr().out
    for word in ("single_object", "attribute_binding", "mean", "seen", "heldout", "seconds per image",
                 "ddim 2 steps"):  # the folder's default sampler, named
        assert word in out
    assert "prompt set" not in out  # the published set
    assert main(["bench", "shapes", "--model", str(tmp_path / "tiny"), "--steps", "2", "--per-task", "1",
                 "--seed", "1"]) == 0
    assert "prompt set 1 (not the published one, 0)" in capsys.readouterr().out


def test_prompt_sets_other_than_the_published_one_share_no_prompt_and_seed():
    for split in ("seen", "heldout"):
        published = {(p.text, p.seed) for p in benchmark_prompts(split, 36)}
        tuning = {(p.text, p.seed) for p in benchmark_prompts(split, 36, seed=1)}
        assert len(tuning) == len(published) and not published & tuning


class PassThrough:
    """An 'autoencoder' whose latent is the image (lossless), or one that decodes everything to black."""

    def __init__(self, black=False):
        self.config = type("Config", (), {"resolution": 64})()
        self.black = black

    def encode(self, x, sample=False):
        return x

    def decode(self, z):
        return z * 0 - 1 if self.black else z


def test_autoencoder_ceiling_scores_the_round_trip_of_the_ground_truth():
    from ldm.eval.shapes_bench import autoencoder_ceiling
    lossless = autoencoder_ceiling(PassThrough(), per_task=2)
    assert all(s == {**{t: 1.0 for t in TASKS}, "mean": 1.0} for s in lossless.values())
    assert all(s["mean"] == 0.0 for s in autoencoder_ceiling(PassThrough(black=True), per_task=2).values())
