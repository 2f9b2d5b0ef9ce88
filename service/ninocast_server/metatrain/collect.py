"""Collect training trajectories: train tasks with AdamW and record the flat parameters every ``interval`` steps.

A run is (task, seed, learning rate). It is deterministic per seed: the task builds its model from the seed and
yields the same batches for it, and the global torch RNG is seeded with it. Snapshots are taken at steps
0, interval, 2*interval, ... up to the run's step count, each with the task's metrics (``evaluate``).

Resuming: a complete run is skipped; a partial run continues from its last shard (every shard also writes
``resume.pt``: model, optimiser and RNG state, and the step) by replaying the task's batch stream up to that
step; a partial run without a usable resume point is restarted from step 0, which by determinism rebuilds the
same trajectory. A run whose parameters become NaN/Inf stops there and is marked ``diverged``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ninocast.spec import ModelSpec

from ..tasks.base import Task
from .store import TrajectoryStore, estimate_bytes, human_bytes, run_id_for

RESUME = "resume.pt"


@dataclass(frozen=True)
class RunPlan:
    task: Task
    seed: int
    lr: float
    steps: int
    run_id: str


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def plan_runs(tasks: Sequence[Task], seeds: Sequence[int], lr_scales: Sequence[float] = (1.0,),
              steps: int | None = None) -> list[RunPlan]:
    plans = []
    for task in tasks:
        for seed in seeds:
            for scale in lr_scales:
                lr = float(task.lr) * float(scale)
                n = int(steps if steps is not None else task.budget)
                plans.append(RunPlan(task, int(seed), lr, n, run_id_for(task.name, int(seed), lr)))
    return plans


def _snapshot_steps(n_steps: int, interval: int) -> list[int]:
    return list(range(0, n_steps + 1, interval))


def _metrics(task: Task, model: nn.Module, enabled: bool) -> dict[str, float] | None:
    if not enabled:
        return None
    out = task.evaluate(model)
    model.train()
    return {str(k): float(v) for k, v in out.items()}


def collect(tasks: Sequence[Task], seeds: Sequence[int], store_dir: str | Path, *, lr_scales: Sequence[float] = (1.0,),
            steps: int | None = None, interval: int = 200, dtype: str = "float16", shard_snapshots: int = 10,
            evaluate: bool = True, progress: bool = True, log: Callable[[str], None] | None = None,
            stop_after: int | None = None) -> TrajectoryStore:
    """Run every (task, seed, lr scale) and record it into the store at ``store_dir``; returns the store.

    ``stop_after`` (tests only) stops the whole collection after that many optimiser steps, as a crash would."""
    log = log or (lambda s: print(s, file=sys.stderr))
    if interval < 1:
        raise ValueError(f"interval must be positive, got {interval}")
    if shard_snapshots < 1:
        raise ValueError(f"shard_snapshots must be positive, got {shard_snapshots}")
    store = TrajectoryStore.create(store_dir, dtype)
    plans = plan_runs(tasks, seeds, lr_scales, steps)
    # size estimate: one model per task to count its parameters
    total, n_params = 0, {}
    for task in tasks:
        n_params[task.name] = sum(p.numel() for p in task.build_model(0).parameters())
    for p in plans:
        total += estimate_bytes(1, len(_snapshot_steps(p.steps, interval)), n_params[p.task.name], dtype)
    todo = [p for p in plans if not (p.run_id in store.runs and store.runs[p.run_id].complete)]
    log(f"collect: {len(plans)} runs ({len(plans) - len(todo)} already complete), snapshots every {interval} steps, "
        f"{dtype}: about {human_bytes(total)} in {store.root}")
    budget = [stop_after]
    for plan in todo:
        if not _collect_run(store, plan, interval, shard_snapshots, evaluate, progress, log, budget):
            break
    return store


def _collect_run(store: TrajectoryStore, plan: RunPlan, interval: int, shard_snapshots: int, evaluate: bool,
                 progress: bool, log: Callable[[str], None], budget: list[int | None]) -> bool:
    from tqdm import tqdm

    task = plan.task
    torch.manual_seed(plan.seed)
    model = task.build_model(plan.seed)
    model.train()
    spec = ModelSpec.from_module(model)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=float(task.weight_decay))
    batches = task.batches(plan.seed)
    resume_path = store.run_dir(plan.run_id) / RESUME
    run = store.runs.get(plan.run_id)
    start = 0
    if run is not None and run.steps and resume_path.is_file():
        try:
            ck = torch.load(resume_path, map_location="cpu", weights_only=True)
            ok = ck.get("step") == run.steps[-1] and ck.get("spec") == spec.to_json() and ck.get("lr") == plan.lr
        except Exception as e:  # noqa: BLE001 - any unreadable resume point means "restart the run"
            log(f"{plan.run_id}: unreadable resume point ({e}); restarting the run")
            ok = False
        if ok:
            start = int(ck["step"])
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            for _ in range(start):  # replay the batch stream up to the resume step
                next(batches)
            torch.set_rng_state(ck["rng"])
            log(f"{plan.run_id}: resuming at step {start}")
    if start == 0:
        run = store.begin_run(plan.run_id, task.name, spec, plan.seed, plan.lr, interval,
                              info={"kind": task.kind, "metric": task.metric, "in_distribution": task.in_distribution,
                                    "weight_decay": float(task.weight_decay), "batch_size": task.batch_size,
                                    "steps_planned": plan.steps, "source": "collect"})
    buf_steps: list[int] = []
    buf_states: list[torch.Tensor] = []
    buf_metrics: list[dict[str, float] | None] = []

    def flush(resume_point: bool) -> None:
        """Write the buffered snapshots as a shard; ``resume_point``: the model is at the newest one's step."""
        if buf_steps:
            store.append(plan.run_id, buf_steps, torch.stack(buf_states), buf_metrics)
            if resume_point:
                torch.save({"step": buf_steps[-1], "spec": spec.to_json(), "lr": plan.lr,
                            "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "rng": torch.get_rng_state()}, resume_path)
            buf_steps.clear(), buf_states.clear(), buf_metrics.clear()

    def snapshot(step: int) -> bool:
        vec = flat_params(model)
        if not torch.isfinite(vec).all():
            return False
        buf_steps.append(step)
        buf_states.append(vec)
        buf_metrics.append(_metrics(task, model, evaluate))
        if len(buf_steps) >= shard_snapshots:
            flush(True)
        return True

    t0 = time.monotonic()
    if start == 0 and not snapshot(0):
        raise FloatingPointError(f"{plan.run_id}: the initial parameters are not finite")
    bar = tqdm(total=plan.steps, initial=start, desc=plan.run_id, unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, leave=True)
    diverged = False
    last_loss = float("nan")
    try:
        for step in range(start + 1, plan.steps + 1):
            if budget[0] is not None:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
            loss = task.loss(model, next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last_loss = float(loss.detach())
            bar.update(1)
            if step % interval == 0:
                if not snapshot(step):
                    diverged = True
                    break
                bar.set_postfix(loss=f"{last_loss:.4g}")
    finally:
        bar.close()
    flush(False)
    info: dict[str, Any] = {"wall_s": round(time.monotonic() - t0, 1), "final_train_loss": last_loss}
    if diverged or not math.isfinite(last_loss):
        info["diverged"] = True
        log(f"{plan.run_id}: parameters became non-finite; the run stops at step {run.steps[-1]}")
    store.finish(plan.run_id, **info)
    resume_path.unlink(missing_ok=True)
    return True
