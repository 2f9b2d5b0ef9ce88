"""One nowcast of a session, as one service call: plan, run, encode, record.

* plan: the session's newest ctx states and k (given, or the schedule's at the newest step), checked here;
* run: on a compute-queue worker (never the event loop): the states from disk, then ``engine.runner.nowcast``
  on the worker's device, on the CPU again after a CUDA out-of-memory error;
* encode: the prediction as a safetensors body in the dtype asked for (still on the worker);
* record: the nowcast's timings appended to the session's history, on a thread, while the answer is sent.

The route (api/routes_sessions.py) only parses the request, calls ``nowcast`` and streams the result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ninocast.schedule import k_at_step
from ninocast.spec import ModelSpec

from ..engine.nowcasters.base import NowcastError, check_k
from .errors import ServiceError
from .queue import ComputeQueue
from .registry import NowcasterRegistry
from .safetensors_io import DTYPE_NAMES, dtypes_of, encode, load_states
from .store import Session, SessionStore

if TYPE_CHECKING:
    from ..engine.graphs.cache import GraphCache

log = logging.getLogger("ninocast.compute")


@dataclass(frozen=True)
class NowcastResult:
    """A finished nowcast: the safetensors body (header + data) and what produced it."""

    head: bytes
    data: memoryview
    k: int
    steps: list[int]  # the states it read, oldest first
    nowcaster: str
    device: str  # where it ran (a CUDA nowcast that ran out of memory says cpu)
    load_s: float  # reading the states from disk
    compute_s: float  # the engine
    total_s: float  # from the call to the encoded body, queue wait included


def estimate_bytes(spec: ModelSpec, ctx: int) -> int:
    """Rough peak memory of one nowcast. Small graphs: the states, their scaled copy, edge features and the
    output. Large ones (streamed graphs, issue #16): the states (scaled in place), the output and its encoding;
    the graph and the GNN's buffers are node- and chunk-sized."""
    from ..engine.graphs.stream import STREAM_MIN_EDGES

    if spec.n_params >= STREAM_MIN_EDGES:
        return spec.n_params * 4 * (ctx + 2)
    return spec.n_params * 4 * (3 * ctx + 4)


async def nowcast(store: SessionStore, registry: NowcasterRegistry, queue: ComputeQueue,
                  graphs: "GraphCache | None", owner: str, session_id: str, k: int | None = None,
                  dtype: str = "float32") -> NowcastResult:
    """Nowcast session ``session_id`` of ``owner`` from its newest ctx states, ``k`` intervals ahead; the body
    holds the spec's tensors in ``dtype`` ('uploaded': each tensor's dtype in the newest state). Raises
    ServiceError (404, 409, 422, 503) for what cannot be served."""
    t0 = time.perf_counter()
    s = store.get(owner, session_id)
    steps, k = plan(s, registry, k)
    paths = [s.state_path(x) for x in steps]
    meta = {"format": "pt", "ninocast.k": str(k), "ninocast.step": str(steps[-1]), "ninocast.nowcaster": s.nowcaster}

    def work(device: str) -> tuple[bytes, memoryview, str, float, float]:
        flat, device, load_s, compute_s = _run(s, paths, k, registry, graphs, device)
        head, data = encode(flat, s.spec, DTYPE_NAMES.get(dtype) or dtypes_of(paths[-1], s.spec), meta)
        return head, data, device, load_s, compute_s

    head, data, device, load_s, compute_s = await queue.run(owner, work, estimate_bytes(s.spec, s.ctx))
    res = NowcastResult(head, data, k, steps, s.nowcaster, device, load_s, compute_s, time.perf_counter() - t0)
    entry = {"at": time.time(), "k": k, "steps": steps, "device": device, "load_s": round(load_s, 6),
             "compute_s": round(compute_s, 6), "total_s": round(res.total_s, 6)}
    asyncio.get_running_loop().run_in_executor(None, store.add_nowcast, s, entry)  # not awaited: the answer goes now
    return res


def plan(s: Session, registry: NowcasterRegistry, k: int | None) -> tuple[list[int], int]:
    """(the newest ctx steps, k): 409 while fewer than ctx states are held, 422 for a k the nowcaster cannot
    predict (checked before the job queues, not on the worker)."""
    steps = s.newest_steps(s.ctx)
    if len(steps) < s.ctx:
        raise ServiceError(409, "too_few_states", f"session {s.id} holds {len(steps)} state(s) "
                           f"(steps {steps}); a nowcast needs ctx={s.ctx}: upload {s.ctx - len(steps)} more")
    horizon = registry.get(s.nowcaster).horizon
    if k is None:
        k = k_at_step(steps[-1], s.max_train_steps, s.period, horizon)
    try:
        return steps, check_k(k, horizon)
    except NowcastError as e:
        raise ServiceError(422, "invalid_k", str(e)) from None


def _run(s: Session, paths: list[Path], k: int, registry: NowcasterRegistry, graphs: "GraphCache | Any",
         device: str) -> tuple[torch.Tensor, str, float, float]:
    """On a queue worker: (prediction (P,) float32 on the CPU, the device it ran on, load s, compute s)."""
    from ..engine import runner  # the engine's import chain is heavy; the app imports without it

    t0 = time.perf_counter()
    reads_16bit = registry.for_session(s.nowcaster, s.ctx, device).reads_16bit
    try:
        states = load_states(paths, s.spec, keep_16bit=reads_16bit)
    except FileNotFoundError:
        raise ServiceError(409, "states_changed", "a newer upload replaced the states while the nowcast waited; "
                           "retry the nowcast") from None
    t1 = time.perf_counter()
    try:
        try:
            flat = runner.nowcast(registry.for_session(s.nowcaster, s.ctx, device), s.spec, states, k,
                                  graph_cache=graphs, consume_states=True,  # a GPU run scales its own copy
                                  spacing=s.spacing)
        except torch.cuda.OutOfMemoryError:
            log.warning("CUDA out of memory on %s for %d parameters; nowcasting on the CPU", device, s.spec.n_params)
            torch.cuda.empty_cache()
            device = "cpu"
            flat = runner.nowcast(registry.for_session(s.nowcaster, s.ctx, "cpu"), s.spec, states, k,
                                  graph_cache=graphs, consume_states=True, spacing=s.spacing)
    except NowcastError as e:
        raise ServiceError(422, "nowcast_rejected", str(e)) from None
    except FloatingPointError as e:
        raise ServiceError(422, "nonfinite_prediction", f"{e}; the trajectory may be degenerate") from None
    return flat, device, t1 - t0, time.perf_counter() - t1
