"""A normal (non-editable) install carries the shipped models: the wheel is built, installed without
dependencies into a temporary target, and the default model loads and draws from outside the repository. Also:
the package list in pyproject.toml is every package on disk, and importing the package stays light."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("ldm", "pipelines")
               for p in (ROOT / top).rglob("__init__.py")}
    assert listed == on_disk | {"ldm.weights"}


def test_wheel_carries_the_models_and_runs_from_anywhere(tmp_path):
    # built from a copy of the tracked tree: setuptools never cleans a build/ folder, so stale files there would
    # otherwise end up in the wheel
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("ldm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("shapes-64", "shapes-64-vq"):
        for part in ("ldm_pipeline.json", "MODEL_CARD.md", "training.json", "unet/model.safetensors",
                     "vae/config.json"):
            assert f"ldm/weights/{model}/{part}" in names
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = ("import ldm, pipelines; from pipelines import TextToImagePipeline\n"
              f"assert ldm.__file__.startswith({str(target)!r}), ldm.__file__\n"
              "pipe = TextToImagePipeline.from_pretrained(); pipe.progress = False\n"
              "image = pipe('a red circle', num_inference_steps=2, seed=0).images[0]\n"
              "print(image.size)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("(64, 64)")
    demo = subprocess.run([sys.executable, "-m", "ldm.cli", "demo", "--steps", "2", "-o", "demo.png"], cwd=elsewhere,
                          env=env, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert (elsewhere / "demo.png").stat().st_size > 0


@pytest.mark.parametrize("code", [
    "import pipelines",
    "from pipelines import TextToImagePipeline; TextToImagePipeline.from_pretrained()",
])
def test_heavy_optional_libraries_are_not_imported(code):
    """Start-up: the default model needs none of transformers, open_clip, diffusers, peft, accelerate,
    sentencepiece or tensorboard, and no sympy (pulled in by meta-tensor ops); they load where they are used."""
    heavy = ["transformers", "open_clip", "diffusers", "peft", "accelerate", "sentencepiece", "tensorboard",
             "sympy", "torch._dynamo"]
    check = f"{code}\nimport sys\nprint([m for m in {heavy!r} if m in sys.modules])"
    run = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_the_readme_example_runs_as_written(tmp_path):
    """The README's first Python block, run as written in a fresh directory: it draws and saves out.png."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 3
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from PIL import Image
    assert Image.open(tmp_path / "out.png").size == (64, 64)
