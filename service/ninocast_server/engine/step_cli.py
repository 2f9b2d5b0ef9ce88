"""``ninocast step`` and ``ninocast import-checkpoint``: the engine from the command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ninocast.cli import CommandError
from ninocast.flat import StateError, check_state, flatten, state_dtype, unflatten
from ninocast.spec import ModelSpec, SpecError

from .nowcasters.base import NowcastError
from .runner import nowcast

SPEC_FILENAME = "spec.json"
SPEC_METADATA_KEY = "ninocast.spec"
STEP_METADATA_KEYS = ("ninocast.step", "step")  # where a state file may say at which step it was taken


def order_states(paths: list[str]) -> tuple[list[str], str]:
    """The state files oldest first, and what the order came from: the step in every file's metadata, else the
    numbers in every file name (``step_200`` before ``step_1000``; all the numbers of a name, left to right).
    A shell glob sorts names as text (``step_1000`` before ``step_200``), so the command-line order is never
    trusted silently: a CommandError when neither tells the order."""
    steps: list[int | None] = []
    for path in paths:
        meta = read_metadata(path)
        value = next((meta[k] for k in STEP_METADATA_KEYS if k in meta), None)
        steps.append(int(value) if value is not None and re.fullmatch(r"\d+", value.strip()) else None)
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        return [p for _, p in sorted(zip(steps, paths))], "the step in each file's metadata"
    keys = [tuple(int(x) for x in re.findall(r"\d+", Path(p).name.removesuffix(".safetensors"))) for p in paths]
    if all(keys) and len(set(keys)) == len(keys):
        return [p for _, p in sorted(zip(keys, paths))], "the numbers in the file names"
    unnamed = [p for p, k in zip(paths, keys) if not k]
    why = f"{unnamed[0]} has no number in its name" if unnamed else "two files have the same numbers in their names"
    raise CommandError(f"cannot tell the order of the state files ({why}, and not every file has a "
                       f"'ninocast.step' metadata entry): name them by step (step_200.safetensors ...), or pass "
                       f"--in-given-order to take them oldest first as listed")


def find_spec(spec_path: str | None, state_files: list[str]) -> ModelSpec:
    """--spec, else spec.json beside the state files, else the spec stored in the newest file's metadata."""
    try:
        if spec_path:
            return ModelSpec.load(spec_path)
        beside = Path(state_files[-1]).parent / SPEC_FILENAME
        if beside.is_file():
            return ModelSpec.load(str(beside))
        with safe_open(state_files[-1], "pt") as f:
            meta = f.metadata() or {}
        if SPEC_METADATA_KEY in meta:
            return ModelSpec.from_json(meta[SPEC_METADATA_KEY])
    except SpecError as e:
        raise CommandError(f"invalid spec: {e}") from None
    except OSError as e:
        raise CommandError(f"cannot read spec: {e}") from None
    raise CommandError(f"no spec: pass --spec, put {SPEC_FILENAME} beside the state files, or store it in "
                       f"the files' metadata under {SPEC_METADATA_KEY!r}")


def read_state(path: str) -> dict[str, torch.Tensor]:
    return _read(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})


def read_metadata(path: str) -> dict[str, str]:
    return _read(path, lambda f: f.metadata() or {})


def _read(path: str, what):
    if not os.path.isfile(path):
        raise CommandError(f"{path}: no such file")
    try:
        with safe_open(path, "pt") as f:
            return what(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise CommandError(f"{path}: not a readable safetensors file ({e})") from None


def load_nowcaster_or_fail(ref: str, device: str):
    from .nowcasters.checkpoint import CheckpointError, load_nowcaster

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda: CUDA is not available on this machine")
    try:
        return load_nowcaster(ref, device=device)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise CommandError(f"cannot load nowcaster {ref!r}: {e}") from None


def run_step(args: argparse.Namespace) -> int:
    model = load_nowcaster_or_fail(args.nowcaster, args.device)
    if len(args.states) != model.ctx:
        raise CommandError(f"nowcaster {model.name!r} needs exactly {model.ctx} state files, got {len(args.states)}")
    paths = list(args.states)
    if not getattr(args, "in_given_order", False):
        paths, source = order_states(paths)
        if paths != list(args.states):
            print(f"ordered the state files by {source}: {', '.join(Path(p).name for p in paths)}")
    spec = find_spec(args.spec, paths)
    states = torch.empty(spec.n_params, model.ctx, dtype=torch.float32)
    newest: dict[str, torch.Tensor] = {}
    for i, path in enumerate(paths):
        tensors = read_state(path)
        try:
            check_state({n: t.to(state_dtype(t.dtype)) if n in spec.names else t for n, t in tensors.items()},
                        spec, where=path)
        except StateError as e:
            raise CommandError(str(e)) from None
        flatten(tensors, spec, out=states[:, i])
        newest = tensors
    t0 = time.perf_counter()
    try:
        pred = nowcast(model, spec, states, args.k)
    except (NowcastError, FloatingPointError) as e:
        raise CommandError(str(e)) from None
    elapsed = time.perf_counter() - t0
    out = dict(newest)  # buffers and other extra keys pass through from the newest file
    out.update(unflatten(pred, spec, dtypes={n: newest[n].dtype for n in spec.names}))
    meta = {"ninocast.nowcaster": model.name, "ninocast.k": str(args.k),
            SPEC_METADATA_KEY: json.dumps(spec.to_json(), separators=(",", ":"))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, args.out, metadata=meta)
    print(f"nowcast with {model.name} (k={args.k}) of {spec.n_params:,} parameters in {elapsed:.2f} s -> {args.out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from .nowcasters.checkpoint import CheckpointError, load_nowcaster, save_nowcaster

    src = Path(args.checkpoint)
    if not src.is_file():
        raise CommandError(f"{src}: no such file")
    name = args.name or src.stem
    try:
        model = load_nowcaster(str(src), name=name)
        save_nowcaster(model, args.out, name=name, source={"imported_from": src.name})
    except (CheckpointError, ValueError, OSError) as e:
        raise CommandError(f"cannot import {src}: {e}") from None
    print(f"imported {src.name} as {model.kind} nowcaster {name!r} ({model.num_parameters():,} parameters) -> {args.out}")
    return 0


def run_route(args: argparse.Namespace) -> int:
    from .nowcasters.checkpoint import CheckpointError, save_routed

    members: dict[str, list[str]] = {}
    for item in args.member:
        families, sep, src = item.partition("=")
        if not sep or not families.strip() or not src.strip():
            raise CommandError(f"--member {item!r}: expected FAMILIES=DIR, e.g. gpt2,llama=runs/language")
        for family in (f.strip() for f in families.split(",")):
            members.setdefault(family, []).append(src.strip())  # named again: an alternate, chosen by spacing
    scales: dict[str, float] = {}
    for item in args.upd_scale:
        family, sep, value = (part.strip() for part in item.partition("="))
        usage = CommandError(f"--upd-scale {item!r}: expected FAMILY=X, e.g. llama=1.0")
        if not (sep and family):
            raise usage
        try:
            scales[family] = float(value)
        except ValueError:
            raise usage from None
    try:
        routed = save_routed(args.out, members, name=args.name, upd_scales=scales)
    except (CheckpointError, ValueError, OSError) as e:
        raise CommandError(f"cannot write the routed nowcaster: {e}") from None
    routes = ", ".join(f"{f} -> {' | '.join(m.name for m in ms)}" for f, ms in routed.routes.items())
    print(f"routed nowcaster {routed.name!r} ({routed.num_parameters():,} parameters): {routes} -> {args.out}")
    return 0
