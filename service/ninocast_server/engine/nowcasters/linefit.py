"""Linefit: a least-squares line through each weight's ctx snapshots, extrapolated k intervals ahead."""

from __future__ import annotations

import torch
from torch import Tensor

from ninocast.spec import ModelSpec

from .base import Nowcaster


def line_weights(ctx: int, k: int) -> Tensor:
    """w such that states @ w is the fitted line at x = ctx - 1 + k (snapshots at x = 0 .. ctx-1)."""
    x = torch.arange(ctx, dtype=torch.float64)
    xc = x - x.mean()
    target = ctx - 1 + k - x.mean()
    w = 1.0 / ctx + xc * target / (xc * xc).sum()
    return w


class Linefit(Nowcaster):
    kind = "linefit"

    def __init__(self, name: str = "linefit", ctx: int = 5, horizon: int = 40) -> None:
        if ctx < 2:
            raise ValueError("linefit needs at least 2 states to fit a line")
        self.name, self.ctx, self.horizon = name, ctx, horizon

    def predict(self, states: Tensor, k: int, spec: ModelSpec, graph=None, *, overwrite_states: bool = False) -> Tensor:
        w = line_weights(states.shape[1], k).to(states.device, states.dtype)
        return states @ w
