"""How a model was trained to be sampled: schedule, parameterization, variance, default timestep spacing, and
what its pipeline uses when the caller names none: the sampler (diffusers keeps this as the scheduler class),
the number of steps and the guidance scale (diffusers' defaults, 50 and 7.5, where a folder stores none)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..config import JsonConfig, check_number
from ..sampling import SAMPLERS
from . import parameterization as param
from .schedule import SCHEDULE_ALIASES, SPACINGS, NoiseSchedule

_DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_DIFFUSERS_SCHEDULE = {"cosine": "squaredcos_cap_v2"}
# The diffusers schedulers that step as one of our samplers does (tests/test_parity_diffusers.py), and the
# settings that make them do so; any other scheduler class is read as "ddim".
_DIFFUSERS_SCHEDULER = {"ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
                        "dpmpp_2m": ("DPMSolverMultistepScheduler",
                                     {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True,
                                      "final_sigmas_type": "zero", "thresholding": False})}


@dataclass(frozen=True)
class DiffusionConfig(JsonConfig):
    schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    prediction_type: str = "eps"
    variance_type: str = "fixed_small"
    spacing: str = "trailing"
    steps_offset: int = 0
    sampler: str = "ddim"
    num_inference_steps: Optional[int] = None  # None: diffusers' 50, or every timestep of a shorter schedule
    guidance_scale: float = 7.5

    def __post_init__(self):
        object.__setattr__(self, "schedule", SCHEDULE_ALIASES.get(self.schedule, self.schedule))
        object.__setattr__(self, "prediction_type", param.check_prediction_type(self.prediction_type))
        param.check_variance_type(self.variance_type)
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {self.spacing!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        self.build_schedule()  # validates the schedule name and length
        if self.num_inference_steps is not None:
            check_number("num_inference_steps", self.num_inference_steps, 1, self.num_timesteps, integer=True)
        check_number("guidance_scale", self.guidance_scale, 0)

    @property
    def default_steps(self) -> int:
        """The steps a pipeline takes when the caller names none."""
        return min(50, self.num_timesteps) if self.num_inference_steps is None else self.num_inference_steps

    def build_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_name(self.schedule, self.num_timesteps, beta_start=self.beta_start,
                                       beta_end=self.beta_end)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "DiffusionConfig":
        """From a diffusers scheduler_config.json (DDIM, DDPM, DPM-Solver, PNDM, Euler... share these fields)."""
        if d.get("trained_betas") is not None:
            raise ValueError("scheduler config with trained_betas is not supported")
        if d.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config with rescale_betas_zero_snr is not supported")
        variance = d.get("variance_type") or "fixed_small"
        return cls(schedule=d.get("beta_schedule", "linear"), num_timesteps=d.get("num_train_timesteps", 1000),
                   beta_start=d.get("beta_start", 0.0001), beta_end=d.get("beta_end", 0.02),
                   prediction_type=d.get("prediction_type", "epsilon"),
                   variance_type=variance if variance in param.VARIANCE_TYPES else "fixed_small",
                   spacing=d.get("timestep_spacing", "leading"), steps_offset=d.get("steps_offset", 0),
                   sampler=_sampler_from_diffusers(d))

    def to_diffusers(self) -> dict[str, Any]:
        """The scheduler config of the default sampler: DPMSolverMultistepScheduler (DPM-Solver++, order 2, last
        step to sigma 0) for "dpmpp_2m", else a DDIMScheduler (last step to x0, as our samplers: set_alpha_to_one)."""
        schedule = self.build_schedule()
        name, settings = _DIFFUSERS_SCHEDULER.get(self.sampler, _DIFFUSERS_SCHEDULER["ddim"])
        return {"_class_name": name, "num_train_timesteps": self.num_timesteps,
                "beta_schedule": _DIFFUSERS_SCHEDULE.get(self.schedule, self.schedule),
                "beta_start": float(schedule.betas[0]), "beta_end": float(schedule.betas[-1]),
                "prediction_type": _DIFFUSERS_PREDICTION[self.prediction_type], "timestep_spacing": self.spacing,
                "steps_offset": self.steps_offset, **settings}


def _sampler_from_diffusers(d: dict[str, Any]) -> str:
    """"dpmpp_2m" for a DPMSolverMultistepScheduler set up as DPM-Solver++(2M) with its last step to sigma 0, else
    "ddim" (the schedulers we have no equal of, such as PNDM or Euler, are sampled with DDIM)."""
    name, settings = _DIFFUSERS_SCHEDULER["dpmpp_2m"]
    if d.get("_class_name") == name and all(d.get(k, v) == v for k, v in settings.items()):
        return "dpmpp_2m"
    return "ddim"
