"""``ninocast collect``, ``ninocast metatrain`` and ``ninocast export-trajectories``."""

from __future__ import annotations

import argparse
import sys

from ninocast.cli import CommandError


def _csv(text: str, kind=str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise CommandError(f"bad list {text!r}: {e}") from None


def _tasks(names: list[str], allow_held_out: bool):
    try:
        from ..tasks import get_task
    except ImportError as e:
        raise CommandError(f"the task registry is not available ({e})") from None
    tasks = []
    for n in names:
        try:
            t = get_task(n)
        except (KeyError, ValueError) as e:
            raise CommandError(str(e).strip("'\"")) from None
        if not t.in_distribution and not allow_held_out:
            raise CommandError(f"task {n} is held out of meta-training (it measures generalisation); "
                               "pass --allow-held-out to collect it anyway")
        tasks.append(t)
    return tasks


def run_collect(args: argparse.Namespace) -> int:
    import torch

    from ..tasks.base import DataMissing
    from .collect import collect
    from .store import StoreError

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = _tasks(_csv(args.tasks), args.allow_held_out)
    try:
        store = collect(tasks, _csv(args.seeds, int), args.out, lr_scales=_csv(args.lr_scales, float),
                        steps=args.steps, interval=args.interval, dtype=args.dtype,
                        shard_snapshots=args.shard_snapshots, evaluate=not args.no_eval,
                        progress=not args.quiet)
    except (StoreError, ValueError, DataMissing) as e:
        raise CommandError(str(e)) from None
    print(store.summary())
    return 0


def _task_weights(items: list[str]) -> dict[str, float] | None:
    """["fm-16=2", "kjv-gpt2-3-24=0.5"] -> {"fm-16": 2.0, ...}; None when none are given."""
    weights: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = None
        if not sep or not name.strip() or w is None:
            raise CommandError(f"--task-weight {item!r}: expected TASK=WEIGHT, e.g. fm-16=2")
        if name.strip() in weights:
            raise CommandError(f"--task-weight: task {name.strip()!r} given twice")
        weights[name.strip()] = w
    return weights or None


def run_metatrain(args: argparse.Namespace) -> int:
    from .store import StoreError
    from .train import MetaTrainConfig, metatrain
    from ..engine.nowcasters.checkpoint import CheckpointError

    cfg = MetaTrainConfig(
        stores=args.stores, out=args.out, model=args.model, name=args.name, iters=args.iters,
        batch_trajectories=args.batch_trajectories, windows=args.windows, lr=args.lr, weight_decay=args.weight_decay,
        clip=args.clip, seed=args.seed, spacing=args.spacing, hid=args.hid, layers=args.layers,
        wte_pos_enc=args.wte_pos_enc, lm_global_scaling=not args.per_tensor_lm_scaling,
        tasks=_csv(args.tasks) if args.tasks else None, task_weights=_task_weights(args.task_weight),
        val_fraction=args.val_fraction, early_fraction=args.early_fraction,
        val_batches=args.val_batches, val_every=args.val_every, ckpt_every=args.ckpt_every, init=args.init,
        work_dir=args.work_dir, threads=args.threads, device=args.device,
        max_minutes=args.max_minutes, keep=args.keep)
    try:
        summary = metatrain(cfg, progress=not args.quiet)
    except (StoreError, CheckpointError, ValueError) as e:
        raise CommandError(str(e)) from None
    import json

    print(json.dumps(summary, indent=1))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .export import export_sessions
    from .store import StoreError

    try:
        store = export_sessions(args.data_dir, args.out, dtype=args.dtype,
                                owners=_csv(args.owners) if args.owners else None,
                                sessions=_csv(args.sessions) if args.sessions else None)
    except (StoreError, ValueError) as e:
        raise CommandError(str(e)) from None
    print(store.summary())
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from .store import StoreError, TrajectoryStore

    try:
        store = TrajectoryStore.open(args.store)
        store.validate(deep=args.deep)
    except StoreError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    print(store.summary())
    print("ok")
    return 0
