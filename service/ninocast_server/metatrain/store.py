"""The trajectory store: parameter snapshots of training runs, the data meta-training reads.

Layout of a store directory::

    manifest.json                        {"format": "ninocast-trajectories", "version": 1, "dtype": "float16",
                                          "runs": {<run id>: {...}}}   (rewritten atomically)
    runs/<run id>/00000.safetensors      one shard: "states" (n, P) in the store dtype, "steps" (n,) int64
    runs/<run id>/00001.safetensors      ...
    runs/<run id>/resume.pt              collect's resume point (model, optimiser, RNG), deleted when complete

A run's manifest entry holds what the shards need to be read back and judged: the task, the model spec (the
ModelSpec JSON, so the neural graph can be rebuilt), seed, learning rate, snapshot interval, the steps and the
metrics at each snapshot, and its shards with their sizes. A shard is listed only after it is on disk, so a
crash leaves at most an unlisted file, which the next writer overwrites. ``validate`` checks every listed
shard against the manifest (missing, truncated, wrong shape or dtype) and names the file in its error.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ninocast.spec import ModelSpec, SpecError

from ..sessions.atomic import atomic_write

FORMAT, VERSION = "ninocast-trajectories", 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
ST_DTYPES = {"float16": "F16", "float32": "F32"}
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


class StoreError(ValueError):
    """A trajectory store that cannot be read or written as asked; the message names the file and the problem."""


def run_id_for(task: str, seed: int, lr: float) -> str:
    return safe_id(f"{task}-seed{seed}-lr{lr:g}")


def safe_id(text: str) -> str:
    out = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "run"
    return out[:200]


def estimate_bytes(n_runs: int, n_snapshots: int, n_params: int, dtype: str = "float16") -> int:
    """Bytes the states of ``n_runs`` runs of ``n_snapshots`` snapshots of ``n_params`` parameters take."""
    return n_runs * n_snapshots * n_params * DTYPES[dtype].itemsize


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass
class Run:
    """One training run (trajectory) as the manifest describes it."""

    id: str
    task: str
    spec: ModelSpec
    seed: int | None
    lr: float | None
    interval: int  # optimiser steps between snapshots (the nominal spacing; ``steps`` holds the truth)
    steps: list[int] = field(default_factory=list)
    metrics: list[dict[str, float] | None] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"file", "count", "bytes"}
    complete: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # kind, metric name, in_distribution, source, diverged ...

    @property
    def n_snapshots(self) -> int:
        return len(self.steps)

    @property
    def n_params(self) -> int:
        return self.spec.n_params

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "spec": self.spec.to_json(), "seed": self.seed, "lr": self.lr,
                "interval": self.interval, "steps": self.steps, "metrics": self.metrics, "shards": self.shards,
                "complete": self.complete, "info": self.info}

    @classmethod
    def from_json(cls, run_id: str, obj: Any, where: str) -> "Run":
        if not isinstance(obj, dict):
            raise StoreError(f"{where}: run {run_id!r} must be a JSON object")
        try:
            spec = ModelSpec.from_json(obj["spec"])
            run = cls(id=run_id, task=str(obj["task"]), spec=spec, seed=obj.get("seed"), lr=obj.get("lr"),
                      interval=int(obj["interval"]), steps=[int(s) for s in obj["steps"]],
                      metrics=list(obj.get("metrics") or []), shards=list(obj["shards"]),
                      complete=bool(obj.get("complete", False)), info=dict(obj.get("info") or {}))
        except KeyError as e:
            raise StoreError(f"{where}: run {run_id!r} lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError, SpecError) as e:
            raise StoreError(f"{where}: run {run_id!r} is malformed: {e}") from None
        if run.interval < 1:
            raise StoreError(f"{where}: run {run_id!r}: interval must be positive, got {run.interval}")
        counted = 0
        for i, sh in enumerate(run.shards):
            if not (isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("count"), int)
                    and isinstance(sh.get("bytes"), int)):
                raise StoreError(f"{where}: run {run_id!r}: shard {i} must be {{file, count, bytes}}, got {sh!r}"[:300])
            if "/" in sh["file"] or "\\" in sh["file"] or sh["file"].startswith("."):
                raise StoreError(f"{where}: run {run_id!r}: shard file name {sh['file']!r} is not allowed")
            counted += sh["count"]
        if counted != len(run.steps):
            raise StoreError(f"{where}: run {run_id!r}: its shards hold {counted} snapshots but it lists "
                             f"{len(run.steps)} steps")
        if len(run.metrics) not in (0, len(run.steps)):
            raise StoreError(f"{where}: run {run_id!r}: {len(run.metrics)} metrics for {len(run.steps)} steps")
        return run


class TrajectoryStore:
    """A store directory: ``TrajectoryStore.open(path)`` to read, ``TrajectoryStore.create(path, dtype)`` to
    write (it opens an existing store, keeping its dtype, which must then match)."""

    def __init__(self, root: Path, dtype: str, runs: dict[str, Run]) -> None:
        self.root, self.dtype, self.runs = Path(root), dtype, runs

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, root: str | Path) -> "TrajectoryStore":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise StoreError(f"{root}: not a trajectory store (no {MANIFEST}); create one with `ninocast collect` "
                             "or `ninocast export-trajectories`")
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise StoreError(f"{path}: not a {FORMAT} manifest")
        if obj.get("version") != VERSION:
            raise StoreError(f"{path}: unsupported version {obj.get('version')!r} (this code reads {VERSION})")
        dtype = obj.get("dtype")
        if dtype not in DTYPES:
            raise StoreError(f"{path}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        runs_obj = obj.get("runs")
        if not isinstance(runs_obj, dict):
            raise StoreError(f"{path}: 'runs' must be an object")
        runs = {}
        for rid, r in runs_obj.items():
            if not RUN_ID.match(rid):
                raise StoreError(f"{path}: run id {rid!r} is not allowed (letters, digits, . _ + -)")
            runs[rid] = Run.from_json(rid, r, str(path))
        return cls(root, dtype, runs)

    @classmethod
    def create(cls, root: str | Path, dtype: str = "float16") -> "TrajectoryStore":
        if dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        root = Path(root)
        if (root / MANIFEST).exists():
            store = cls.open(root)
            if store.dtype != dtype:
                raise StoreError(f"{root}: the store holds {store.dtype} states; asked for {dtype} "
                                 f"(use --dtype {store.dtype} or a new store)")
            return store
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, dtype, {})
        store.save_manifest()
        return store

    def save_manifest(self) -> None:
        obj = {"format": FORMAT, "version": VERSION, "dtype": self.dtype,
               "runs": {rid: r.to_json() for rid, r in self.runs.items()}}
        atomic_write(self.root / MANIFEST, (json.dumps(obj, indent=1) + "\n").encode(), durable=False)

    # ------------------------------------------------------------------ writing
    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def begin_run(self, run_id: str, task: str, spec: ModelSpec, seed: int | None, lr: float | None,
                  interval: int, info: Mapping[str, Any] | None = None) -> Run:
        """Start (or restart from nothing) the run ``run_id``: any shards it had are dropped."""
        if not RUN_ID.match(run_id):
            raise StoreError(f"run id {run_id!r} is not allowed (letters, digits, . _ + -)")
        old = self.runs.pop(run_id, None)
        d = self.run_dir(run_id)
        if old is not None or d.exists():
            for p in d.glob("*.safetensors"):
                p.unlink()
        d.mkdir(parents=True, exist_ok=True)
        run = Run(run_id, task, spec, seed, lr, int(interval), info=dict(info or {}))
        self.runs[run_id] = run
        self.save_manifest()
        return run

    def append(self, run_id: str, steps: Sequence[int], states: Tensor,
               metrics: Sequence[Mapping[str, float] | None] | None = None) -> None:
        """Write one shard of ``states`` (n, P) taken at ``steps`` and list it in the manifest."""
        from safetensors.torch import save_file

        run = self.runs[run_id]
        n = len(steps)
        if states.dim() != 2 or states.shape != (n, run.n_params):
            raise StoreError(f"run {run_id}: states must be ({n}, {run.n_params}), got {tuple(states.shape)}")
        if n == 0:
            return
        metrics = list(metrics) if metrics is not None else [None] * n
        if len(metrics) != n:
            raise StoreError(f"run {run_id}: {len(metrics)} metrics for {n} snapshots")
        name = f"{len(run.shards):05d}.safetensors"
        path = self.run_dir(run_id) / name
        tmp = path.with_name("." + name + ".tmp")
        save_file({"states": states.detach().to("cpu", DTYPES[self.dtype]).contiguous(),
                   "steps": torch.tensor(list(steps), dtype=torch.int64)}, str(tmp),
                  metadata={"run": run_id})
        os.replace(tmp, path)
        run.shards.append({"file": name, "count": n, "bytes": path.stat().st_size})
        run.steps.extend(int(s) for s in steps)
        if not run.metrics and len(run.steps) > n:  # earlier shards had no metrics
            run.metrics = [None] * (len(run.steps) - n)
        run.metrics.extend(dict(m) if m is not None else None for m in metrics)
        self.save_manifest()

    def finish(self, run_id: str, **info: Any) -> None:
        run = self.runs[run_id]
        run.complete = True
        run.info.update(info)
        self.save_manifest()

    # ------------------------------------------------------------------ reading
    def shard_path(self, run: Run, shard: Mapping[str, Any]) -> Path:
        return self.run_dir(run.id) / shard["file"]

    def check_shard(self, run: Run, shard: Mapping[str, Any]) -> None:
        """Cheap structural check of one shard (size, header, shapes, dtype); raises StoreError naming it."""
        path = self.shard_path(run, shard)
        where = f"{path} (run {run.id})"
        if not path.is_file():
            raise StoreError(f"{where}: shard is missing")
        size = path.stat().st_size
        if size != shard["bytes"]:
            what = "truncated" if size < shard["bytes"] else "larger than recorded"
            raise StoreError(f"{where}: shard is {what}: {size} bytes on disk, the manifest says {shard['bytes']}")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreError(f"{where}: not a safetensors file ({size} bytes)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8 or hlen > 10_000_000:
                raise StoreError(f"{where}: corrupt safetensors header (length {hlen}, file {size} bytes)")
            try:
                header = json.loads(f.read(hlen))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise StoreError(f"{where}: corrupt safetensors header ({e})") from None
        want = {"states": (ST_DTYPES[self.dtype], [shard["count"], run.n_params]),
                "steps": ("I64", [shard["count"]])}
        for key, (dt, shape) in want.items():
            e = header.get(key) if isinstance(header, dict) else None
            if not isinstance(e, dict):
                raise StoreError(f"{where}: the shard has no {key!r} tensor")
            if e.get("dtype") != dt or e.get("shape") != shape:
                raise StoreError(f"{where}: {key!r} is {e.get('dtype')} {e.get('shape')}, expected {dt} {shape}")
            offs = e.get("data_offsets")
            item = 2 if dt == "F16" else (4 if dt == "F32" else 8)
            if (not isinstance(offs, list) or len(offs) != 2 or offs[1] - offs[0] != math.prod(shape) * item
                    or offs[1] > size - 8 - hlen):
                raise StoreError(f"{where}: {key!r} has bad data offsets {offs!r} (truncated or corrupt shard)")

    def validate(self, deep: bool = False, runs: Iterable[str] | None = None) -> None:
        """Check every listed shard (``deep``: also read it, check steps and that the values are finite)."""
        for rid in runs if runs is not None else list(self.runs):
            run = self.runs[rid]
            for sh in run.shards:
                self.check_shard(run, sh)
            if deep:
                steps, states = self.load(rid)
                if steps.tolist() != run.steps:
                    raise StoreError(f"{self.run_dir(rid)}: the shards' steps disagree with the manifest")
                if not torch.isfinite(states.float()).all():
                    raise StoreError(f"{self.run_dir(rid)}: states contain NaN or Inf")

    def load(self, run_id: str) -> tuple[Tensor, Tensor]:
        """(steps (n,) int64, states (n, P) in the store dtype) of one run, shards checked first."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        run = self.runs.get(run_id)
        if run is None:
            raise StoreError(f"{self.root}: no run {run_id!r}")
        steps, states = [], []
        for sh in run.shards:
            self.check_shard(run, sh)
            path = self.shard_path(run, sh)
            try:
                t = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise StoreError(f"{path} (run {run_id}): unreadable shard ({e})") from None
            steps.append(t["steps"])
            states.append(t["states"])
        if not states:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, run.n_params, dtype=DTYPES[self.dtype])
        return torch.cat(steps), torch.cat(states)

    def size_bytes(self) -> int:
        return sum(sh["bytes"] for r in self.runs.values() for sh in r.shards)

    def summary(self) -> str:
        lines = [f"{self.root}: {len(self.runs)} runs, {human_bytes(self.size_bytes())} ({self.dtype})"]
        for r in self.runs.values():
            lines.append(f"  {r.id}: task {r.task}, {r.n_snapshots} snapshots x {r.n_params:,} params, "
                         f"every {r.interval} steps{'' if r.complete else ' (partial)'}")
        return "\n".join(lines)
