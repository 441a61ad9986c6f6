"""The `ldm` command: generate, img2img and error reporting, on a tiny saved model."""
import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from test_checkpoints import tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    tiny_pipeline(1).save_pretrained(folder)
    return str(folder)


def test_generate_and_img2img(model_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", model_dir, "--steps", "2", "--seed", "3", "--height", "64",
                 "--width", "64", "--num-images", "2", "-o", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "a-0.png"), str(tmp_path / "a-1.png")]
    first = np.asarray(Image.open(written[0]))
    assert first.shape == (64, 64, 3)
    # the same seed gives the same first image when asked for alone
    assert main(["generate", "a red circle", "--model", model_dir, "--steps", "2", "--seed", "3", "--height", "64",
                 "--width", "64", "-o", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), first)
    assert main(["img2img", "a blue square", "--model", model_dir, "--image", written[0], "--strength", "0.5",
                 "--steps", "4", "-o", str(tmp_path / "c.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "c.png")).shape == (64, 64, 3)


def test_errors_are_reported_not_raised(model_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", model_dir, "--height", "60", "-o", str(tmp_path / "x.png")]) == 2
    assert "height must be a multiple of 8" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no model at" in capsys.readouterr().err
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    assert main(["img2img", "x", "--model", model_dir, "--image", str(tmp_path / "in.png"), "--strength", "0",
                 "-o", str(tmp_path / "y.png")]) == 2
    assert "strength" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,expected", [("--seed", "-1", "expected an integer >= 0, got -1"),
                                                 ("--seed", "x", "expected an integer, got 'x'"),
                                                 ("--per-task", "0", "expected an integer >= 1, got 0"),
                                                 ("--steps", "0", "expected an integer >= 1, got 0")])
def test_bench_refuses_bad_counts_by_name(flag, value, expected, capsys):
    with pytest.raises(SystemExit):  # argparse's usage error, before any model is loaded
        main(["bench", "shapes", flag, value])
    assert f"argument {flag}: {expected}" in capsys.readouterr().err
