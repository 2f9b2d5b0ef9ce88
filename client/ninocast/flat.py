"""Named tensors <-> the flat parameter vector of a spec, with the checks every entry point needs.

The CLI, the server and the client all receive parameters as ``{name: tensor}`` (a state dict or a
safetensors file) and hand the engine flat vectors; this module is the one place that converts and validates.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .spec import ModelSpec

# The one definition of the dtypes a parameter state may have, wherever it is read: the client's snapshots, the
# server's uploads (safetensors names as keys), the CLI's state files. float64 is not among them: the engine
# computes in float32, so a float64 model's snapshots are sent as float32 (``state_dtype``).
STATE_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
ACCEPTED_DTYPES = tuple(STATE_DTYPES.values())
ACCEPTED_NAMES = "float32, bfloat16 or float16"
SAFETENSORS_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # the API's dtype names
# What a nowcast's answer may be asked in (POST .../nowcast ``dtype``): an accepted dtype, or each tensor's own.
NOWCAST_DTYPES = (*SAFETENSORS_NAMES, "uploaded")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` travels in: itself when accepted, float32 for float64 (what the engine
    computes in anyway); any other dtype is returned as it is, for ``check_state`` to refuse by name."""
    return torch.float32 if dtype == torch.float64 else dtype


class StateError(ValueError):
    """A parameter state that does not match its spec; the message names the tensor."""


def check_state(tensors: Mapping[str, Tensor], spec: ModelSpec, where: str = "state") -> None:
    """Every spec name present, right shape, floating dtype, finite values. Extra names are allowed."""
    missing = [n for n in spec.names if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise StateError(f"{where}: missing parameters {missing[:5]}{more}")
    for p in spec.layout:
        t = tensors[p.name]
        if tuple(t.shape) != p.shape:
            raise StateError(f"{where}: {p.name} has shape {list(t.shape)}, the spec says {list(p.shape)}")
        if t.dtype not in ACCEPTED_DTYPES:
            raise StateError(f"{where}: {p.name} has dtype {t.dtype}; expected {ACCEPTED_NAMES} "
                             f"(a float64 model's snapshots are sent as float32)")
        if not torch.isfinite(t).all():
            raise StateError(f"{where}: {p.name} contains NaN or Inf")


def flatten(tensors: Mapping[str, Tensor], spec: ModelSpec, out: Tensor | None = None) -> Tensor:
    """Concatenate the spec's tensors (float32, row-major) into ``out`` (P,) or a new vector."""
    if out is None:
        out = torch.empty(spec.n_params, dtype=torch.float32)
    for p in spec.layout:
        out[p.start : p.stop].copy_(tensors[p.name].detach().reshape(-1))
    return out


def unflatten(vec: Tensor, spec: ModelSpec, dtypes: Mapping[str, torch.dtype] | None = None,
              dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Split a flat vector into named tensors; each gets ``dtypes[name]``, else ``dtype``, else vec's dtype."""
    out = {}
    for p in spec.layout:
        d = (dtypes or {}).get(p.name, dtype or vec.dtype)
        out[p.name] = vec[p.start : p.stop].reshape(p.shape).to(d).contiguous()
    return out
