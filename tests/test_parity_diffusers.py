"""Step-by-step parity with diffusers' schedulers on identical model outputs.

A fixed random "network" (1x1 mixing + time modulation + tanh) drives both implementations from the same
x_T with identically seeded generators; after every step our x_{t_prev} must equal diffusers' prev_sample
to atol 1e-5.

diffusers computes alpha_bar as a float32 cumprod, which drifts from the float64 values by up to ~1e-5
relative late in the schedule (test_beta_schedules bounds it). So that the comparison checks the update
equations rather than that table, diffusers is handed our float64 alpha_bar and the data is float64 (DPM-
Solver still casts its sigmas and the sample to float32 internally). `test_float32_end_to_end` runs both
exactly as shipped, in float32, and bounds the drift over a whole trajectory.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldm.diffusion import Denoiser, NoiseSchedule, spaced_timesteps
from ldm.diffusion.parameterization import check_prediction_type
from ldm.sampling import ddim_step, dynamic_thresholding, sample

ATOL = 1e-5
BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


class FakeNet:
    """A deterministic, well-scaled stand-in for a U-Net: out = x + 0.5 tanh(W x + b t/1000) on the first C
    channels (a noise predictor that guesses "x_t is mostly noise"), 0.9 tanh(...) on any extra variance
    channels, so x0 stays O(1) along a trajectory as with a real model."""

    def __init__(self, c_in=4, c_out=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(c_out, c_in, generator=g, dtype=torch.float64) / c_in**0.5
        self.b = torch.randn(c_out, generator=g, dtype=torch.float64)

    def __call__(self, x, t):
        t = torch.as_tensor(t).to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        h = torch.tanh(torch.einsum("oc,bchw->bohw", self.w.to(x.dtype), x) + self.b.to(x).reshape(1, -1, 1, 1) * t / 1000)
        c = x.shape[1]
        return torch.cat([x + 0.5 * h[:, :c], 0.9 * h[:, c:]], dim=1)


def x_T(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def with_our_table(scheduler, schedule):
    """Give a diffusers scheduler our float64 alpha_bar (before set_timesteps, which reads it)."""
    scheduler.alphas_cumprod = schedule.alpha_bar.clone()
    scheduler.alphas = schedule.alphas.clone()
    scheduler.betas = schedule.betas.clone()
    return scheduler


def diffusers_trajectory(scheduler, net, x, num_steps, seed=1, **step_kwargs):
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x, generator=g, **step_kwargs).prev_sample
        out.append(x)
    return scheduler.timesteps.clone(), out


def our_trajectory(denoise, schedule, x, timesteps, sampler, seed=1, **options):
    out = []
    g = torch.Generator().manual_seed(seed)
    sample(denoise, x, schedule, None, sampler, generator=g, timesteps=timesteps,
           callback=lambda i, t, x, pred: out.append(x), **options)
    return out


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("beta_schedule", list(BETAS))
def test_beta_schedules(beta_schedule):
    start, end = BETAS[beta_schedule]
    theirs = DDPMScheduler(beta_schedule=beta_schedule, beta_start=start, beta_end=end)
    ours = NoiseSchedule.from_name(beta_schedule)
    torch.testing.assert_close(ours.betas.float(), theirs.betas, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(ours.alpha_bar.float(), theirs.alphas_cumprod, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ddpm(variance_type, num_steps):
    learned = variance_type == "learned_range"
    net = FakeNet(4, 8 if learned else 4)
    schedule = NoiseSchedule.from_name("linear")
    theirs = with_our_table(DDPMScheduler(beta_schedule="linear", variance_type=variance_type, clip_sample=False),
                            schedule)
    ts, expected = diffusers_trajectory(theirs, net, x_T(), num_steps)
    denoise = Denoiser(net, schedule, "eps", variance_type if learned else "fixed_small")
    options = {} if learned else {"variance": variance_type}
    assert_same(our_trajectory(denoise, schedule, x_T(), ts, "ddpm", **options), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(prediction_type, spacing, eta):
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    theirs = with_our_table(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type=prediction_type, timestep_spacing=spacing,
                                          clip_sample=False, set_alpha_to_one=True), schedule)
    ts, expected = diffusers_trajectory(theirs, net, x_T(), 50, eta=eta)
    denoise = Denoiser(net, schedule, check_prediction_type(prediction_type))
    assert_same(our_trajectory(denoise, schedule, x_T(), ts, "ddim", eta=eta), expected)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_linspace_steps(eta, prediction_type):
    """diffusers' DDIM steps from t to t - T // n whatever the spacing, which with "linspace" is not the next
    listed timestep; so each of its steps is compared with our DDIM update on the same (t, t_prev) pair."""
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    theirs = with_our_table(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type=prediction_type, timestep_spacing="linspace",
                                          clip_sample=False), schedule)
    theirs.set_timesteps(30)
    assert theirs.timesteps.tolist() == spaced_timesteps(1000, 30, "linspace").tolist()
    denoise = Denoiser(net, schedule, check_prediction_type(prediction_type))
    g = torch.Generator().manual_seed(1)
    x = x_T()
    for t in theirs.timesteps:
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
        theirs_x = theirs.step(net(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
        t_prev = int(t) - 1000 // 30
        ours_x = ddim_step(x, denoise(x, schedule.sigma_at(t.repeat(2))), schedule.alpha_bar_at(int(t)),
                           schedule.alpha_bar_at(max(t_prev, -1)), eta, noise)
        torch.testing.assert_close(ours_x, theirs_x, atol=ATOL, rtol=0)
        x = theirs_x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmsolver_pp_2m(prediction_type, spacing):
    net = FakeNet()
    schedule = NoiseSchedule.from_name("scaled_linear")
    theirs = with_our_table(DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing), schedule)
    ts, expected = diffusers_trajectory(theirs, net, x_T(), 20)
    denoise = Denoiser(net, schedule, check_prediction_type(prediction_type))
    assert_same(our_trajectory(denoise, schedule, x_T(), ts, "dpmpp_2m"), expected)


def test_dynamic_thresholding_ddpm_and_dpmsolver():
    """Imagen thresholding (ratio 0.9, sample_max_value 2) on a model whose x0 leaves [-1, 1]."""
    net = FakeNet()
    schedule = NoiseSchedule.from_name("linear")
    denoise = dynamic_thresholding(Denoiser(net, schedule, "eps"), percentile=0.9, max_value=2.0)
    x0_range = []
    raw = Denoiser(net, schedule, "eps")
    sample(raw, x_T(), schedule, 50, "ddpm", spacing="leading",
           callback=lambda i, t, x, pred: x0_range.append(pred.x0.abs().max().item()))
    assert max(x0_range) > 1.2  # thresholding is active
    kwargs = dict(beta_schedule="linear", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    ts, expected = diffusers_trajectory(with_our_table(DDPMScheduler(clip_sample=False, **kwargs), schedule),
                                        net, x_T(), 50)
    assert_same(our_trajectory(denoise, schedule, x_T(), ts, "ddpm"), expected)
    ts, expected = diffusers_trajectory(with_our_table(DPMSolverMultistepScheduler(**kwargs), schedule),
                                        net, x_T(), 20)
    assert_same(our_trajectory(denoise, schedule, x_T(), ts, "dpmpp_2m"), expected)
    # DDIM re-derives eps from the thresholded x0, as diffusers does with use_clipped_model_output=True
    ts, expected = diffusers_trajectory(with_our_table(DDIMScheduler(clip_sample=False, **kwargs), schedule),
                                        net, x_T(), 50, use_clipped_model_output=True)
    assert_same(our_trajectory(denoise, schedule, x_T(), ts, "ddim"), expected)


@pytest.mark.parametrize("scheduler_cls,sampler", [(DDIMScheduler, "ddim"), (DPMSolverMultistepScheduler, "dpmpp_2m")])
def test_float32_end_to_end(scheduler_cls, sampler):
    """Both as shipped, float32 data and each its own alpha_bar table: 25 steps agree to 2e-5 (measured
    2.9e-6 for DDIM, 2.2e-6 for DPM-Solver++)."""
    net32 = FakeNet()
    kwargs = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    theirs = scheduler_cls(clip_sample=False, **kwargs) if scheduler_cls is DDIMScheduler else scheduler_cls(**kwargs)
    ts, expected = diffusers_trajectory(theirs, net32, x_T().float(), 25)
    schedule = NoiseSchedule.from_name("scaled_linear")
    ours = our_trajectory(Denoiser(net32, schedule), schedule, x_T().float(), ts, sampler)
    assert ours[-1].dtype == torch.float32
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
