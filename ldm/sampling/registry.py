"""The sampler registry: the one place a sampler is announced. An entry names its function, its options (each
with a default and a check), the diffusers scheduler it equals (class and the settings that make it so) and a
display name; `sample()`, the pipelines, the CLI and the model-folder reader all read it from here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ..config import is_int, is_number
from ..diffusion import parameterization as param
from . import dpm_solvers, k_samplers, plms, samplers, unipc


@dataclass(frozen=True)
class Option:
    default: Any
    check: Callable[[Any], bool]
    expected: str  # what a valid value is, for the error message


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    display: str
    options: Mapping[str, Option] = field(default_factory=dict)
    # (class name, settings) of the diffusers scheduler that steps as this sampler does, if any
    diffusers: Optional[tuple[str, Mapping[str, Any]]] = None
    # where that scheduler is the nearest diffusers has but not equal: how it differs (warned on read and write)
    diffusers_differs: Optional[str] = None

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; an unknown name or a bad value is a ValueError naming both."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ValueError(f"sampler {self.name!r} has no option {unknown[0]!r} (its options: {known})")
        values = {}
        for name, opt in self.options.items():
            value = options.get(name, opt.default)
            if not opt.check(value):
                raise ValueError(f"{name} must be {opt.expected} (an option of sampler {self.name!r}); got {value!r}")
            values[name] = value
        return values


def _number_at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and v >= low


def _positive(v) -> bool:
    return is_number(v) and v > 0


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: is_int(v) and v >= low


def _bool(v) -> bool:
    return isinstance(v, bool)


SAMPLERS: dict[str, SamplerSpec] = {}


def register(spec: SamplerSpec) -> SamplerSpec:
    if spec.name in SAMPLERS:
        raise ValueError(f"sampler {spec.name!r} is already registered")
    SAMPLERS[spec.name] = spec
    return spec


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    return SAMPLERS[name]


register(SamplerSpec(
    "ddpm", samplers.ddpm, "DDPM (ancestral)",
    options={"variance": Option("fixed_small", lambda v: v in param.FIXED_VARIANCE_TYPES,
                                f"one of {', '.join(param.FIXED_VARIANCE_TYPES)}")},
    diffusers=("DDPMScheduler", {})))
register(SamplerSpec(
    "ddim", samplers.ddim, "DDIM", options={"eta": Option(0.0, _number_at_least(0), "a number >= 0")},
    diffusers=("DDIMScheduler", {})))
register(SamplerSpec(
    "langevin", samplers.langevin, "Predictor-corrector (annealed Langevin)",
    options={"n_corrector": Option(1, _int_at_least(0), "an integer >= 0"),
             "snr": Option(0.16, _positive, "a number > 0")}))
register(SamplerSpec(
    "plms", plms.plms, "PLMS (PNDM)", diffusers=("PNDMScheduler", {"skip_prk_steps": True})))
register(SamplerSpec("euler", k_samplers.euler, "Euler",
                     diffusers=("EulerDiscreteScheduler", {"interpolation_type": "linear", "sigma_min": None,
                                                           "sigma_max": None, "timestep_type": "discrete"})))
register(SamplerSpec(
    "euler_ancestral", k_samplers.euler_ancestral, "Euler ancestral",
    options={"eta": Option(1.0, _number_at_least(0), "a number >= 0")},
    diffusers=("EulerAncestralDiscreteScheduler", {})))
register(SamplerSpec("heun", k_samplers.heun, "Heun", diffusers=("HeunDiscreteScheduler", {"clip_sample": False})))
register(SamplerSpec(
    "lms", k_samplers.lms, "LMS", options={"order": Option(4, lambda v: is_int(v) and 1 <= v <= 4, "1, 2, 3 or 4")},
    diffusers=("LMSDiscreteScheduler", {})))
_SOLVER_TYPE = Option("midpoint", lambda v: v in ("midpoint", "heun"), "'midpoint' or 'heun'")
_DPM = {"solver_type": "midpoint", "euler_at_final": False, "use_lu_lambdas": False,
        "variance_type": None}
register(SamplerSpec(
    "dpmpp_2m", dpm_solvers.dpmpp_2m, "DPM-Solver++(2M)",
    options={"lower_order_final": Option(True, _bool, "true or false"), "solver_type": _SOLVER_TYPE},
    diffusers=("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, **_DPM})))
register(SamplerSpec(
    "dpmpp_2m_sde", dpm_solvers.dpmpp_2m_sde, "DPM-Solver++(2M) SDE",
    options={"eta": Option(1.0, _number_at_least(0), "a number >= 0"),
             "lower_order_final": Option(True, _bool, "true or false"), "solver_type": _SOLVER_TYPE},
    diffusers=("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_DPM})))
register(SamplerSpec(
    "dpmpp_3m_sde", dpm_solvers.dpmpp_3m_sde, "DPM-Solver++(3M) SDE",
    options={"eta": Option(1.0, _number_at_least(0), "a number >= 0"),
             "lower_order_final": Option(True, _bool, "true or false"), "solver_type": _SOLVER_TYPE},
    diffusers=("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, **_DPM}),
    diffusers_differs="its third-order SDE update adds alpha_t D2 to the exact integral's (ldm.sampling.dpm_solvers)"))
register(SamplerSpec(
    "unipc", unipc.unipc, "UniPC",
    options={"order": Option(2, lambda v: is_int(v) and 1 <= v <= 3, "1, 2 or 3"),
             "solver_type": Option("bh2", lambda v: v in ("bh1", "bh2"), "'bh1' or 'bh2'"),
             "predict_x0": Option(True, _bool, "true or false"),
             "corrector": Option(True, _bool, "true or false"),
             "lower_order_final": Option(True, _bool, "true or false")},
    diffusers=("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2", "predict_x0": True,
                                           "lower_order_final": True, "disable_corrector": [], "solver_p": None,
                                           "use_flow_sigmas": False})))
