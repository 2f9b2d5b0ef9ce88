"""Meta-train a nowcaster (NiNo graph model or WNN+) on trajectory stores (NINO_SPEC §6.3).

L1 loss between the training-mode outputs (all T horizons, scaled units) and the scaled future states over the
masked-in entries; AdamW (lr 3e-3, weight decay 1e-2) with cosine decay to 1e-6, global gradient-norm clipping
at 5. Batches are a pure function of (seed, iteration), so a resumed run sees the batches it would have seen.

NaN safety: an iteration whose loss or gradient norm is not finite is skipped (no optimiser step; the schedule
still advances) and counted; nothing restarts. Checkpoints (``checkpoint.pt`` in the work directory: model,
optimiser, schedule, iteration, loss history) are written every ``ckpt_every`` iterations and at the end; a run
started again with the same output directory continues from there.

Validation: a fixed set of batches from held-out trajectories (per task, the runs chosen by ``val_fraction``),
scored with the model and with two baselines in the same units: "last" (the newest input state) and "linefit".
With several tasks the batches are drawn per task (``ceil(val_batches / tasks)``, at least 2 each) and the kept
weights minimise the mean over tasks of L1 / last-state L1: an entry-weighted L1 would let the task with the
largest graphs (a GPT-2's) decide alone, and the ratio puts tasks of different difficulty on one scale.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..engine.nowcasters.checkpoint import load_directory, save_nowcaster
from ..engine.nowcasters.config import NiNoConfig, WNNConfig
from ..engine.nowcasters.layers import init_weights
from ..engine.nowcasters.nino import NiNoModel
from ..engine.nowcasters.scope import Scope, scope_of_runs
from ..engine.nowcasters.wnn import WNNModel
from .dataset import Batch, WindowSampler, baseline_predictions, masked_l1, window_stride
from .store import Run, TrajectoryStore

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"


@dataclass
class MetaTrainConfig:
    stores: list[str]
    out: str
    model: str = "nino"  # "nino" | "wnn"
    name: str | None = None
    iters: int = 20_000
    batch_trajectories: int = 4
    windows: int = 4
    lr: float = 3e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-2
    clip: float = 5.0
    seed: int = 0
    ctx: int = 5
    horizon: int = 40
    spacing: int = 200
    hid: int = 128
    layers: int = 3
    wte_pos_enc: bool = False
    lm_global_scaling: bool = True
    wte_size: int = 1000
    tasks: list[str] | None = None
    task_weights: dict[str, float] | None = None  # sampling weight per task (others 1); None: uniform
    early_fraction: float = 0.0  # share of training trajectories whose windows start in the first ctx snapshots
    val_fraction: float = 0.2
    val_batches: int = 8
    val_every: int = 200
    ckpt_every: int = 200
    init: str | None = None
    work_dir: str | None = None
    threads: int | None = None
    device: str = "cpu"
    max_minutes: float | None = None  # stop early (wall time of this invocation); the schedule keeps --iters
    keep: str = "best"  # "best": the weights with the lowest validation loss; "last": the final weights


@dataclass
class History:
    iteration: int = 0
    train: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss)
    val: list[tuple[int, float]] = field(default_factory=list)
    skipped: int = 0  # non-finite loss or gradient
    skipped_at: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    baselines: dict[str, float] = field(default_factory=dict)
    best: tuple[int, float] | None = None  # (iteration, validation loss) of the lowest validation so far
    val_tasks: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (iteration, L1 per task)
    task_baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {"last": .., "linefit": ..}


# ----------------------------------------------------------------------------- data split
def split_runs(stores: Sequence[TrajectoryStore], fraction: float, tasks: Sequence[str] | None
               ) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(train, val) sets of (store root, run id). Per task, the last ceil(fraction * n) runs in id order are
    held out (none if the task has a single run). Held-out tasks (in_distribution False) are never used."""
    by_task: dict[str, list[tuple[str, str]]] = {}
    for st in stores:
        for r in st.runs.values():
            if tasks and r.task not in tasks:
                continue
            if r.info.get("in_distribution") is False:
                continue
            if not r.complete and r.info.get("source") == "collect":  # still being collected: not reproducible yet
                continue
            by_task.setdefault(r.task, []).append((str(st.root), r.id))
    train, val = set(), set()
    for _, runs in sorted(by_task.items()):
        runs.sort()
        n_val = min(len(runs) - 1, math.ceil(fraction * len(runs))) if fraction > 0 else 0
        val.update(runs[len(runs) - n_val:] if n_val else [])
        train.update(runs[: len(runs) - n_val])
    return train, val


def _sampler(stores: Sequence[TrajectoryStore], keep: set[tuple[str, str]], cfg: MetaTrainConfig, mode: str,
             log: Callable[[str], None], early_fraction: float = 0.0) -> WindowSampler | None:
    picked = [st for st in stores if any(root == str(st.root) for root, _ in keep)]
    try:
        return WindowSampler.from_stores(
            picked, runs=lambda r: any(rid == r.id for _, rid in keep), spacing=cfg.spacing, log=log, mode=mode,
            ctx=cfg.ctx, horizon=cfg.horizon, windows=cfg.windows, lm_global_scaling=cfg.lm_global_scaling,
            wte_size=cfg.wte_size, task_weights=cfg.task_weights, early_fraction=early_fraction)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- model
def build_model(cfg: MetaTrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """A freshly initialised model, or the ``--init`` nowcaster's (fine-tuning keeps its architecture)."""
    if cfg.init:
        model, config = load_directory(cfg.init)
        model = model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        info = {"init": str(cfg.init), "init_name": config.get("name"), "init_scope": config.get("scope")}
        if model.config.upd_scale != 1.0:  # a serving calibration, not learned: fine-tune the unscaled update
            info["init_upd_scale"] = model.config.upd_scale
            model.config = replace(model.config, upd_scale=1.0)
        return model, info
    torch.manual_seed(cfg.seed)
    if cfg.model == "nino":
        model = NiNoModel(NiNoConfig(ctx=cfg.ctx, hid=cfg.hid, layers=cfg.layers, seq_len=cfg.horizon,
                                     wte_pos_enc=cfg.wte_pos_enc))
    elif cfg.model == "wnn":
        model = WNNModel(WNNConfig(ctx=cfg.ctx, hid=cfg.hid, layers=cfg.layers, seq_len=cfg.horizon))
    else:
        raise ValueError(f"model must be 'nino' or 'wnn', got {cfg.model!r}")
    init_weights(model)
    return model, {}


def trim_unused_slots(batch: Batch, horizon: int) -> Batch:
    """Drop the padding slots no edge of the batch uses (all but the first for MLP and transformer graphs,
    whose edges hold one weight each): the model reads and predicts only the slots it is given, so the loss is
    the same and a GPT-2 batch costs ~5x less to decode and score."""
    if batch.edge_index is None or batch.edge_attr.shape[0] == 0:
        return batch
    E, ctx = batch.edge_attr.shape[0], batch.ctx
    slots = batch.edge_attr.shape[1] // ctx
    used_per_slot = batch.mask.view(E, slots, horizon).any(dim=2).any(dim=0)
    used = int(used_per_slot.nonzero().max()) + 1 if used_per_slot.any() else 1
    if used == slots:
        return batch
    return Batch(batch.edge_attr[:, : used * ctx], batch.edge_type, batch.target[:, : used * horizon],
                 batch.mask[:, : used * horizon], batch.edge_index, batch.pos, batch.pos_w, batch.n_windows, ctx)


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    if isinstance(model, NiNoModel):
        return model(batch.edge_attr, batch.edge_index, batch.edge_type, batch.pos, batch.pos_w)
    return model(batch.edge_attr, batch.edge_type)


def evaluate(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> float:
    """Masked L1 over all the batches (entry-weighted)."""
    was = model.training
    model.eval()
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            b = b.to(device)
            pred = forward(model, b)
            n = float(b.mask.sum())
            num += float(masked_l1(pred, b.target, b.mask)) * n
            den += n
    model.train(was)
    return num / den if den else math.nan


def validation_batches(val_s: WindowSampler, cfg: MetaTrainConfig) -> dict[str, list[Batch]]:
    """Fixed validation batches per task (one task: the draws of earlier rounds, so their runs reproduce)."""
    vgen = torch.Generator().manual_seed(10_000 + cfg.seed)
    if len(val_s.tasks) == 1:
        return {val_s.tasks[0]: [val_s.sample(vgen, cfg.batch_trajectories) for _ in range(cfg.val_batches)]}
    per = max(2, math.ceil(cfg.val_batches / len(val_s.tasks)))
    return {t: [val_s.sample(vgen, cfg.batch_trajectories, task=t) for _ in range(per)] for t in val_s.tasks}


def baseline_losses(batches: Sequence[Batch], horizon: int) -> dict[str, float]:
    out = {}
    for kind in ("last", "linefit"):
        num = den = 0.0
        for b in batches:
            n = float(b.mask.sum())
            num += float(masked_l1(baseline_predictions(b, horizon, kind), b.target, b.mask)) * n
            den += n
        out[kind] = num / den if den else math.nan
    return out


# ----------------------------------------------------------------------------- the loop
def metatrain(cfg: MetaTrainConfig, progress: bool = True, log: Callable[[str], None] | None = None,
              fault: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Train, write the nowcaster into ``cfg.out`` and return a summary. ``fault`` (tests) may replace the loss."""
    from tqdm import tqdm

    log = log or (lambda s: print(s, file=sys.stderr))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    out = Path(cfg.out)
    work = Path(cfg.work_dir) if cfg.work_dir else out / "train"
    work.mkdir(parents=True, exist_ok=True)
    stores = [TrajectoryStore.open(s) for s in cfg.stores]
    for st in stores:
        st.validate()
    model, init_info = build_model(cfg)
    if "init_upd_scale" in init_info:
        log(f"--init {cfg.init} scales its update by {init_info['init_upd_scale']:g} when serving; fine-tuning "
            "trains the unscaled update (upd_scale 1.0), and the written nowcaster has 1.0")
    if cfg.init:
        cfg.model = "nino" if isinstance(model, NiNoModel) else "wnn"
        arch = model.config  # fine-tuning keeps the --init nowcaster's architecture, and the report says so
        cfg.ctx, cfg.horizon, cfg.hid, cfg.layers = arch.ctx, arch.seq_len, arch.hid, arch.layers
        cfg.wte_pos_enc = getattr(arch, "wte_pos_enc", cfg.wte_pos_enc)
    mode = "graph" if isinstance(model, NiNoModel) else "param"
    bad = {t: w for t, w in (cfg.task_weights or {}).items()
           if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf}
    if bad:
        raise ValueError(f"--task-weight: weights must be positive finite numbers, got {bad}")
    if isinstance(cfg.early_fraction, bool) or not (isinstance(cfg.early_fraction, (int, float))
                                                     and 0.0 <= cfg.early_fraction <= 1.0):
        raise ValueError(f"--early-fraction must be a number in [0, 1], got {cfg.early_fraction!r}")
    train_keys, val_keys = split_runs(stores, cfg.val_fraction, cfg.tasks)
    train_s = _sampler(stores, train_keys, cfg, mode, log, cfg.early_fraction)
    if train_s is None:
        raise ValueError("no training trajectory is long enough: windows need "
                         f"{WindowSampler.min_snapshots(cfg.ctx, cfg.horizon, cfg.windows)} snapshots "
                         f"{cfg.spacing} steps apart; collect longer runs or lower --spacing")
    unknown = sorted(set(cfg.task_weights or {}) - set(train_s.tasks))
    if unknown:
        raise ValueError(f"--task-weight names tasks without training trajectories: {unknown}; "
                         f"the training tasks are {train_s.tasks}")
    val_s = _sampler(stores, val_keys, cfg, mode, log) if val_keys else None
    if val_s is None:
        log("no held-out trajectories: validating on training trajectories (add runs or raise --val-fraction)")
        val_s = train_s
    val_sets = {t: [trim_unused_slots(b, cfg.horizon) for b in bs] for t, bs in validation_batches(val_s, cfg).items()}
    val_batches = [b for bs in val_sets.values() for b in bs]

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.iters), eta_min=cfg.min_lr)
    hist = History()
    best_state: dict[str, torch.Tensor] | None = None  # weights at hist.best, kept in the checkpoint too
    ck_path = work / CHECKPOINT
    if ck_path.is_file():
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        if ck.get("model_args") != model.config.model_args() or ck.get("iters") != cfg.iters:
            raise ValueError(f"{ck_path}: a checkpoint of a different run (model args or --iters differ); "
                             "use another output directory or delete it")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        hist = History(**json.loads(ck["history"]))
        best_state = ck.get("best")
        log(f"resuming at iteration {hist.iteration} of {cfg.iters}")
    hist.baselines = baseline_losses(val_batches, cfg.horizon)
    if len(val_sets) > 1:
        hist.task_baselines = {t: baseline_losses(bs, cfg.horizon) for t, bs in val_sets.items()}

    def save_checkpoint() -> None:
        tmp = ck_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "model_args": model.config.model_args(), "iters": cfg.iters, "history": json.dumps(asdict(hist)),
                    "best": best_state}, tmp)
        tmp.replace(ck_path)
        (work / HISTORY).write_text(json.dumps(asdict(hist)) + "\n")

    def validate(iteration: int) -> None:
        nonlocal best_state
        if len(val_sets) > 1:
            per = {t: evaluate(model, bs, device) for t, bs in val_sets.items()}
            hist.val_tasks.append((iteration, per))
            v = sum(per[t] / hist.task_baselines[t]["last"] for t in per) / len(per)
        else:
            v = evaluate(model, val_batches, device)
        hist.val.append((iteration, v))
        if math.isfinite(v) and (hist.best is None or v < hist.best[1]):
            best_state = {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}
            hist.best = (iteration, v)

    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.iters, initial=hist.iteration, desc=f"metatrain {cfg.model}", unit="it",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t_start = time.monotonic() - hist.wall_s
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    ema = None
    try:
        while hist.iteration < cfg.iters:
            if time.monotonic() > deadline:
                log(f"--max-minutes reached at iteration {hist.iteration} of {cfg.iters}")
                break
            it = hist.iteration
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
            batch = trim_unused_slots(train_s.sample(gen, cfg.batch_trajectories), cfg.horizon).to(device)
            loss = masked_l1(forward(model, batch), batch.target, batch.mask)
            if fault is not None:
                loss = fault(it, loss)
            opt.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(loss))
            if ok:
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                ok = bool(torch.isfinite(gnorm))
            if ok:
                opt.step()
                lv = float(loss.detach())
                hist.train.append((it + 1, lv))
                ema = lv if ema is None else 0.95 * ema + 0.05 * lv
            else:
                opt.zero_grad(set_to_none=True)
                hist.skipped += 1
                hist.skipped_at.append(it + 1)
                del hist.skipped_at[:-100]
            sched.step()
            hist.iteration = it + 1
            bar.update(1)
            if (it + 1) % cfg.val_every == 0 or it + 1 == cfg.iters:
                validate(it + 1)
            if ema is not None:
                post = {"loss": f"{ema:.4f}", "skipped": hist.skipped}
                if hist.val:
                    post["val"] = f"{hist.val[-1][1]:.4f}"
                bar.set_postfix(post)
            hist.wall_s = time.monotonic() - t_start
            if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters:
                save_checkpoint()
    finally:
        bar.close()
    hist.wall_s = time.monotonic() - t_start
    if not hist.val or hist.val[-1][0] != hist.iteration:
        validate(hist.iteration)
    save_checkpoint()
    if cfg.keep == "best" and best_state is not None and hist.best[0] != hist.iteration:
        model.load_state_dict(best_state)
        log(f"keeping the weights of iteration {hist.best[0]} (validation {hist.best[1]:.4f}; "
            f"final {hist.val[-1][1]:.4f})")
    return finish(model.cpu().eval(), cfg, hist, stores, train_keys, val_keys, init_info, log)


# ----------------------------------------------------------------------------- outputs
def finish(model: nn.Module, cfg: MetaTrainConfig, hist: History, stores: Sequence[TrajectoryStore],
           train_keys: set, val_keys: set, init_info: dict, log: Callable[[str], None]) -> dict[str, Any]:
    out = Path(cfg.out)
    name = cfg.name or out.name
    runs = [st.runs[rid] for st in stores for root, rid in train_keys if root == str(st.root)]
    trained = [(run.task, run.spec.family) for run in runs]
    tasks = sorted({task for task, _ in trained})
    spacings = [window_stride(cfg.spacing, run.interval) * run.interval for run in runs]
    scope = replace(_merge_scopes(scope_of_runs(trained), init_info.pop("init_scope", None)),
                    spacing=(min(spacings), max(spacings)))
    summary = {
        "model": cfg.model, "iterations": hist.iteration, "skipped_steps": hist.skipped,
        "final_train_loss": _tail_mean(hist.train),
        "val_loss": hist.best[1] if cfg.keep == "best" and hist.best else hist.val[-1][1] if hist.val else None,
        "kept_iteration": hist.best[0] if cfg.keep == "best" and hist.best else hist.iteration,
        "val_baselines": hist.baselines, "wall_s": round(hist.wall_s, 1), "tasks": tasks,
        "train_runs": len(train_keys), "val_runs": len(val_keys),
        "val_metric": "mean over tasks of L1 / last-state L1" if hist.task_baselines else "L1",
    }
    if hist.task_baselines:
        kept = dict(hist.val_tasks).get(summary["kept_iteration"], {})
        summary["val_tasks"] = {t: {"l1": kept.get(t), **b} for t, b in hist.task_baselines.items()}
    source = {"trained_by": "ninocast metatrain", "config": {k: v for k, v in asdict(cfg).items()},
              "summary": summary, **init_info}
    summary["scope"] = scope.to_json()
    if any(not torch.isfinite(p).all() for p in model.parameters()):
        raise FloatingPointError("the trained model holds NaN or Inf; nothing was written")
    save_nowcaster(model, out, name=name, source=source, scope=scope)
    png = plot_losses(hist, out / "loss_curve.png")
    (out / "MODEL_CARD.md").write_text(model_card(name, cfg, hist, summary, stores, train_keys, val_keys,
                                                  init_info, png is not None))
    log(f"wrote {out} ({cfg.model}, {hist.iteration} iterations, validation {summary['val_metric']} "
        f"{summary['val_loss']:.4f}; "
        f"last-state {hist.baselines.get('last', math.nan):.4f}, linefit {hist.baselines.get('linefit', math.nan):.4f}"
        f"; {hist.skipped} skipped steps)")
    return summary


def _merge_scopes(new: Scope, init: Scope | None) -> Scope:
    """A fine-tuned nowcaster was trained on its --init's data too (without a parameter range: sizes differ).
    Its snapshot spacing is set by the caller from this training's windows alone: a fine-tune moves the model to
    the new spacing and is validated there only."""
    if init is None:
        return new
    return Scope(tuple(dict.fromkeys(init.families + new.families)), tuple(sorted(set(init.tasks) | set(new.tasks))))


def _tail_mean(points: Sequence[tuple[int, float]], n: int = 50) -> float | None:
    tail = [v for _, v in points[-n:]]
    return sum(tail) / len(tail) if tail else None


def plot_losses(hist: History, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if hist.train:
        xs, ys = zip(*hist.train)
        ax.plot(xs, ys, lw=0.5, alpha=0.4, label="train (per batch)")
        k = max(1, len(ys) // 50)
        sm = [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]
        ax.plot(xs, sm, lw=1.2, label="train (running mean)")
    if hist.val:
        xs, ys = zip(*hist.val)
        ax.plot(xs, ys, "o-", ms=3, label="validation")
    for kind, v in hist.baselines.items():
        if math.isfinite(v):
            ax.axhline(v, ls="--", lw=0.8, color="gray" if kind == "last" else "black", label=f"{kind} (validation)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("L1, scaled units")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("meta-training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def model_card(name: str, cfg: MetaTrainConfig, hist: History, summary: dict, stores: Sequence[TrajectoryStore],
               train_keys: set, val_keys: set, init_info: dict, has_png: bool) -> str:
    def runs_table(keys: set) -> list[str]:
        rows = []
        for st in stores:
            for root, rid in sorted(keys):
                if root != str(st.root):
                    continue
                r: Run = st.runs[rid]
                rows.append(f"| {rid} | {r.task} | {r.seed} | {r.lr:g} | {r.interval} | {len(r.steps)} | "
                            f"{r.steps[-1] if r.steps else 0} | {r.n_params:,} |"
                            if r.lr is not None else
                            f"| {rid} | {r.task} | {r.seed} | - | {r.interval} | {len(r.steps)} | "
                            f"{r.steps[-1] if r.steps else 0} | {r.n_params:,} |")
        return rows

    head = "| run | task | seed | lr | interval | snapshots | last step | params |\n|---|---|---|---|---|---|---|---|"
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"  # noqa: E731
    lines = [
        f"# {name}", "",
        f"A {'NiNo graph model' if cfg.model == 'nino' else 'WNN+ (per-weight MLP)'} trained by `ninocast metatrain` "
        "(NINO_SPEC §6).", "",
        "## Training", "",
        f"- iterations: {hist.iteration}" + (f" of a {cfg.iters}-iteration schedule (stopped by --max-minutes)"
                                              if hist.iteration < cfg.iters else "") + f" (batch: {cfg.batch_trajectories} trajectories x {cfg.windows} windows), "
        f"wall time {hist.wall_s / 60:.1f} min, seed {cfg.seed}",
        f"- AdamW lr {cfg.lr:g} (cosine to {cfg.min_lr:g}), weight decay {cfg.weight_decay:g}, gradient clip {cfg.clip:g}",
        f"- ctx {cfg.ctx}, horizons {cfg.horizon}, spacing {cfg.spacing} optimiser steps, hid {cfg.hid}, "
        f"layers {cfg.layers}" + (f", wte_pos_enc {cfg.wte_pos_enc}" if cfg.model == "nino" else ""),
        "- task sampling: " + (", ".join(f"{t} x{w:g}" for t, w in sorted(cfg.task_weights.items()))
                               + " (other tasks x1)" if cfg.task_weights else "uniform over tasks")
        + (f"; {cfg.early_fraction:.0%} of trajectories with windows from their first {cfg.ctx} snapshots"
           if cfg.early_fraction else ""),
        f"- skipped steps (non-finite loss or gradient): {hist.skipped}",
        f"- weights kept: iteration {summary['kept_iteration']} ("
        + ("lowest validation loss" if cfg.keep == "best" else "the last") + ")",
    ]
    val_label = f": {summary['val_metric']}" if summary.get("val_tasks") else ""
    if init_info:
        lines.append(f"- fine-tuned from `{init_info.get('init')}` ({init_info.get('init_name')})")
    lines += [
        f"- stores: {', '.join(f'`{s}`' for s in cfg.stores)}", "",
        "## Losses (masked L1 on scaled future states, all horizons)", "",
        "| | loss |", "|---|---|",
        f"| train (mean of the last 50 iterations) | {fmt(summary['final_train_loss'])} |",
        f"| validation (held-out trajectories), kept weights{val_label} | {fmt(summary['val_loss'])} |",
        f"| baseline: last state, same windows | {fmt(hist.baselines.get('last'))} |",
        f"| baseline: linefit, same windows | {fmt(hist.baselines.get('linefit'))} |", "",
    ]
    if summary.get("val_tasks"):
        lines += ["Per task (validation windows of each task, kept weights):", "",
                  "| task | L1 | last state | linefit | L1 / last |", "|---|---|---|---|---|"]
        lines += [f"| {t} | {fmt(v['l1'])} | {fmt(v['last'])} | {fmt(v['linefit'])} | "
                  f"{fmt(v['l1'] / v['last'] if v['l1'] is not None and v['last'] else None)} |"
                  for t, v in summary["val_tasks"].items()]
        lines.append("")
    if has_png:
        lines += ["![loss curve](loss_curve.png)", ""]
    lines += ["## Data", "", f"Tasks: {', '.join(summary['tasks'])}", "",
              f"Scope (config.json `scope`; a model outside it gets a warning): graph families "
              f"{', '.join(summary['scope']['families'])}", "", "Training trajectories:", "", head,
              *runs_table(train_keys), "", "Validation trajectories:", "", head, *runs_table(val_keys), "",
              "## Speedup benchmark", "",
              "Not measured yet: fill in `ninocast bench speedup` results (held-out FM-32, >= 3 seeds).", ""]
    return "\n".join(lines)
