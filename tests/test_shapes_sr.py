"""The shapes cascade's super-resolution recipe: a killed and resumed run gives the weights of an uninterrupted one,
the training input is the 64-px render corrupted at the drawn level, and the export is a cascade folder that draws
128-px images behind the shipped base."""
import json

import numpy as np
import pytest
import torch

from ldm.data.shapes_dataset import ShapesDataset
from ldm.train import shapes_sr
from ldm.train.state import load_training_state
from pipelines import CascadePipeline

ARGS = ["--num-images", "24", "--batch", "2", "--crop", "32"]


def test_a_resumed_run_equals_an_uninterrupted_one_and_exports_a_cascade(tmp_path):
    shapes_sr.main(["train", "--run", str(tmp_path / "whole"), "--max-steps", "4", *ARGS])
    shapes_sr.main(["train", "--run", str(tmp_path / "split"), "--max-steps", "2", *ARGS])
    shapes_sr.main(["train", "--run", str(tmp_path / "split"), "--max-steps", "4", *ARGS])
    whole, split = (load_training_state(tmp_path / r / "state.pt") for r in ("whole", "split"))
    assert whole["step"] == split["step"] == 4
    assert all(torch.equal(whole["model"][k], split["model"][k]) for k in whole["model"])
    with pytest.raises(SystemExit, match="with augmentation"):
        shapes_sr.main(["train", "--run", str(tmp_path / "whole"), "--max-steps", "5", "--no-augmentation", *ARGS])
    shapes_sr.main(["export", "--run", str(tmp_path / "whole"), "--out", str(tmp_path / "cascade")])
    # the base is the shipped shapes-64, unchanged: referred to, not copied
    meta = json.loads((tmp_path / "cascade" / "ldm_pipeline.json").read_text())
    assert meta["components"]["unet"]["shipped"] == "shapes-64/unet"
    assert meta["components"]["vae"]["shipped"] == "shapes-64/vae"
    assert not (tmp_path / "cascade" / "unet").exists() and (tmp_path / "cascade" / "unet_1").is_dir()
    pipe = CascadePipeline.from_pretrained(tmp_path / "cascade")
    pipe.progress = False
    out = pipe("a red circle", num_inference_steps=[2, 2], seed=0, output_type="np")
    assert out.images.shape == (1, 128, 128, 3) and out.stage_images[0].shape == (1, 64, 64, 3)
    assert "ldm.train.shapes_sr train" in (tmp_path / "whole" / "commands.txt").read_text()
    card = (tmp_path / "cascade" / "MODEL_CARD.md").read_text()
    assert "4 steps" in card and "Not measured yet" in card
    results = {"prompts": 2, "prompt_set": 0, "per_task": 1, "hardware": "a CPU", "command": "python bench",
               "ground_truth_fed": [{"upsampler": "Lanczos", "psnr": 20.5, "sharpness": 0.8, "accuracy": 0.5}],
               "base": {"accuracy_64": 0.5, "seconds_per_image": 0.1, "lanczos_accuracy_128": 0.5},
               "fed_base": [{"stage": "with augmentation", "level": 100, "accuracy": 1.0, "only_here": 1,
                             "only_lanczos": 0, "seconds_per_image": 1}],
               "augmentation_paired": {"only_with": 3, "only_without": 2},
               "levels": {"prompts": 2, "lanczos_accuracy": 0.5, "rows": [
                   {"level": 0, "accuracy": 0.5, "only_here": 0, "only_lanczos": 0},
                   {"level": 100, "accuracy": 1.0, "only_here": 1, "only_lanczos": 0}]},
               "thresholding": {"prompts": 2, "ground_truth_saturated": 0.4, "rows": [
                   {"guidance": 5.0, "thresholding": "dynamic", "accuracy": 0.5, "saturated": 0.1}]}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    shapes_sr.main(["card", "--model", str(tmp_path / "cascade"), "--results", str(tmp_path / "r.json")])
    card = (tmp_path / "cascade" / "MODEL_CARD.md").read_text()
    for row in ("| Lanczos | 20.5 | 0.8 | 0.5 |", "| with augmentation | 100 | 1.0 | 1 / 0 | 1 |",
                "| 0 | 0.5 | 0 / 0 |", "| 5.0 | dynamic | 0.5 | 0.1 |", "right only with it 3, only without it 2",
                "`python bench`"):
        assert row in card, row


def test_a_stage_trained_without_augmentation_is_exported_at_level_zero(tmp_path):
    shapes_sr.main(["train", "--run", str(tmp_path / "run"), "--max-steps", "1", "--no-augmentation", *ARGS])
    shapes_sr.main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "cascade")])
    low_res = CascadePipeline.from_pretrained(tmp_path / "cascade").stages[0].low_res
    assert (low_res.noise_level, low_res.max_noise_level) == (0, 0)
    assert "without augmentation" in (tmp_path / "cascade" / "MODEL_CARD.md").read_text()

def test_the_training_input_is_the_low_render_corrupted_at_its_level():
    high, low = (torch.from_numpy(ShapesDataset(s, 4, 7).batch()[0]) for s in (128, 64))
    assert high.shape == (4, 128, 128, 3) and low.shape == (4, 64, 64, 3)
    x = torch.from_numpy(low.numpy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    clean, levels = shapes_sr.augmented_input(x, augment=False)
    assert levels.tolist() == [0, 0, 0, 0] and clean.shape == (4, 3, 128, 128)
    up = shapes_sr.LOW_RES.resize(x, (128, 128))
    assert (clean - up).abs().max() < 0.1  # level 0: alpha_bar_0, almost clean
    noisy, levels = shapes_sr.augmented_input(x, augment=True)
    assert 0 <= int(levels.min()) and int(levels.max()) <= shapes_sr.LOW_RES.max_noise_level
    grid = torch.arange(2 * 8 * 8.).reshape(2, 1, 8, 8)
    a, b = shapes_sr.crops(grid, grid.clone(), 4)
    assert torch.equal(a, b) and a.shape == (2, 1, 4, 4)  # the same window of target and input
    assert np.isfinite(noisy.numpy()).all()


def test_an_efficient_unet_run_keeps_its_layout(tmp_path):
    shapes_sr.main(["train", "--run", str(tmp_path / "run"), "--max-steps", "1", "--efficient", *ARGS])
    with pytest.raises(SystemExit, match="--efficient"):
        shapes_sr.main(["train", "--run", str(tmp_path / "run"), "--max-steps", "2", *ARGS])
    assert shapes_sr.sr_model(tmp_path / "run").config == shapes_sr.EFFICIENT_SR_UNET
