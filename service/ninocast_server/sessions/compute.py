"""The job a worker runs for one nowcast: read the states from disk, call the engine, fall back on CUDA OOM."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ninocast.spec import ModelSpec

from .errors import ServiceError
from .registry import NowcasterRegistry
from .safetensors_io import load_states

if TYPE_CHECKING:
    from ..engine.graphs.cache import GraphCache

log = logging.getLogger("ninocast.compute")


@dataclass(frozen=True)
class NowcastJob:
    spec: ModelSpec
    nowcaster: str
    ctx: int
    k: int
    paths: tuple[Path, ...]  # the newest ctx states, oldest first


@dataclass
class NowcastResult:
    flat: Tensor  # (P,) float32 on the CPU
    device: str
    load_s: float
    compute_s: float


def estimate_bytes(spec: ModelSpec, ctx: int) -> int:
    """Rough peak memory of one nowcast. Small graphs: the states, their scaled copy, edge features and the
    output. Large ones (streamed graphs, issue #16): the states (scaled in place), the output and its encoding;
    the graph and the GNN's buffers are node- and chunk-sized."""
    from ..engine.graphs.stream import STREAM_MIN_EDGES

    if spec.n_params >= STREAM_MIN_EDGES:
        return spec.n_params * 4 * (ctx + 2)
    return spec.n_params * 4 * (3 * ctx + 4)


def run_nowcast(job: NowcastJob, registry: NowcasterRegistry, graphs: "GraphCache | Any", device: str) -> NowcastResult:
    """Runs on a queue worker thread, never on the event loop."""
    from ..engine import runner  # the engine's import chain is heavy; the app imports without it
    from ..engine.nowcasters.base import NowcastError

    t0 = time.perf_counter()
    reads_16bit = registry.for_session(job.nowcaster, job.ctx, device).reads_16bit
    try:
        states = load_states(job.paths, job.spec, keep_16bit=reads_16bit)
    except FileNotFoundError:
        raise ServiceError(409, "states_changed", "a newer upload replaced the states while the nowcast waited; "
                           "retry the nowcast") from None
    t1 = time.perf_counter()
    try:
        try:
            flat = runner.nowcast(registry.for_session(job.nowcaster, job.ctx, device), job.spec, states, job.k,
                                  graph_cache=graphs, consume_states=True)  # a GPU run scales its own copy
        except torch.cuda.OutOfMemoryError:
            log.warning("CUDA out of memory on %s for %d parameters; nowcasting on the CPU", device,
                        job.spec.n_params)
            torch.cuda.empty_cache()
            device = "cpu"
            flat = runner.nowcast(registry.for_session(job.nowcaster, job.ctx, "cpu"), job.spec, states, job.k,
                                  graph_cache=graphs, consume_states=True)
    except NowcastError as e:
        raise ServiceError(422, "nowcast_rejected", str(e)) from None
    except FloatingPointError as e:
        raise ServiceError(422, "nonfinite_prediction", f"{e}; the trajectory may be degenerate") from None
    return NowcastResult(flat, device, t1 - t0, time.perf_counter() - t1)
