"""How a model was trained to be sampled: schedule, parameterization, variance, default timestep spacing, and
what its pipeline uses when the caller names none: the sampler (diffusers keeps this as the scheduler class),
the number of steps and the guidance scale (diffusers' defaults, 50 and 7.5, where a folder stores none)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

from ..config import JsonConfig, check_number
from ..sampling import SAMPLERS, get_sampler
from ..sampling.transforms import check_thresholding
from . import parameterization as param
from .denoiser import TIMESTEP_ROUNDINGS
from .grids import check_grid
from .schedule import SCHEDULE_ALIASES, NoiseSchedule

_DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_DIFFUSERS_SCHEDULE = {"cosine": "squaredcos_cap_v2"}
_DIFFUSERS_SIGMAS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
# diffusers' default timestep_spacing per scheduler class, where a config names none
_DIFFUSERS_SPACING = {"DDIMScheduler": "leading", "DDPMScheduler": "leading", "PNDMScheduler": "leading"}
_ALPHA_TO_ONE_DEFAULT = {"DDIMScheduler": True, "PNDMScheduler": False}
# the schedulers that clip x0 to [-clip_sample_range, clip_sample_range] unless told not to (clip_sample), and
# those (of the ones with an equal sampler here) that have dynamic thresholding of x0 (thresholding)
_CLIPS_BY_DEFAULT = ("DDPMScheduler", "DDIMScheduler")
_THRESHOLDS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
_LEARNED_VARIANCES = ("learned", "learned_range")
# The grid a diffusers spacing name means differs by scheduler family (ldm.diffusion.grids.spaced_timesteps)
_K_FAMILY = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
             "LMSDiscreteScheduler")
_MULTISTEP_FAMILY = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
_FAMILY_SPACINGS = {"k": {"linspace": "linspace_float"},
                    "multistep": {"leading": "leading_open", "linspace": "linspace_open"}}


def _family(class_name: Optional[str]) -> str:
    return "k" if class_name in _K_FAMILY else "multistep" if class_name in _MULTISTEP_FAMILY else "ddim"


@dataclass(frozen=True)
class DiffusionConfig(JsonConfig):
    schedule: str = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    zero_terminal_snr: bool = False  # Lin et al. 2024's rescaling (diffusers' rescale_betas_zero_snr)
    prediction_type: str = "eps"
    variance_type: str = "fixed_small"
    # the inference grid (ldm.diffusion.grids): spacing of the timesteps, optional sigma redistribution, last level
    spacing: str = "trailing"
    steps_offset: int = 0
    sigma_schedule: Optional[str] = None
    final: str = "zero"
    # the network sees the nearest ("nearest") or the lower ("floor") training timestep of a level between them,
    # as diffusers' DPM-Solver and UniPC feed integer timesteps (the levels themselves stay where they are)
    timestep_rounding: Optional[str] = None
    sampler: str = "ddim"
    num_inference_steps: Optional[int] = None  # None: diffusers' 50, or every timestep of a shorter schedule
    guidance_scale: float = 7.5
    # thresholding of x0 when the caller names none: None, "static", "dynamic" or a dict with options
    # (ldm.sampling.transforms.check_thresholding); diffusers' clip_sample and thresholding settings
    thresholding: Optional[dict] = None

    def __post_init__(self):
        object.__setattr__(self, "schedule", SCHEDULE_ALIASES.get(self.schedule, self.schedule))
        object.__setattr__(self, "prediction_type", param.check_prediction_type(self.prediction_type))
        param.check_variance_type(self.variance_type)
        check_grid(self.spacing, self.sigma_schedule, self.final)
        if self.timestep_rounding not in TIMESTEP_ROUNDINGS:
            raise ValueError("timestep_rounding must be one of null, 'nearest', 'floor'; "
                             f"got {self.timestep_rounding!r}")
        get_sampler(self.sampler)
        self.build_schedule()  # validates the schedule name and length
        if self.num_inference_steps is not None:
            check_number("num_inference_steps", self.num_inference_steps, 1, self.num_timesteps, integer=True)
        check_number("guidance_scale", self.guidance_scale, 0)
        object.__setattr__(self, "thresholding", check_thresholding(self.thresholding))

    @property
    def default_steps(self) -> int:
        """The steps a pipeline takes when the caller names none."""
        return min(50, self.num_timesteps) if self.num_inference_steps is None else self.num_inference_steps

    @property
    def grid(self) -> dict[str, Any]:
        """The grid settings as keyword arguments of ldm.sampling.sample / grids.noise_levels."""
        return {"spacing": self.spacing, "steps_offset": self.steps_offset, "sigma_schedule": self.sigma_schedule,
                "final": self.final}

    def build_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_name(self.schedule, self.num_timesteps, beta_start=self.beta_start,
                                       beta_end=self.beta_end, zero_terminal_snr=self.zero_terminal_snr)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "DiffusionConfig":
        """From a diffusers scheduler_config.json (DDIM, DDPM, DPM-Solver, PNDM, Euler... share these fields).
        The sampler is the registered one whose diffusers scheduler this is; a class with no equal here is
        sampled with ddim, with a warning naming it."""
        if d.get("trained_betas") is not None:
            raise ValueError("scheduler config with trained_betas is not supported")
        variance = d.get("variance_type") or "fixed_small"
        name = d.get("_class_name")
        if name == "DDPMScheduler" and variance not in ("fixed_small", *_LEARNED_VARIANCES):
            warnings.warn(f"DDPMScheduler's variance_type {variance!r} is sampled as fixed_small; for beta pass "
                          "sampler_options={'variance': 'fixed_large'}", stacklevel=2)
        thresholding = None
        if name in _THRESHOLDS and d.get("thresholding"):  # Imagen's dynamic thresholding, diffusers' cap on s
            thresholding = {"kind": "dynamic", "percentile": d.get("dynamic_thresholding_ratio", 0.995),
                            "max_value": d.get("sample_max_value", 1.0)}
        elif name in _CLIPS_BY_DEFAULT and d.get("clip_sample", True):
            thresholding = {"kind": "static", "limit": d.get("clip_sample_range", 1.0)}
        if name == "DDIMScheduler" and thresholding is not None:
            warnings.warn("diffusers' DDIMScheduler keeps the unthresholded eps after thresholding x0; here eps is "
                          "re-derived from the thresholded x0, so this folder samples slightly differently",
                          stacklevel=2)
        sigma_schedule = next((k for k, flag in _DIFFUSERS_SIGMAS.items() if d.get(flag)), None)
        # DDIM and PNDM end at alpha_bar = 1 unless set_alpha_to_one is false (PNDM's default); the sigma-based
        # schedulers end at sigma 0 unless final_sigmas_type is "sigma_min" (keys of other classes are ignored)
        if name in _ALPHA_TO_ONE_DEFAULT:
            final = "zero" if d.get("set_alpha_to_one", _ALPHA_TO_ONE_DEFAULT[name]) else "sigma_min"
        else:
            final = "sigma_min" if d.get("final_sigmas_type") == "sigma_min" else "zero"
        spacing = d.get("timestep_spacing") or _DIFFUSERS_SPACING.get(name, "linspace")
        spacing = _FAMILY_SPACINGS.get(_family(name), {}).get(spacing, spacing)
        rounding = None
        if _family(name) == "multistep" and sigma_schedule is not None:
            spacing = "linspace"  # they redistribute between the training grid's extremes, whatever the spacing
            rounding = _multistep_rounding(name, sigma_schedule, SCHEDULE_ALIASES.get(d.get("beta_schedule"),
                                                                                      d.get("beta_schedule")))
        return cls(schedule=d.get("beta_schedule", "linear"), num_timesteps=d.get("num_train_timesteps", 1000),
                   beta_start=d.get("beta_start", 0.0001), beta_end=d.get("beta_end", 0.02),
                   zero_terminal_snr=bool(d.get("rescale_betas_zero_snr", False)),
                   prediction_type=d.get("prediction_type", "epsilon"),
                   variance_type=variance if variance in param.VARIANCE_TYPES else "fixed_small",
                   spacing=spacing, steps_offset=d.get("steps_offset", 0), sigma_schedule=sigma_schedule,
                   final=final, timestep_rounding=rounding, sampler=_sampler_from_diffusers(d),
                   thresholding=thresholding)

    def _diffusers_spacing(self, name: str) -> str:
        """The timestep_spacing that means this grid in the diffusers class `name`; a warning where none does."""
        family = _family(name)
        if family == "multistep" and self.sigma_schedule is not None:
            if self.spacing != "linspace":
                _unequal_grid(name, f"spreads {self.sigma_schedule} sigmas over the whole training range, not over "
                                    f"the {self.spacing} timesteps")
            theirs = _multistep_rounding(name, self.sigma_schedule, self.schedule)
            if self.timestep_rounding != theirs:
                _unequal_grid(name, f"feeds the network the {theirs} timesteps of these sigmas, not "
                                    f"{self.timestep_rounding or 'fractional'} ones")
            return "linspace"
        if self.timestep_rounding:
            _unequal_grid(name, "does not round timesteps")
        names = {ours: theirs for theirs, ours in _FAMILY_SPACINGS.get(family, {}).items()}
        if self.spacing in names:
            return names[self.spacing]
        if self.spacing in _FAMILY_SPACINGS.get(family, {}) or self.spacing not in ("leading", "trailing", "linspace"):
            nearest = self.spacing.split("_")[0]
            _unequal_grid(name, f"has no spacing equal to {self.spacing!r}; writing {nearest!r}")
            return nearest
        return self.spacing

    def to_diffusers(self) -> dict[str, Any]:
        """The scheduler config of the default sampler's diffusers equal (a DDIMScheduler for a sampler that
        has none), with this config's schedule and grid."""
        betas = NoiseSchedule.from_name(self.schedule, self.num_timesteps, beta_start=self.beta_start,
                                        beta_end=self.beta_end).betas  # before any zero-SNR rescaling
        spec = get_sampler(self.sampler)
        name, settings = spec.diffusers or SAMPLERS["ddim"].diffusers
        if spec.diffusers_differs:
            warnings.warn(f"writing {name} for {spec.name}, which differs from it: {spec.diffusers_differs}",
                          stacklevel=2)
        out = {"_class_name": name, "num_train_timesteps": self.num_timesteps,
               "beta_schedule": _DIFFUSERS_SCHEDULE.get(self.schedule, self.schedule),
               "beta_start": self.beta_start if self.beta_start is not None else float(betas[0]),
               "beta_end": self.beta_end if self.beta_end is not None else float(betas[-1]),
               "rescale_betas_zero_snr": self.zero_terminal_snr,
               "prediction_type": _DIFFUSERS_PREDICTION[self.prediction_type],
               "timestep_spacing": self._diffusers_spacing(name), "steps_offset": self.steps_offset, **settings}
        if name in _ALPHA_TO_ONE_DEFAULT:
            out["set_alpha_to_one"] = self.final == "zero"
        else:
            out["final_sigmas_type"] = self.final
        if self.sigma_schedule is not None:
            out[_DIFFUSERS_SIGMAS[self.sigma_schedule]] = True
        if self.variance_type in _LEARNED_VARIANCES or name == "DDPMScheduler":
            out["variance_type"] = self.variance_type
        th = self.thresholding or {}
        if name in _CLIPS_BY_DEFAULT:
            out["clip_sample"] = th.get("kind") == "static"
            if out["clip_sample"]:
                out["clip_sample_range"] = th.get("limit", 1.0)
        unwritable = th.get("kind") == "static" and name not in _CLIPS_BY_DEFAULT or \
            th.get("kind") == "dynamic" and name not in _THRESHOLDS
        if unwritable:
            warnings.warn(f"no setting of diffusers' {name} is this model's {th['kind']} thresholding; the folder is "
                          "written without it", stacklevel=2)
        elif th.get("kind") == "dynamic":  # no cap on s here is a cap diffusers never reaches
            out.update(thresholding=True, dynamic_thresholding_ratio=th.get("percentile", 0.995),
                       sample_max_value=th.get("max_value") or 1e9)
        return out


def _multistep_rounding(name: str, sigma_schedule: str, schedule: Optional[str]) -> str:
    """How diffusers' DPM-Solver / UniPC turn the fractional timesteps of redistributed sigmas into integers:
    rounded for Karras sigmas (DPM-Solver: except on the cosine schedule), else truncated by the int64 cast."""
    rounds = sigma_schedule == "karras" and (name != "DPMSolverMultistepScheduler" or schedule != "cosine")
    return "nearest" if rounds else "floor"


def _unequal_grid(name: str, what: str) -> None:
    warnings.warn(f"diffusers' {name} {what}; the diffusers folder will sample on a slightly different grid",
                  stacklevel=4)


def _sampler_from_diffusers(d: dict[str, Any]) -> str:
    """The registered sampler whose diffusers scheduler (class and settings) the config is; else "ddim", with a
    warning naming the class (a scheduler we have no equal of yet, such as PNDM or Euler)."""
    name = d.get("_class_name")
    differing = []
    for spec in SAMPLERS.values():
        if spec.diffusers and spec.diffusers[0] == name:
            off = [f"{k}={d[k]!r}" for k, v in spec.diffusers[1].items() if d.get(k, v) != v]
            if not off:
                if spec.diffusers_differs:
                    warnings.warn(f"sampling the diffusers scheduler {name} with {spec.name}, which differs from it: "
                                  f"{spec.diffusers_differs}", stacklevel=3)
                return spec.name
            differing += off
    why = f" with {', '.join(dict.fromkeys(differing))}" if differing else ""
    warnings.warn(f"the diffusers scheduler {name}{why}, as configured, has no equal sampler here; sampling "
                  "with ddim", stacklevel=3)
    return "ddim"
