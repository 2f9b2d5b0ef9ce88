"""What the client tests compare against: parameters by name, and the engine's linefit nowcast of a window."""

from __future__ import annotations

import torch
from torch import nn

from ninocast.flat import flatten, unflatten
from ninocast.spec import ModelSpec


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def engine_nowcast(spec: ModelSpec, window: list[dict], k: int) -> dict[str, torch.Tensor]:
    """The offline answer: the engine's linefit on the same snapshots."""
    from ninocast_server.engine import nowcast
    from ninocast_server.engine.nowcasters.linefit import Linefit

    states = torch.stack([flatten(w, spec) for w in window], dim=1)
    return unflatten(nowcast(Linefit(), spec, states, k), spec)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Exactly equal, name by name (b cast to a's dtype)."""
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name].to(a[name].dtype), rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
