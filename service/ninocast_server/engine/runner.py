"""One nowcast, start to end: check the request, fetch the spec's graph, run the nowcaster."""

from __future__ import annotations

import torch
from torch import Tensor

from ninocast.spec import ModelSpec

from .graphs import GraphCache
from .nowcasters.base import Nowcaster, NowcastError, all_finite, check_k

default_graph_cache = GraphCache()


def check_request(model: Nowcaster, spec: ModelSpec, states: Tensor, k: int) -> None:
    """Raise NowcastError naming what is wrong with a request before any work is done."""
    if spec.family not in model.families:
        raise NowcastError(f"nowcaster {model.name!r} does not support family {spec.family!r}")
    if states.dim() != 2 or states.shape[0] != spec.n_params:
        raise NowcastError(f"states must have shape ({spec.n_params}, {model.ctx}), got {tuple(states.shape)}")
    if states.shape[1] != model.ctx:
        raise NowcastError(f"nowcaster {model.name!r} needs {model.ctx} states, got {states.shape[1]}")
    check_k(k, model.horizon)
    if not states.is_floating_point():
        raise NowcastError(f"states must be floating point, got {states.dtype}")


@torch.inference_mode()
def nowcast(model: Nowcaster, spec: ModelSpec, states: Tensor, k: int,
            graph_cache: GraphCache | None = None, *, consume_states: bool = False,
            spacing: int | None = None) -> Tensor:
    """(P, ctx) states, oldest first -> (P,) float32 predicted parameters on the CPU. 16-bit states stay 16-bit
    for nowcasters that read them (half the memory of a float32 copy: what makes a 1B model fit in 20 GB).

    ``consume_states``: the caller no longer needs ``states``, so the nowcaster may overwrite them (scaling in
    place saves a (P, ctx) copy). A float32 copy on another device or dtype is always used as scratch.

    ``spacing``: optimiser steps between the states (period / ctx), when known; a routed nowcaster picks its
    member by it."""
    model = model.for_run(spec, spacing)
    check_request(model, spec, states, k)
    if not all_finite(states):
        raise NowcastError("states contain NaN or Inf")
    graph = None
    if model.needs_graph:
        cache = graph_cache if graph_cache is not None else default_graph_cache  # an empty cache is falsy
        graph = cache.get(spec, with_lpe=model.needs_lpe)
        if graph.pos_w.device != model.device:
            graph = graph.to(model.device)
    keep = model.reads_16bit and states.dtype in (torch.bfloat16, torch.float16)
    x = states.to(model.device, states.dtype if keep else torch.float32)
    scratch = {"overwrite_states": consume_states or x is not states} if model.scratch_states else {}
    out = model.predict(x, k, spec, graph, **scratch)
    return out.to("cpu", torch.float32)
