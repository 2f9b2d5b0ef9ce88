"""``ninocast bench speedup``: steps to a task's target with AdamW alone and with nowcasters, through the product.

For every task, seed and method the same model initialisation and the same batch sequence are used (batch ``s``
feeds optimizer call ``s`` in every run; a nowcast call consumes its batch without using it, as the reference's
loop does). The nowcasting runs wrap the task's AdamW in ``ninocast.NowcastOptimizer`` (local engine, or a server
with ``--server``), so what is measured is what a user gets.

Evaluation schedule (the same for every method of a task): after every ``eval_every`` steps, after every
nowcast-position step (multiples of ``period``), at the last step, and, for tasks with ``eval_before_nowcast``
(language), right before each nowcast step as well. Steps to target = the first evaluated step count whose metric
reaches the target; a run stops there (as the reference's train_vision.py) unless ``--no-early-stop``. Runs that
never reach it count as 2 x budget in the medians.

Outputs in ``--out``: runs.jsonl (every run, with its curve; appended as runs finish, so ``--resume`` skips
them), runs.csv, summary.csv, results.md, plots/<task>.png, config.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

FAIL_FACTOR = 2  # a run that never reaches the target counts as FAIL_FACTOR x budget steps
SHARED_CKPTS = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "checkpoints"
ALIASES = {"nino": "nino_no_posw.pt", "nino_no_posw": "nino_no_posw.pt", "wnn": "nino_mlp.pt",
           "wnn+": "nino_mlp.pt", "nino_mlp": "nino_mlp.pt", "nino_mlp_h32": "nino_mlp_h32.pt"}
QUICK = {"max_steps": 240, "period": 60, "eval_every": 10, "seeds": "1000,2000"}
DIGITS_QUICK = {"max_steps": 1000, "period": 100, "eval_every": 10}  # digits: its whole budget
VERIFIED = "+v"  # label suffix of a verified nowcaster's runs; "+vdD" with delayed checks (delay D)
TRACED = "@traced"  # label suffix of runs whose spec carries the traced topology (--graph traced / both)
DECISION_KEYS = ("step", "k", "accepted", "skipped", "alpha", "probe_before", "probe_after", "tried", "probe_passes",
                 "verify_s", "delayed", "check_step", "probe_delayed", "probe_expected", "snapshot_bytes",
                 "probe_plain", "probe_se", "shadow_steps", "extended", "race", "patience")


# ---------------------------------------------------------------------------------------------- methods
def resolve_nowcaster(ref: str) -> tuple[str, str]:
    """(label, ref for NowcastOptimizer). Aliases nino / wnn+ name the official checkpoints in ../shared."""
    ref = ref.strip()
    key = ref.lower()
    if key == "linefit":
        return "linefit", "linefit"
    if key in ALIASES:
        path = SHARED_CKPTS / ALIASES[key]
        label = "wnn+" if "mlp" in ALIASES[key] else "nino"
        if ALIASES[key] == "nino_mlp_h32.pt":
            label = "wnn+h32"
        return label, str(path)
    from ..engine.nowcasters.checkpoint import resolve_ref

    p = Path(resolve_ref(ref))  # bundled names (ninocast-nino, ninocast-wnn) -> their directories
    if p.exists():
        stem = p.stem if p.is_file() else p.name
        return {"nino_no_posw": "nino", "nino_mlp": "wnn+", "nino_mlp_h32": "wnn+h32"}.get(stem, stem), str(p)
    return ref, ref  # a nowcaster name known to the server


def _split(values: Iterable[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


# ---------------------------------------------------------------------------------------------- one run
def eval_points(max_steps: int, period: int, eval_every: int, before_nowcast: bool) -> set[int]:
    """Step counts (optimizer calls completed) after which the model is evaluated; 0 is the initial model."""
    pts = {0, max_steps}
    pts.update(range(eval_every, max_steps + 1, eval_every))
    pts.update(range(period, max_steps + 1, period))  # right after each nowcast step
    if before_nowcast:
        pts.update(s - 1 for s in range(period, max_steps + 1, period))
    return {p for p in pts if 0 <= p <= max_steps}


def run_one(task, method: str, ref: str | None, seed: int, *, max_steps: int, period: int, eval_every: int,
            early_stop: bool = True, server: str | None = None, api_key: str | None = None,
            progress: bool = True, verify: dict[str, Any] | None = None, final_nowcast: str = "skip",
            graph: str = "auto", start_step: int | None = None) -> dict[str, Any]:
    """Train one (task, method, seed); returns the run record (see module doc).

    ``verify``: ``ninocast.Verify`` options (tolerance, delay, max_dip, baseline, shadow); every nowcast is then
    checked on the task's probe batches (``task.probe_batches``: held-out training images for Fashion-MNIST,
    else the first batches of an independent shuffle of the training data; never the test data the metric uses). With
    ``delay``: delayed checks and rollback (rolled-back jumps are evaluated at their rollback step and listed in
    ``rollback_steps``; their D steps count); with ``shadow`` every call goes through ``step(closure)`` and the
    copy's steps are counted in ``shadow_steps`` (compute, not training steps). ``graph="traced"``: the spec
    carries the model's traced topology
    (``ModelSpec.from_module(model, graph="traced")``), so the graph is built from it even where a hand-written
    layout exists."""
    import torch
    from tqdm import tqdm

    model = task.build_model(seed)
    model.train()
    base = task.make_optimizer(model)
    opt: Any = base
    if ref is not None:
        from ninocast import NowcastOptimizer

        kw: dict[str, Any] = dict(period=period, ctx=task.ctx, max_train_steps=max_steps, nowcaster=ref,
                                  final_nowcast=final_nowcast)
        if start_step is not None:
            kw["start_step"] = start_step
        if graph == "traced":
            from ninocast import ModelSpec

            kw["spec"] = ModelSpec.from_module(model, graph="traced")
        if verify is not None:
            from ninocast import Verify

            kw["verify"] = Verify(batches=task.probe_batches(seed), loss_fn=task.loss, **verify)
        if server:
            kw.update(server=server, api_key=api_key, session_name=f"bench-{task.name}-{method}-{seed}")
        else:
            kw.update(local=True)
        opt = NowcastOptimizer(base, model, **kw)
    shadow = bool(verify and verify.get("shadow"))

    def closure_for(batch: Any) -> Callable[[], Any]:
        def closure() -> Any:
            opt.zero_grad(set_to_none=True)
            value = task.loss(model, batch)
            value.backward()
            return value
        return closure

    points = eval_points(max_steps, period, eval_every, task.eval_before_nowcast)
    batches = task.batches(seed)
    curve: list[list[Any]] = []  # [step, metric, tag] tag: eval | pre | post (around a nowcast step)
    reached_at: int | None = None
    train_s = eval_s = 0.0
    nowcast_steps: list[int] = []  # accepted nowcasts
    rejected_steps: list[int] = []  # verified nowcasts that were rejected (a normal step instead)
    rollback_steps: list[int] = []  # delayed checks that restored the pre-jump run
    pre_final: float | None = None  # the metric right before the last call of the budget

    def evaluate(step: int, tag: str) -> bool:
        nonlocal eval_s, reached_at
        t0 = time.perf_counter()
        m = task.evaluate(model)
        eval_s += time.perf_counter() - t0
        value = float(m[task.metric])
        curve.append([step, value, tag])
        if reached_at is None and task.reached(value):
            reached_at = step
        return reached_at is not None

    evaluate(0, "eval")
    bar = tqdm(total=max_steps, desc=f"{task.name} {method} seed {seed}", unit="step", file=sys.stderr,
               disable=not progress, mininterval=2.0, dynamic_ncols=True, leave=False)
    steps_run = 0
    try:
        for s in range(max_steps):
            batch = next(batches)  # consumed on every call, so batch s feeds call s in every method's run
            need = getattr(opt, "need_grads", True)
            t0 = time.perf_counter()
            n_before = len(getattr(opt, "nowcasts", ()))
            if shadow:  # the pre-jump copy trains through the closure too
                loss = opt.step(closure_for(batch))
            else:
                if need:
                    opt.zero_grad(set_to_none=True)
                    loss = task.loss(model, batch)
                    loss.backward()
                opt.step()
            train_s += time.perf_counter() - t0
            steps_run = s + 1
            new = list(getattr(opt, "nowcasts", ()))[n_before:]
            nowcasted = any(n.get("accepted", True) for n in new)
            if nowcasted:
                nowcast_steps.append(steps_run)
            elif any("probe_before" in n for n in new):
                rejected_steps.append(steps_run)
            last = opt.nowcasts[-1] if getattr(opt, "nowcasts", None) else {}
            rolled_back = last.get("delayed") == "rolled_back" and last.get("check_step") == s
            if rolled_back:
                rollback_steps.append(steps_run)
            bar.update(1)
            if steps_run in points or nowcasted or rolled_back:
                tag = "post" if steps_run % period == 0 else "pre" if (steps_run + 1) % period == 0 else "eval"
                if evaluate(steps_run, tag) and early_stop:
                    break
            if steps_run == max_steps - 1:  # how the last call changes the model (the final-nowcast rule)
                if steps_run in points:
                    pre_final = curve[-1][1]
                else:
                    t0 = time.perf_counter()
                    pre_final = float(task.evaluate(model)[task.metric])
                    eval_s += time.perf_counter() - t0
            if need and loss is not None and not math.isfinite(float(loss.detach())):
                curve.append([steps_run, float("nan"), "diverged"])
                break
    finally:
        bar.close()
        if hasattr(opt, "close"):
            opt.close()
        del batches
    nowcasts = [n for n in getattr(opt, "nowcasts", []) if "seconds" in n]  # the nowcasts the backend computed
    decisions = [{k: n.get(k) for k in DECISION_KEYS} for n in getattr(opt, "nowcasts", [])]
    values = [c[1] for c in curve if not math.isnan(c[1])]
    best = (max(values) if task.higher_is_better else min(values)) if values else float("nan")
    return {
        "task": task.name, "method": method, "nowcaster": ref, "seed": seed, "max_steps": max_steps,
        "period": period, "eval_every": eval_every, "target": task.target, "metric": task.metric,
        "reached": reached_at is not None, "steps_to_target": reached_at, "steps_run": steps_run,
        "final_metric": curve[-1][1], "best_metric": best,
        "train_s": round(train_s, 3), "nowcast_s": round(sum(n["seconds"] for n in nowcasts), 3),
        "eval_s": round(eval_s, 3), "n_nowcasts": len(nowcasts), "nowcast_steps": nowcast_steps,
        "nowcast_k": [n["k"] for n in nowcasts], "failures": dict(getattr(opt, "failures", {}) or {}),
        "verify": verify is not None, "verify_tolerance": opt.verify.tolerance if verify is not None else None,
        "final_nowcast": final_nowcast,
        "rejected_steps": rejected_steps, "decisions": decisions, "graph": graph if ref is not None else None,
        "verify_delay": opt.verify.delay if verify is not None else None,
        "verify_max_dip": opt.verify.dip_limit if verify and opt.verify.delay else None,
        "verify_baseline": opt.verify.baseline if verify and opt.verify.delay else None,
        "verify_shadow": shadow, "probe": task.probe_description if verify is not None else None,
        "verify_confidence": opt.verify.confidence if shadow else None,
        "verify_patience": opt.checks.patience() if shadow else None,  # in force: 0 out of scope
        "shadow_steps": sum(n.get("shadow_steps") or 0 for n in decisions),
        "rollback_steps": rollback_steps,
        "snapshot_bytes_max": max((n.get("snapshot_bytes") or 0 for n in decisions), default=0),
        "verify_s": round(sum(n.get("verify_s") or 0.0 for n in decisions), 3),
        "probe_passes": sum(n.get("probe_passes") or 0 for n in decisions), "pre_final_metric": pre_final,
        "start_step": getattr(opt, "start_step", None),
        "server": server, "curve": curve, "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------- reporting
def retarget(runs: list[dict], target: float, higher_is_better: dict[str, bool]) -> list[dict]:
    """Steps to a different target, read off the stored curves (no training).

    Valid for a target no stricter than the one a run was early-stopped at: a run that stopped at 90.5 % has passed
    every lower threshold on its curve, but says nothing about 91 %.
    """
    out = []
    for r in runs:
        hib = higher_is_better[r["task"]]
        stopped_early = r["reached"] and r["steps_run"] < r["max_steps"]
        stricter = target > r["target"] if hib else target < r["target"]
        if stopped_early and stricter:
            raise ValueError(f"{r['task']} {r['method']} seed {r['seed']} stopped at its target {r['target']} "
                             f"(step {r['steps_run']}); a stricter target {target} needs runs made with "
                             "--no-early-stop or with --target")
        hit = next((step for step, v, _ in r["curve"]
                    if not math.isnan(v) and (v >= target if hib else v <= target)), None)
        out.append({**r, "target": target, "reached": hit is not None, "steps_to_target": hit})
    return out


def effective_steps(run: dict) -> int:
    return run["steps_to_target"] if run["reached"] else FAIL_FACTOR * run["max_steps"]


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (task, method): medians over seeds, speedup against AdamW on the same task."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    rows = []
    for (task, method), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        rows.append({
            "task": task, "method": method, "seeds": len(rs), "reached": sum(r["reached"] for r in rs),
            "median_steps": statistics.median(effective_steps(r) for r in rs),
            "steps_per_seed": " ".join(str(r["steps_to_target"]) if r["reached"] else f">{r['max_steps']}"
                                       for r in rs),
            "budget": rs[0]["max_steps"], "target": rs[0]["target"], "metric": rs[0]["metric"],
            "final_metric": statistics.median(r["final_metric"] for r in rs),
            "best_metric": statistics.median(r["best_metric"] for r in rs),
            "train_s_mean": statistics.mean(r["train_s"] for r in rs),
            "nowcast_s_mean": statistics.mean(r["nowcast_s"] for r in rs),
            "eval_s_mean": statistics.mean(r["eval_s"] for r in rs),
            "wall_s_total": sum(r["train_s"] + r["eval_s"] for r in rs),
            "failures": sum(sum(r["failures"].values()) for r in rs),
        })
    for row in rows:
        # AdamW median over the same seeds as the method (runs may still be missing while a benchmark is going)
        mine = {r["seed"] for r in groups[(row["task"], row["method"])]}
        base = [r for r in groups.get((row["task"], "adamw"), []) if r["seed"] in mine]
        ok = len({r["seed"] for r in base}) == len(mine) and row["median_steps"]
        row["adamw_median_same_seeds"] = statistics.median(effective_steps(r) for r in base) if ok else None
        row["speedup"] = row["adamw_median_same_seeds"] / row["median_steps"] if ok else None
    order = {"adamw": 0}
    rows.sort(key=lambda r: (r["task"], order.get(r["method"], 1), r["method"]))
    return rows


def _fmt_metric(metric: str, v: float) -> str:
    return f"{v:.2f}%" if metric.endswith("acc") else f"{v:.3f}"


def markdown(rows: list[dict], runs: list[dict]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        trs = [r for r in rows if r["task"] == task]
        t0 = trs[0]
        seeds = sorted({r["seed"] for r in runs if r["task"] == task})
        eval_every = next(r["eval_every"] for r in runs if r["task"] == task)
        period = next(r["period"] for r in runs if r["task"] == task)
        out.append(f"### {task}: target {t0['metric']} {'>=' if t0['metric'].endswith('acc') else '<='} "
                   f"{t0['target']}, budget {t0['budget']} steps, period {period}, eval every {eval_every} steps, "
                   f"seeds {', '.join(map(str, seeds))}\n")
        out.append("| method | median steps to target | speedup vs AdamW | seeds reaching target | steps per seed "
                   "| final metric (median) | train s/run (incl. nowcast) | nowcast s/run | eval s/run |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in trs:
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
            med = f"{r['median_steps']:g}"
            if r["reached"] < r["seeds"]:
                med += " *"
            out.append(f"| {r['method']} | {med} | {sp} | {r['reached']}/{r['seeds']} | {r['steps_per_seed']} | "
                       f"{_fmt_metric(r['metric'], r['final_metric'])} | {r['train_s_mean']:.1f} | "
                       f"{r['nowcast_s_mean']:.2f} | {r['eval_s_mean']:.1f} |")
        out.append("")
        if any(r["reached"] < r["seeds"] for r in trs):
            out.append(f"\\* runs that never reached the target count as {FAIL_FACTOR} x budget "
                       f"({FAIL_FACTOR * t0['budget']} steps) in the median.\n")
        fails = sum(r["failures"] for r in trs)
        if fails:
            out.append(f"Warning: {fails} nowcast failures (the wrapper fell back to AdamW steps); see runs.csv.\n")
    return "\n".join(out)


def decision_rows(runs: list[dict]) -> list[dict]:
    """Per (task, method): what happened at the nowcasts and at the budget's last call, over every seed.

    ``max_probe_increase``: the largest probe-loss change (after - before) at an accepted verified nowcast (with
    delayed checks: right after the jump, so a kept tentative jump's dip counts); ``max_delayed_change``: the
    largest change from before the jump to its delayed check, over the kept tentative jumps;
    ``max_metric_worsening``: the largest worsening of the task metric from the evaluation right before an accepted
    nowcast to the one right after (only where the curve has both: language's pre/post evaluations);
    ``final_change``: median metric change over the last call (final minus the metric before it);
    ``shadow_mean``: the shadow branches' steps per run (``Verify(shadow=True)``: compute, not training steps) and
    ``compute_to_target``: the median of steps to target plus the shadow steps taken before it (runs that never
    reach the target count as in the steps table, FAIL_FACTOR x budget)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if r["method"] != "adamw" or r.get("pre_final_metric") is not None:
            groups.setdefault((r["task"], r["method"]), []).append(r)
    rows = []
    for (task, method), rs in groups.items():
        # runs stored before decisions were recorded: every nowcast was applied
        ds = [d for r in rs for d in (r.get("decisions") or [{"accepted": True}] * r.get("n_nowcasts", 0))]
        verified = [d for d in ds if d.get("probe_before") is not None]
        accepted = [d for d in verified if d["accepted"] and d.get("probe_after") is not None]
        worse = []
        for r in rs:
            sign = -1.0 if r["metric"].endswith("acc") else 1.0
            at = {c[0]: c[1] for c in r["curve"]}
            worse += [sign * (at[s] - at[s - 1]) for s in r["nowcast_steps"] if s in at and s - 1 in at]
        finals = [r["final_metric"] - r["pre_final_metric"] for r in rs
                  if r.get("pre_final_metric") is not None and r["steps_run"] == r["max_steps"]]
        rows.append({
            "task": task, "method": method, "runs": len(rs),
            "nowcasts": sum(1 for d in ds if not d.get("skipped")),
            "accepted": sum(1 for d in ds if d.get("accepted", True) and not d.get("skipped")),
            "shrunk": sum(1 for d in accepted if d.get("alpha", 1.0) < 1.0),
            "max_probe_increase": max((d["probe_after"] - d["probe_before"] for d in accepted), default=None),
            "max_metric_worsening": max(worse, default=None),
            "final_change": statistics.median(finals) if finals else None,
            "tentative": sum(1 for d in verified if d.get("delayed")),
            "rolled_back": sum(1 for d in verified if d.get("delayed") == "rolled_back"),
            "raced": sum(1 for d in verified if d.get("extended")),
            "raced_kept": sum(1 for d in verified if d.get("extended") and d.get("delayed") == "kept"),
            "max_delayed_change": max((d["probe_delayed"] - d["probe_before"] for d in verified
                                       if d.get("delayed") == "kept" and d.get("probe_delayed") is not None),
                                      default=None),
            "snapshot_bytes_max": max((r.get("snapshot_bytes_max") or 0 for r in rs), default=0),
            "verify_s_mean": statistics.mean(r.get("verify_s", 0.0) for r in rs),
            "probe_passes_mean": statistics.mean(r.get("probe_passes", 0) for r in rs),
            "shadow_mean": statistics.mean(r.get("shadow_steps") or 0 for r in rs),
            "compute_to_target": statistics.median(compute_to_target(r) for r in rs),
        })
    rows.sort(key=lambda r: (r["task"], r["method"]))
    return rows


def compute_to_target(run: dict) -> int:
    """Steps to target plus the shadow steps of the checks that started before it (all of a check's steps:
    an upper bound when the target falls inside one)."""
    if not run["reached"]:
        return FAIL_FACTOR * run["max_steps"]
    at = run["steps_to_target"]
    return at + sum(d.get("shadow_steps") or 0 for d in run.get("decisions") or [] if d["step"] < at)


def decisions_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = ["### Nowcast decisions and the last call\n",
           "| task | method | runs | nowcasts accepted / computed (shrunk) | tentative (rolled back) | raced on "
           "(then kept) | largest "
           "probe-loss change after an accepted nowcast | largest probe-loss change at the delayed check of a kept "
           "jump | largest metric worsening after an accepted nowcast (pre/post evals) | median metric change over "
           "the last call | verify s/run | probe passes/run | rollback copy MB | shadow steps/run | median steps + "
           "shadow steps to target |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=4: "n/a" if v is None else f"{v:+.{p}f}"  # noqa: E731
    for r in rows:
        out.append(f"| {r['task']} | {r['method']} | {r['runs']} | {r['accepted']} / {r['nowcasts']} ({r['shrunk']}) | "
                   f"{r['tentative']} ({r['rolled_back']}) | {r['raced']} ({r['raced_kept']}) | "
                   f"{f(r['max_probe_increase'])} | "
                   f"{f(r['max_delayed_change'])} | {f(r['max_metric_worsening'], 3)} | {f(r['final_change'], 3)} | "
                   f"{r['verify_s_mean']:.2f} | {r['probe_passes_mean']:.0f} | {r['snapshot_bytes_max'] / 1e6:.2f} | "
                   f"{r['shadow_mean']:.0f} | {r['compute_to_target']:.0f} |")
    return "\n".join(out) + "\n"


RUN_FIELDS = ["task", "method", "seed", "reached", "steps_to_target", "steps_run", "max_steps", "period",
              "eval_every", "target", "final_metric", "best_metric", "train_s", "nowcast_s", "eval_s", "n_nowcasts",
              "failures", "nowcaster", "server", "verify", "final_nowcast", "rejected_steps", "verify_s",
              "probe_passes", "pre_final_metric", "verify_delay", "verify_max_dip", "rollback_steps",
              "snapshot_bytes_max"]
SUMMARY_FIELDS = ["task", "method", "seeds", "reached", "median_steps", "speedup", "steps_per_seed", "budget",
                  "target", "metric", "final_metric", "best_metric", "train_s_mean", "nowcast_s_mean", "eval_s_mean",
                  "wall_s_total", "failures"]


def plot(task: str, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in runs if r["task"] == task]
    methods = list(dict.fromkeys(r["method"] for r in sorted(rs, key=lambda r: r["method"] != "adamw")))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rs:
        pts = [(c[0], c[1]) for c in r["curve"] if not math.isnan(c[1])]
        if not pts:
            continue
        label = r["method"] if r is next(x for x in rs if x["method"] == r["method"]) else None
        ax.plot(*zip(*pts), color=colors[r["method"]], alpha=0.75, lw=1.2, label=label)
        post = [(c[0], c[1]) for c in r["curve"] if c[0] in set(r["nowcast_steps"]) and not math.isnan(c[1])]
        if post:
            ax.scatter(*zip(*post), color=colors[r["method"]], marker="v", s=28, zorder=3)
        rejected = [(c[0], c[1]) for c in r["curve"] if c[0] in set(r.get("rejected_steps", ()))
                    and not math.isnan(c[1])]
        if rejected:
            ax.scatter(*zip(*rejected), color=colors[r["method"]], marker="x", s=36, zorder=3)
        rolled = [(c[0], c[1]) for c in r["curve"] if c[0] in set(r.get("rollback_steps", ()))
                  and not math.isnan(c[1])]
        if rolled:
            ax.scatter(*zip(*rolled), facecolors="none", edgecolors=colors[r["method"]], marker="o", s=60,
                       zorder=3)
        if r["reached"]:
            ax.axvline(r["steps_to_target"], color=colors[r["method"]], ls=":", lw=0.8, alpha=0.6)
    t = rs[0]
    ax.axhline(t["target"], color="k", ls="--", lw=1, label=f"target {t['target']}")
    if t["metric"].endswith("acc"):
        ax.set_ylim(max(0.0, t["target"] - 20), min(100, t["target"] + 5))
        ax.set_ylabel("test accuracy (%)")
    else:
        ax.set_yscale("log")
        lo = min((c[1] for r in rs for c in r["curve"] if not math.isnan(c[1])), default=t["target"])
        ax.set_ylim(0.9 * min(lo, t["target"]), 3 * t["target"])  # nowcast spikes above 3x target are clipped
        ax.set_ylabel(t["metric"] + " (log; clipped at 3 x target)")
    ax.set_xlabel("steps (optimizer calls, nowcast steps included)")
    ax.set_title(f"{task}: {t['metric']} vs steps\n▼ = right after a nowcast step, x = a rejected nowcast, "
                 "o = a rollback (delayed check); dotted = steps to target", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out: Path, runs: list[dict]) -> list[dict]:
    rows = summarize(runs)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow({**r, "failures": json.dumps(r["failures"]) if r["failures"] else ""})
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "speedup": "" if r["speedup"] is None else round(r["speedup"], 4)})
    (out / "results.md").write_text(markdown(rows, runs) + "\n" + decisions_markdown(decision_rows(runs)))
    for task in dict.fromkeys(r["task"] for r in runs):
        plot(task, runs, out / "plots" / f"{task}.png")
    return rows


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- CLI
def run_bench_speedup(args: argparse.Namespace) -> int:
    """``ninocast bench speedup``: a task whose data is missing is a one-line error (runs already written stay)."""
    from ninocast.cli import CommandError
    from ninocast_server.tasks.base import DataMissing

    try:
        return _run_bench_speedup(args)
    except DataMissing as e:
        raise CommandError(str(e)) from None


def _run_bench_speedup(args: argparse.Namespace) -> int:
    import torch

    from ninocast.cli import CommandError
    from ninocast_server.tasks import get_task

    torch.set_num_threads(max(1, int(args.threads)))
    if args.retarget_out and not (args.report_only and args.target is not None):
        raise CommandError("--retarget-out only applies with --report-only --target (re-scoring stored curves)")
    if args.report_only:
        out = Path(args.out)
        runs = load_runs(out / "runs.jsonl")
        if not runs:
            raise CommandError(f"no runs in {out / 'runs.jsonl'}")
        if args.target is not None:
            try:
                runs = retarget(runs, args.target, {t: get_task(t).higher_is_better for t in {r["task"] for r in runs}})
            except (KeyError, ValueError) as e:
                raise CommandError(str(e.args[0])) from None
            out = Path(args.retarget_out or out / f"target-{args.target:g}")
            (out / "plots").mkdir(parents=True, exist_ok=True)
        write_reports(out, runs)
        print((out / "results.md").read_text())
        return 0
    tasks = _split(args.task) or (["digits"] if args.quick else ["fm-16"])
    refs = _split([args.nowcasters]) if args.nowcasters is not None else (["linefit"] if args.quick
                                                                            else ["nino", "wnn+", "linefit"])
    methods: list[tuple[str, str | None]] = [("adamw", None)] + [resolve_nowcaster(r) for r in refs]
    if len({m for m, _ in methods}) != len(methods):
        raise CommandError("two nowcasters resolve to the same label")
    for flag, given in (("--verify-delay", args.verify_delay), ("--verify-shadow", args.verify_shadow)):
        if given and args.verify == "off":
            raise CommandError(f"{flag} needs --verify on or both")
    verify_options: dict[str, Any] = {"tolerance": args.verify_tolerance, "delay": args.verify_delay,
                                      "baseline": args.verify_baseline, "shadow": args.verify_shadow}
    if args.verify_max_dip is not None:
        verify_options["max_dip"] = args.verify_max_dip
    if args.verify_confidence is not None:
        verify_options["confidence"] = args.verify_confidence
    if args.verify_patience is not None:
        verify_options["patience"] = args.verify_patience
    race = 0
    if args.verify != "off":
        from ninocast import Verify

        try:  # the options alone, checked before any training
            race = Verify(probe=lambda m: 0.0, **verify_options).patience_asked
        except ValueError as e:
            raise CommandError(f"--verify options: {e}") from None
    suffix = VERIFIED + (f"d{args.verify_delay}" if args.verify_delay else "")
    suffix += "-trend" if args.verify_delay and args.verify_baseline == "trend" else ""
    suffix += "s" if args.verify_shadow else ""
    suffix += f"p{race}" if race else ""  # racing on (Verify.patience): "+vdDs" alone is a one-look check
    if args.verify != "off":  # NAME+v: the same nowcaster, every nowcast verified on a probe batch
        verified = [(label + suffix, ref) for label, ref in methods[1:]]
        methods = methods[:1] + (verified if args.verify == "on" else
                                 [m for pair in zip(methods[1:], verified) for m in pair])
    graph = getattr(args, "graph", "auto")
    if graph != "auto":  # NAME@traced: the same nowcaster on the graph built from the traced topology
        traced = [(label + TRACED, ref) for label, ref in methods[1:]]
        methods = methods[:1] + (traced if graph == "traced" else
                                 [m for pair in zip(methods[1:], traced) for m in pair])
    start_step = getattr(args, "start_step", None)
    if start_step is not None:  # NAME@start=N: the same nowcaster, no nowcast in the first N calls
        if start_step < 0:
            raise CommandError(f"--start-step must be >= 0, got {start_step}")
        methods = methods[:1] + [(f"{label}@start={start_step}", ref) for label, ref in methods[1:]]
    for label, ref in methods[1:]:
        if ref and not args.server and ref != "linefit" and not Path(ref).exists():
            raise CommandError(f"nowcaster {ref!r} not found (local mode needs 'linefit', "
                             f"a .pt checkpoint or a nowcaster directory; aliases: {', '.join(ALIASES)})")
    seeds = [int(s) for s in _split([args.seeds or (QUICK["seeds"] if args.quick else "1000,2000,3000")])]
    out = Path(args.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    jsonl = out / "runs.jsonl"
    runs = load_runs(jsonl) if args.resume else []
    if not args.resume and jsonl.exists():
        jsonl.unlink()

    plan = []
    for tname in tasks:
        try:
            task = get_task(tname)
        except KeyError as e:
            raise CommandError(e.args[0]) from None
        if args.target is not None:
            task.target = args.target  # an instance attribute: the registry's class keeps its own
        quick = DIGITS_QUICK if task.name == "digits" else QUICK
        max_steps = args.max_steps or (quick["max_steps"] if args.quick else task.budget)
        period = args.period or (quick["period"] if args.quick else task.period)
        eval_every = args.eval_every or (quick["eval_every"] if args.quick else task.eval_every)
        if period % task.ctx:
            raise CommandError(f"period {period} must be a multiple of ctx {task.ctx}")
        if args.verify_delay >= period:
            raise CommandError(f"--verify-delay {args.verify_delay} must be shorter than {task.name}'s period "
                               f"{period}")
        for seed in seeds:
            for label, ref in methods:
                plan.append((task, label, ref, seed, max_steps, period, eval_every))
    config = {"argv": sys.argv, "tasks": {t.name: t.info() for t in {id(p[0]): p[0] for p in plan}.values()},
              "methods": dict(methods), "verify": args.verify, "verify_tolerance": args.verify_tolerance,
              "verify_delay": args.verify_delay, "verify_max_dip": args.verify_max_dip,
              "verify_baseline": args.verify_baseline, "verify_shadow": args.verify_shadow,
              "verify_confidence": args.verify_confidence,
              "verify_patience": race if args.verify_shadow else None,
              "final_nowcast": args.final_nowcast, "graph": graph, "start_step": start_step,
              "probe": {t.name: t.probe_description for t in {id(p[0]): p[0] for p in plan}.values()},
              "seeds": seeds, "server": args.server, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    done = {(r["task"], r["method"], r["seed"], r["max_steps"], r["period"], r["eval_every"]) for r in runs}
    t_start = time.perf_counter()
    for i, (task, label, ref, seed, max_steps, period, eval_every) in enumerate(plan, 1):
        if (task.name, label, seed, max_steps, period, eval_every) in done:
            continue
        run = run_one(task, label, ref, seed, max_steps=max_steps, period=period, eval_every=eval_every,
                      early_stop=not args.no_early_stop, server=args.server,
                      api_key=args.api_key or os.environ.get("NINOCAST_API_KEY"),
                      progress=not args.no_progress,
                      verify=verify_options if label.partition("@start=")[0].removesuffix(TRACED).endswith(suffix)
                      else None,
                      final_nowcast=args.final_nowcast,
                      graph="traced" if TRACED in label else "auto", start_step=start_step)
        runs.append(run)
        with open(jsonl, "a") as f:
            f.write(json.dumps(run) + "\n")
        write_reports(out, runs)
        st = run["steps_to_target"] if run["reached"] else f"not reached in {run['steps_run']}"
        print(f"[{i}/{len(plan)}] {task.name} {label} seed {seed}: steps to target {st}, final "
              f"{task.metric} {run['final_metric']:.4g}, train {run['train_s']:.1f} s (nowcast "
              f"{run['nowcast_s']:.2f} s), eval {run['eval_s']:.1f} s, elapsed "
              f"{time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    if not runs:
        print("no runs", file=sys.stderr)
        return 1
    write_reports(out, runs)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, summary.csv, runs.csv, runs.jsonl, plots/*.png", file=sys.stderr)
    return 0
