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


def _refused(args, capsys, *words):
    """One line on stderr, naming what was wrong, exit code 2, no traceback."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_bad_files_and_paths_are_one_line_before_any_drawing(model_dir, tmp_path, capsys, monkeypatch):
    from pipelines import ImageToImagePipeline, TextToImagePipeline

    def never(*args, **kwargs):
        raise AssertionError("drew images before checking its inputs")
    for cls in (TextToImagePipeline, ImageToImagePipeline):
        monkeypatch.setattr(cls, "__call__", never)
    gen = ["generate", "x", "--model", model_dir, "--steps", "2"]
    _refused(gen + ["-o", str(tmp_path / "out.xyz")], capsys, "-o/--output", ".png", "out.xyz")
    _refused(gen + ["-o", str(tmp_path)], capsys, "is a folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not __import__("os").access(locked, __import__("os").W_OK):  # root can write anywhere
        _refused(gen + ["-o", str(locked / "sub" / "a.png")], capsys, "cannot write into")
    _refused(["generate", "x", "--model", str(tmp_path / "nothing"), "-o", str(tmp_path / "a.png")], capsys,
             "no model at")
    (tmp_path / "not-an-image.png").write_text("hello")
    img2img = ["img2img", "x", "--model", model_dir, "-o", str(tmp_path / "b.png"), "--image"]
    _refused(img2img + [str(tmp_path / "not-an-image.png")], capsys, "--image", "not an image file")
    _refused(img2img + [str(tmp_path / "missing.png")], capsys, "--image", "no such file")
    _refused(gen + ["--device", "cuda:7", "-o", str(tmp_path / "c.png")], capsys, "cuda")
    _refused(gen + ["--device", "gpu", "-o", str(tmp_path / "c.png")], capsys, "device must be")
    monkeypatch.undo()
    _refused(["generate", "x", "--model", model_dir, "--seed", str(2**70), "-o", str(tmp_path / "d.png")], capsys,
             "seed", "2**64 - 1")
    bad_index = tmp_path / "bad-diffusers"
    bad_index.mkdir()
    (bad_index / "model_index.json").write_text("{not json")
    _refused(["generate", "x", "--model", str(bad_index), "-o", str(tmp_path / "e.png")], capsys,
             "model_index.json", "not valid JSON")
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    _refused(["generate", "x", "--model", str(truncated), "-o", str(tmp_path / "f.png")], capsys,
             "model.safetensors", "not a readable safetensors file")


def test_output_is_written_atomically(model_dir, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"the user's file")
    assert main(["generate", "x", "--model", model_dir, "--steps", "2", "--height", "64", "--width", "64",
                 "-o", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]  # no temporary file left beside it


def test_more_bad_models_and_demo_requests_are_one_line(model_dir, tmp_path, capsys):
    import json

    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    _refused(["generate", "x", "--model", str(sdxl), "-o", str(tmp_path / "a.png")], capsys,
             "StableDiffusionXLPipeline", "Stable Diffusion 1.x/2.x")
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": None, "text_encoder_2": ["x", "y"]}))
    _refused(["generate", "x", "--model", str(sdxl), "-o", str(tmp_path / "a.png")], capsys, "describes a None")
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04 truncated")
    _refused(["generate", "x", "--model", str(tmp_path / "cut.ckpt"), "--allow-pickle", "-o", str(tmp_path / "b.png")],
             capsys, "cut.ckpt", "weights-only pickle")
    _refused(["demo", "--model", model_dir, "--steps", "5000", "-o", str(tmp_path / "d.png")], capsys,
             "num_inference_steps")


def test_an_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    import os

    from ldm.files import write_text
    path = tmp_path / "notes.txt"
    path.write_text("old")
    os.chmod(path, 0o600)
    write_text(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_text(tmp_path / "missing" / "x.txt", "x")
