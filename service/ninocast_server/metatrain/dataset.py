"""Meta-training examples: windows of a trajectory as (scaled) neural-graph edge features (NINO_SPEC §6.2).

One example comes from one trajectory:

1. pick a task (uniformly, or by ``task_weights``: unlisted tasks weigh 1), then one of its trajectories uniformly;
2. stride Δ = max(1, spacing // interval) stored snapshots (spacing = 200 optimiser steps, as the deployed
   protocol records a state every 200 steps);
3. start t0 uniform in [0, n - (ctx + min(T, 2 ctx) + windows) Δ) (with probability ``early_fraction``, our
   addition, in [0, ctx Δ]); indices t0, t0 + Δ, ... truncated to ctx + T;
4. GPT-2 trajectories with more than ``wte_size`` token rows: ``wte_size`` random token rows are kept (sorted),
   and the graph is the same architecture's graph with that vocabulary, pos_w = sampled id + 1;
5. one random sign per LPE column, shared by the trajectory's windows;
6. for shift s = 0 .. windows-1: inputs = the ctx states at indices[s .. s+ctx-1], targets = all the following
   ones (at most T). Inputs are scaled per tensor (training mode: from a tensor named ``*wte.weight`` on, one
   mean and std for the rest of the vector, §4); the targets with the inputs' statistics. Edge features
   (E, 9 ctx) and targets (E, 9 T) use 9 slots for every graph (zero padding); the mask is true exactly on
   real parameter entries with an existing target (not on padding slots, missing horizons, virtual edges or
   self-loops).

Windows are collated into one disconnected graph by offsetting node ids (``collate``). The WNN+ model has no
message passing, so its examples skip the graph: one row per parameter with its edge type (``mode="param"``);
that is the same computation on every real entry, without the padded slots and constant edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ninocast.spec import ModelSpec

from ..engine.graphs import build_graph
from ..engine.graphs.base import SELF_LOOP_VALUE, VIRTUAL_VALUE, NeuralGraph
from ..engine.nowcasters.linefit import line_weights
from ..engine.nowcasters.scaling import EPS
from .store import Run, TrajectoryStore

F_PAD = 9  # slots per edge during meta-training (the largest kernel area, §6.2 step 7)


# ----------------------------------------------------------------------------- scaling (training mode, §4)
def scale_groups(spec: ModelSpec, lm_global: bool = True) -> list[tuple[int, int]]:
    """[start, stop) ranges that share one mean and std: one per tensor, except that with ``lm_global`` the
    first tensor named ``*wte.weight`` and everything after it form one group (the reference's training mode)."""
    groups = []
    for p in spec.layout:
        if lm_global and p.name.endswith("wte.weight"):
            groups.append((p.start, spec.n_params))
            break
        groups.append((p.start, p.stop))
    return groups


def group_stats(x: Tensor, groups: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """(P, c) -> per-parameter (P, 1) mean and (P, 1) std + EPS of its group over all its c states."""
    sizes = torch.tensor([b - a for a, b in groups])
    mu = torch.stack([x[a:b].mean() for a, b in groups])
    sd = torch.stack([x[a:b].std() if (b - a) * x.shape[1] > 1 else x.new_zeros(()) for a, b in groups])
    return (mu.repeat_interleave(sizes).unsqueeze(1), (sd + EPS).repeat_interleave(sizes).unsqueeze(1))


# ----------------------------------------------------------------------------- graphs padded to 9 slots
@dataclass
class PaddedGraph:
    """A NeuralGraph with its parameter slots remapped to F_PAD slots per edge (training layout)."""

    graph: NeuralGraph
    slot: Tensor  # (P,) index into the (E * F_PAD) slot array
    const_slots: Tensor  # slots holding constants (virtual edges: 1, self-loops: 2)
    const_values: Tensor

    @classmethod
    def of(cls, graph: NeuralGraph, feat: int = F_PAD) -> "PaddedGraph":
        if graph.feat_size > feat:
            raise ValueError(f"the graph has {graph.feat_size} values per edge; meta-training pads to {feat}")
        e, f = graph.param_slot // graph.feat_size, graph.param_slot % graph.feat_size
        E, N = graph.num_edges, graph.num_nodes
        loops = torch.arange(E - N, E)
        const_slots = torch.cat([graph.virtual_edges * feat, loops * feat])
        const_values = torch.cat([torch.full((graph.virtual_edges.numel(),), VIRTUAL_VALUE),
                                  torch.full((N,), SELF_LOOP_VALUE)])
        return cls(graph, e * feat + f, const_slots, const_values)

    def features(self, x: Tensor, feat: int = F_PAD) -> Tensor:
        """(P, S) scaled states -> (E, feat * S) slot-major edge features, constants on virtual edges/loops."""
        E, S = self.graph.num_edges, x.shape[1]
        out = x.new_zeros(E * feat, S)
        out[self.slot] = x
        out[self.const_slots] = self.const_values.to(x.dtype)[:, None]
        return out.view(E, feat, S).reshape(E, feat * S)

    def targets(self, y: Tensor, horizon: int, feat: int = F_PAD) -> tuple[Tensor, Tensor]:
        """(P, m) scaled targets (m <= horizon) -> (E, feat * T) targets and mask, slot-major."""
        E, m = self.graph.num_edges, y.shape[1]
        out = y.new_zeros(E * feat, horizon)
        mask = torch.zeros(E * feat, horizon, dtype=torch.bool)
        out[self.slot, :m] = y
        mask[self.slot, :m] = True
        return out.view(E, feat * horizon), mask.view(E, feat * horizon)


# ----------------------------------------------------------------------------- examples and batches
@dataclass
class Batch:
    """Collated windows. Graph mode: edge arrays of one disconnected graph; param mode: one row per parameter
    (edge_attr (M, ctx), edge_type (M,), no edge_index/pos). ``target``/``mask`` match the model's output."""

    edge_attr: Tensor
    edge_type: Tensor
    target: Tensor
    mask: Tensor
    edge_index: Tensor | None = None
    pos: Tensor | None = None
    pos_w: Tensor | None = None
    n_windows: int = 0
    ctx: int = 5

    def to(self, device: torch.device | str) -> "Batch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(mv(self.edge_attr), mv(self.edge_type), mv(self.target), mv(self.mask), mv(self.edge_index),
                     mv(self.pos), mv(self.pos_w), self.n_windows, self.ctx)


def collate(examples: Sequence[dict]) -> Batch:
    """Concatenate windows; graph windows become one disconnected graph (node ids offset per window)."""
    if not examples:
        raise ValueError("no examples to collate")
    graph = "edge_index" in examples[0]
    cat = lambda key: torch.cat([ex[key] for ex in examples])  # noqa: E731
    if not graph:
        return Batch(cat("x"), cat("type"), cat("y"), cat("mask"), n_windows=len(examples),
                     ctx=examples[0]["x"].shape[1])
    offsets, n = [], 0
    for ex in examples:
        offsets.append(n)
        n += ex["pos"].shape[0]
    edge_index = torch.cat([ex["edge_index"] + off for ex, off in zip(examples, offsets)], dim=1)
    return Batch(cat("x"), cat("type"), cat("y"), cat("mask"), edge_index, cat("pos"), cat("pos_w"),
                 len(examples), examples[0]["ctx"])


def window_stride(spacing: int, interval: int) -> int:
    """Stored snapshots between a window's states: ``spacing`` optimiser steps, or every snapshot of a store
    collected more sparsely than that."""
    return max(1, spacing // interval)


@dataclass
class Trajectory:
    run: Run
    states: Tensor  # (n, P) float16/float32 as stored
    stride: int

    @property
    def task(self) -> str:
        return self.run.task


@dataclass
class _GraphEntry:
    spec: ModelSpec
    padded: PaddedGraph | None
    param_type: Tensor
    groups: list[tuple[int, int]]


@dataclass
class WindowSampler:
    """Draws meta-training batches from trajectories (see the module docstring). Pure function of the torch
    Generator it is given, so a resumed training sees the same batches."""

    trajectories: list[Trajectory]
    mode: str = "graph"  # "graph" (NiNo) or "param" (WNN+)
    ctx: int = 5
    horizon: int = 40
    windows: int = 4
    lm_global_scaling: bool = True
    wte_size: int = 1000
    feat: int = F_PAD
    task_weights: dict[str, float] | None = None  # relative sampling weight per task; None: uniform (§6.2)
    # Share of trajectories whose windows start within the first ctx snapshots. Why: the first nowcast (k = 40)
    # jumps from there, and only windows that start that early have a 40th target inside a 10k-step run.
    early_fraction: float = 0.0
    _graphs: dict[str, _GraphEntry] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("graph", "param"):
            raise ValueError(f"mode must be 'graph' or 'param', got {self.mode!r}")
        if not self.trajectories:
            raise ValueError("no trajectories long enough to sample a window from")
        self.by_task: dict[str, list[Trajectory]] = {}
        for t in self.trajectories:
            self.by_task.setdefault(t.task, []).append(t)
        self.tasks = sorted(self.by_task)
        if not (isinstance(self.early_fraction, (int, float)) and 0.0 <= self.early_fraction <= 1.0):
            raise ValueError(f"early_fraction must be a number in [0, 1], got {self.early_fraction!r}")
        self._weights = None
        if self.task_weights:
            bad = {t: w for t, w in self.task_weights.items() if not (isinstance(w, (int, float)) and 0 < w < math.inf)}
            if bad:
                raise ValueError(f"task weights must be positive finite numbers, got {bad}")
            self._weights = torch.tensor([float(self.task_weights.get(t, 1.0)) for t in self.tasks],
                                         dtype=torch.float64)

    # ------------------------------------------------------------------ construction
    @classmethod
    def min_snapshots(cls, ctx: int, horizon: int, windows: int) -> int:
        return (ctx + min(horizon, 2 * ctx) + windows) + 1

    @classmethod
    def from_stores(cls, stores: Iterable[TrajectoryStore], runs: Callable[[Run], bool] | None = None,
                    spacing: int = 200, log: Callable[[str], None] | None = None, **kw) -> "WindowSampler":
        """Load the selected runs of the stores into memory (as stored: float16 stays float16)."""
        ctx, horizon, windows = kw.get("ctx", 5), kw.get("horizon", 40), kw.get("windows", 4)
        need = cls.min_snapshots(ctx, horizon, windows)
        trajs = []
        for store in stores:
            for run in store.runs.values():
                if runs is not None and not runs(run):
                    continue
                stride = window_stride(spacing, run.interval)
                if len(run.steps) < (need - 1) * stride + 1:
                    if log:
                        log(f"skipping {run.id}: {len(run.steps)} snapshots, windows need {(need - 1) * stride + 1} "
                            f"(stride {stride} at {run.interval} steps per snapshot)")
                    continue
                _, states = store.load(run.id)
                trajs.append(Trajectory(run, states, stride))
        return cls(trajs, **kw)

    # ------------------------------------------------------------------ graphs
    def _entry(self, spec: ModelSpec) -> _GraphEntry:
        key = spec.fingerprint()
        ent = self._graphs.get(key)
        if ent is None:
            graph = build_graph(spec, with_lpe=self.mode == "graph")
            padded = PaddedGraph.of(graph, self.feat) if self.mode == "graph" else None
            ent = _GraphEntry(spec, padded, graph.param_type, scale_groups(spec, self.lm_global_scaling))
            self._graphs[key] = ent
        return ent

    def _vocab_subsample(self, run: Run, gen: torch.Generator) -> tuple[ModelSpec, Tensor | None, Tensor | None]:
        """(spec to use, parameter index to keep or None, sampled token ids or None) for §6.2 step 5."""
        spec = run.spec
        if spec.family != "gpt2" or self.wte_size <= 0:
            return spec, None, None
        wte = next((p for p in spec.layout if p.name.endswith("wte.weight") and len(p.shape) == 2), None)
        if wte is None or wte.shape[0] <= self.wte_size:
            return spec, None, None
        V, d = wte.shape
        ids = torch.randperm(V, generator=gen)[: self.wte_size].sort().values
        keep = torch.cat([torch.arange(0, wte.start), (wte.start + ids[:, None] * d + torch.arange(d)).reshape(-1),
                          torch.arange(wte.stop, spec.n_params)])
        params = tuple((n, (self.wte_size, d) if n == wte.name else s) for n, s in spec.params)
        return ModelSpec(spec.family, params, spec.num_heads, spec.num_key_value_heads), keep, ids

    # ------------------------------------------------------------------ sampling
    def window_start(self, n: int, stride: int, gen: torch.Generator) -> int:
        """The first snapshot index of a trajectory's windows (step 3 of the module docstring); with
        ``early_fraction`` that share of starts lies in the first ctx snapshots."""
        hi = n - (self.ctx + min(self.horizon, 2 * self.ctx) + self.windows) * stride
        if self.early_fraction > 0 and float(torch.rand((), generator=gen)) < self.early_fraction:
            hi = min(hi, self.ctx * stride + 1)  # no draw at 0: runs without it resume with the same batches
        return int(torch.randint(0, max(1, hi), (1,), generator=gen))

    def trajectory_examples(self, traj: Trajectory, gen: torch.Generator) -> list[dict]:
        c, T, W, d = self.ctx, self.horizon, self.windows, traj.stride
        n = traj.states.shape[0]
        t0 = self.window_start(n, d, gen)
        idx = torch.arange(t0, n, d)[: c + T]
        spec, keep, ids = self._vocab_subsample(traj.run, gen)
        ent = self._entry(spec)
        rows = traj.states[idx].float()  # (len(idx), P)
        if keep is not None:
            rows = rows[:, keep]
        pos = pos_w = None
        if self.mode == "graph":
            g = ent.padded.graph
            signs = torch.randint(0, 2, (g.pos.shape[1],), generator=gen).float() * 2 - 1
            pos = g.pos * signs
            pos_w = g.pos_w
            if ids is not None:
                pos_w = pos_w.clone()
                pos_w[pos_w > 0] = ids + 1
        out = []
        for s in range(min(W, len(idx) - c - 1)):
            x = rows[s : s + c].T.contiguous()  # (P, c)
            y = rows[s + c : s + c + T].T  # (P, m)
            mu, sd = group_stats(x, ent.groups)
            xs, ys = (x - mu) / sd, (y - mu) / sd
            if self.mode == "graph":
                yt, mask = ent.padded.targets(ys, T, self.feat)
                g = ent.padded.graph
                out.append({"x": ent.padded.features(xs, self.feat), "y": yt, "mask": mask, "type": g.edge_type,
                            "edge_index": g.edge_index, "pos": pos, "pos_w": pos_w, "ctx": c})
            else:
                m = ys.shape[1]
                yt = ys.new_zeros(ys.shape[0], T)
                yt[:, :m] = ys
                mask = torch.zeros(ys.shape[0], T, dtype=torch.bool)
                mask[:, :m] = True
                out.append({"x": xs, "y": yt, "mask": mask, "type": ent.param_type})
        return out

    def pick_task(self, gen: torch.Generator) -> str:
        if self._weights is None:  # the same draws as before weights existed: old runs resume identically
            return self.tasks[int(torch.randint(0, len(self.tasks), (1,), generator=gen))]
        return self.tasks[int(torch.multinomial(self._weights, 1, generator=gen))]

    def sample(self, gen: torch.Generator, n_trajectories: int = 4, task: str | None = None) -> Batch:
        """A batch of ``n_trajectories`` x ``windows`` windows: a task (uniformly or by weight, or ``task``), then
        a trajectory uniformly."""
        if task is not None and task not in self.by_task:
            raise KeyError(f"no trajectories of task {task!r}; tasks: {self.tasks}")
        examples = []
        for _ in range(n_trajectories):
            trajs = self.by_task[task or self.pick_task(gen)]
            traj = trajs[int(torch.randint(0, len(trajs), (1,), generator=gen))]
            examples.extend(self.trajectory_examples(traj, gen))
        return collate(examples)


# ----------------------------------------------------------------------------- losses and baselines
def masked_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over the masked-in entries (NaN if there are none)."""
    diff = (pred - target).abs()
    return diff[mask].mean() if mask.any() else diff.sum() * float("nan")


def baseline_predictions(batch: Batch, horizon: int, kind: str) -> Tensor:
    """Scaled-unit predictions of 'last' (newest input state) or 'linefit' for every horizon, in the batch's
    output layout (slot-major, column f*T + t)."""
    c = batch.ctx
    E = batch.edge_attr.shape[0]
    x = batch.edge_attr.view(E, -1, c)  # (E, F, c)
    if kind == "last":
        pred = x[:, :, -1:].expand(-1, -1, horizon)
    elif kind == "linefit":
        w = torch.stack([line_weights(c, k) for k in range(1, horizon + 1)], dim=1).to(x.dtype)  # (c, T)
        pred = x @ w
    else:
        raise ValueError(f"unknown baseline {kind!r}")
    return pred.reshape(E, -1)
