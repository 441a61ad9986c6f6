"""The device path without a GPU. A seed must give the same image on every device, and torch refuses a CPU
generator for a CUDA tensor, so every random draw goes through ldm.random, which draws on the CPU and moves the
result. Checked three ways: no other module calls torch's random functions; ldm.random, asked for a `meta`
tensor, draws on the CPU and moves (torch would accept a CPU generator for `meta` directly, so the check is on
where torch was asked to draw); and whole runs (text-to-image, image-to-image, the losses) call torch's random
functions only from ldm.random and only on the CPU. Also: devices and dtypes that do not exist are refused."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ldm.random
from ldm.diffusion import NoiseSchedule, gaussian_denoiser
from ldm.diffusion.losses import UniformSampler, bits_per_dim
from pipelines import ImageToImagePipeline, TextToImagePipeline

ROOT = Path(__file__).resolve().parent.parent
RANDOM_FILE = Path(ldm.random.__file__).resolve()
DRAWS = ("randn", "randn_like", "rand", "rand_like", "randint", "randint_like", "randperm", "multinomial",
         "normal", "bernoulli", "poisson")


def test_no_module_but_ldm_random_calls_torch_random_functions():
    call = re.compile(r"\btorch\.(%s)\(|\.(normal_|uniform_|bernoulli_|exponential_|random_)\(" % "|".join(DRAWS))
    offenders = []
    for path in sorted([*(ROOT / "ldm").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]):
        if path.resolve() == RANDOM_FILE:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if call.search(code) and "weight.data.uniform_" not in code:  # weight init at construction is not noise
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "random draws outside ldm/random.py:\n" + "\n".join(offenders)


@pytest.fixture
def torch_draws(monkeypatch):
    """Record (calling file, device torch was asked to draw on) for every torch.randn / randint / randperm /
    multinomial call, passing through to torch."""
    seen = []
    for name in ("randn", "randint", "randperm", "multinomial"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            caller = Path(inspect.stack()[1].filename).resolve()
            generator = kwargs.get("generator")
            device = kwargs.get("device", generator.device if generator is not None else None)
            if _name == "multinomial":
                device = args[0].device
            seen.append((caller, torch.device(device) if device is not None else torch.device("cpu")))
            return _real(*args, **kwargs)
        monkeypatch.setattr(torch, name, spy)
    return seen


def test_noise_is_drawn_on_the_cpu_and_moved(torch_draws):
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    meta = ldm.random.randn((2, 4, 8, 8), gens, torch.float16, "meta")
    assert meta.device.type == "meta" and meta.dtype == torch.float16 and meta.shape == (2, 4, 8, 8)
    steps = ldm.random.randint(1000, (2,), [torch.Generator().manual_seed(s) for s in (3, 4)], "meta")
    assert steps.device.type == "meta"
    assert [device.type for _, device in torch_draws] == ["cpu"] * 4
    # the values are the CPU draws, row by row: a seed gives the same noise whatever the device
    cpu = ldm.random.randn((2, 4, 8, 8), [torch.Generator().manual_seed(s) for s in (3, 4)], torch.float16)
    assert torch.equal(cpu[1], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4),
                                           dtype=torch.float16)[0])


def test_whole_runs_draw_only_through_ldm_random_on_the_cpu(torch_draws):
    pipe = TextToImagePipeline.from_pretrained()
    pipe.progress = False
    image = pipe("a red circle", num_inference_steps=3, sampler="ddpm", seed=0, output_type="np").images
    img2img = ImageToImagePipeline.from_pipeline(pipe)
    img2img.progress = False
    img2img("a blue square", image=image, strength=0.7, num_inference_steps=3, sampler="ddpm", seed=1)
    schedule = NoiseSchedule.from_name("cosine", 50)
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    bits_per_dim(gaussian_denoiser(0.0, 0.5), x0, schedule, generator=torch.Generator().manual_seed(0))
    UniformSampler(50).sample(4, torch.Generator().manual_seed(0))
    callers = {caller for caller, _ in torch_draws}
    assert callers == {RANDOM_FILE}, callers
    assert {device.type for _, device in torch_draws} == {"cpu"}
    # text-to-image: x_T + ddpm noise on 2 of 3 steps; img2img (2 steps): the posterior sample, q_sample's noise,
    # ddpm noise on 1 step; the VLB: one draw per timestep; the timestep sampler: one
    assert len(torch_draws) == (1 + 2) + (1 + 1 + 1) + 50 + 1


@pytest.mark.parametrize("device,words", [("gpu", "'cpu', 'cuda'"), ("cuda:99", "cuda"), ("xla", "'cpu', 'cuda'")])
def test_devices_that_do_not_exist_are_refused(device, words):
    from pipelines.base import check_device

    with pytest.raises(ValueError, match=words):
        check_device(device)
    with pytest.raises(ValueError, match="device"):
        TextToImagePipeline.from_pretrained(device=device)


def test_casting_keeps_the_seeded_image():
    pipe = TextToImagePipeline.from_pretrained()
    pipe.progress = False
    reference = pipe("a red circle", num_inference_steps=4, seed=0, output_type="np").images
    pipe.to("cpu", torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and next(pipe.vae.parameters()).dtype == torch.bfloat16
    reduced = pipe("a red circle", num_inference_steps=4, seed=0, output_type="np").images
    assert np.abs(reduced - reference).mean() < 0.05  # the same image, drawn in bfloat16
    with pytest.raises(ValueError, match="dtype"):
        pipe.to("cpu", torch.int8)
