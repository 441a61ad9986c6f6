"""What a network predicts (eps, x0 or v) and how the reverse-process variance is chosen."""
from __future__ import annotations

import torch

from . import process

Tensor = torch.Tensor

PREDICTION_TYPES = ("eps", "x0", "v")
# diffusers' names for the same parameterizations (scheduler_config.json "prediction_type").
PREDICTION_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
FIXED_VARIANCE_TYPES = VARIANCE_TYPES[:2]


def check_prediction_type(prediction_type: str) -> str:
    """Canonical name of a parameterization; diffusers' names are accepted too."""
    key = PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if key not in PREDICTION_TYPES:
        allowed = ", ".join(PREDICTION_TYPES + tuple(PREDICTION_ALIASES))
        raise ValueError(f"prediction_type must be one of {allowed}; got {prediction_type!r}")
    return key


def check_variance_type(variance_type: str, allowed: tuple[str, ...] = VARIANCE_TYPES) -> str:
    if variance_type not in allowed:
        raise ValueError(f"variance_type must be one of {', '.join(allowed)}; got {variance_type!r}")
    return variance_type


def to_x0_eps(output: Tensor, x_t: Tensor, alpha_bar, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Turn a network output in the given parameterization into (x0, eps)."""
    if prediction_type == "eps":
        return process.x0_from_eps(x_t, output, alpha_bar), output
    if prediction_type == "x0":
        return output, process.eps_from_x0(x_t, output, alpha_bar)
    if prediction_type == "v":
        return process.x0_from_v(x_t, output, alpha_bar), process.eps_from_v(x_t, output, alpha_bar)
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def training_target(x0: Tensor, eps: Tensor, alpha_bar, prediction_type: str) -> Tensor:
    """What the network should output for the pair (x0, eps) that made x_t."""
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":
        return process.v_from_x0_eps(x0, eps, alpha_bar)
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")


def fixed_log_variance(variance_type: str, alpha_bar, alpha_bar_prev) -> Tensor:
    """log sigma_t^2 of p(x_prev | x_t) for the fixed choices (Ho et al. sec. 3.2), float64:
    fixed_small = beta~ (clamped at 1e-20 where it is 0, the step to x0), fixed_large = beta."""
    if variance_type == "fixed_small":
        return process.posterior_variance(alpha_bar, alpha_bar_prev).clamp(min=1e-20).log()
    if variance_type == "fixed_large":
        return process.step_beta(alpha_bar, alpha_bar_prev).log()
    raise ValueError(f"variance_type must be one of {', '.join(FIXED_VARIANCE_TYPES)}; got {variance_type!r}")


def interpolated_log_variance(frac: Tensor, min_log, max_log) -> Tensor:
    """Learned range (Nichol & Dhariwal eq. 15): log Sigma = v log beta + (1 - v) log beta~."""
    return frac * process._bc(max_log, frac) + (1 - frac) * process._bc(min_log, frac)
