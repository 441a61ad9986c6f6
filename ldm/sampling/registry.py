"""The sampler registry: the one place a sampler is announced. An entry names its function, its options (each
with a default and a check), the diffusers scheduler it equals (class and the settings that make it so) and a
display name; `sample()`, the pipelines, the CLI and the model-folder reader all read it from here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ..config import is_int, is_number
from ..diffusion import parameterization as param
from . import samplers


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
                                f"one of {', '.join(param.FIXED_VARIANCE_TYPES)}")}))
register(SamplerSpec(
    "ddim", samplers.ddim, "DDIM", options={"eta": Option(0.0, _number_at_least(0), "a number >= 0")},
    diffusers=("DDIMScheduler", {"clip_sample": False})))
register(SamplerSpec(
    "langevin", samplers.langevin, "Predictor-corrector (annealed Langevin)",
    options={"n_corrector": Option(1, _int_at_least(0), "an integer >= 0"),
             "snr": Option(0.16, _positive, "a number > 0")}))
register(SamplerSpec(
    "dpmpp_2m", samplers.dpmpp_2m, "DPM-Solver++(2M)",
    options={"lower_order_final": Option(True, _bool, "true or false")},
    diffusers=("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                               "thresholding": False})))
