"""Renaming state-dict keys by module prefix, with errors that name what did not match."""
from __future__ import annotations

from typing import Mapping

import torch


def rename_by_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: Mapping[str, str],
                     what: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename every key whose module prefix is in `prefixes` (the longest match wins); a key that matches
    none is an error listing (up to 10 of) them."""
    out, unmatched = {}, []
    for key, value in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in prefixes:
                out[".".join([prefixes[head]] + parts[cut:])] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"{what}: {len(unmatched)} unexpected keys, e.g. {', '.join(unmatched[:10])}")
    return out


def load_exact(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with a ValueError naming missing and unexpected keys and shape mismatches."""
    load_exact_check(module.state_dict(), state_dict, what)
    module.load_state_dict(state_dict, strict=True)


def load_exact_check(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """The ValueError of load_exact: missing and unexpected keys and shape mismatches, named."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit the model: missing {missing[:10]} ({len(missing)}), "
                         f"unexpected {unexpected[:10]} ({len(unexpected)}), shape mismatch {wrong[:10]}")


def load_onto_meta(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Give a module built on the meta device the loaded tensors themselves (load_state_dict with assign=True,
    cast to the module's dtypes), checked as load_exact checks; non-persistent buffers, which no file holds (the
    VQ codebook's usage counters), start at zero. No memory is allocated and filled twice, and no meta-tensor op
    runs: `to_empty` would import sympy through torch's meta kernels, about 1 s of start-up."""
    own = module.state_dict()
    load_exact_check(own, state_dict, what)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    for part in module.modules():
        for name, buffer in part._buffers.items():
            if buffer is not None and buffer.is_meta:
                part._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    return module
