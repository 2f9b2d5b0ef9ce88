"""``ninocast bench suite``: one task x method table over many ``bench speedup`` output folders.

Issue 11's targets are about the whole suite (every task at least AdamW's speed, a geometric mean against the
official checkpoint), but each ``bench speedup`` run writes its own folder. This reads their ``runs.jsonl``, keeps
one run per (task, method, seed) (the first folder given wins, so a re-run can be put in front), renames methods
(``--label /long/path/ninocast-nino=new default``), and writes ``suite.md`` + ``suite.csv``: per cell the median
steps to target and the speedup against AdamW on the same seeds (the rule of ``bench speedup``: a run that never
reaches the target counts as 2 x budget; ``--target fm-32=90`` re-scores a task's stored curves at another
threshold, as ``bench speedup --report-only --target`` does), then per method the geometric mean over the tasks where it has runs on
every seed AdamW has, and how many tasks it is slower than AdamW on.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from .speedup import load_runs, retarget, summarize


def merge_runs(folders: list[Path], labels: dict[str, str]) -> tuple[list[dict], int]:
    """Runs of every folder, methods renamed by ``labels``; (runs, duplicates dropped)."""
    seen: set[tuple] = set()
    runs, dropped = [], 0
    for folder in folders:
        path = folder / "runs.jsonl" if folder.is_dir() else folder
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no runs.jsonl (a `ninocast bench speedup --out` folder?)")
        try:
            stored = load_runs(path)
            keys = [(r["task"], labels.get(r["method"], r["method"]), r["seed"]) for r in stored]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a bench speedup runs.jsonl ({type(e).__name__}: {e})") from None
        for r, key in zip(stored, keys):
            r = {**r, "method": key[1]}
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            runs.append(r)
    return runs, dropped


def retarget_tasks(runs: list[dict], targets: dict[str, float]) -> list[dict]:
    """Runs of the tasks in ``targets`` re-scored at those thresholds (others unchanged)."""
    from ..tasks import get_task

    unknown = sorted(set(targets) - {r["task"] for r in runs})
    if unknown:
        raise KeyError(f"--target names task(s) without runs: {unknown}")
    out = [r for r in runs if r["task"] not in targets]
    for task, value in targets.items():
        mine = [r for r in runs if r["task"] == task]
        out += retarget(mine, value, {task: get_task(task).higher_is_better})
    return out


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def suite_table(runs: list[dict], methods: list[str] | None = None) -> tuple[list[str], list[str], dict, dict]:
    """(tasks, methods, cells[(task, method)] = summary row, per-method totals)."""
    rows = summarize(runs)
    cells = {(r["task"], r["method"]): r for r in rows}
    tasks = sorted({r["task"] for r in rows})
    found = sorted({r["method"] for r in rows if r["method"] != "adamw"})
    methods = [m for m in (methods or found) if m != "adamw"]
    missing = [m for m in methods if m not in found]
    if missing:
        raise KeyError(f"no runs of method(s) {missing}; found {found}")
    totals = {}
    for m in methods:
        # a speedup exists only where AdamW ran every seed of the method; equal counts then mean the same seeds
        full = [t for t in tasks if (t, m) in cells and cells[(t, m)]["speedup"] is not None
                and cells[(t, m)]["seeds"] == cells[(t, "adamw")]["seeds"]]
        speedups = [cells[(t, m)]["speedup"] for t in full]
        totals[m] = {"tasks": len(full), "geomean": geomean(speedups),
                     "slower": sorted(t for t in full if cells[(t, m)]["speedup"] < 1.0)}
    return tasks, methods, cells, totals


def markdown(tasks: list[str], methods: list[str], cells: dict, totals: dict) -> str:
    def cell(t: str, m: str) -> str:
        r = cells.get((t, m))
        if r is None:
            return "—"
        med = r["median_steps"]
        med_s = f"{med:g}" + (" *" if r["reached"] * 2 <= r["seeds"] else "")
        a = cells.get((t, "adamw"))
        part = f", {r['seeds']} of {a['seeds']} seeds" if a and r["seeds"] < a["seeds"] else ""
        return f"{med_s}{part}" if r["speedup"] is None else f"{r['speedup']:.2f}x ({med_s}{part})"

    head = ["task", "AdamW (median steps)", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        a = cells.get((t, "adamw"))
        seeds = f"{a['reached']}/{a['seeds']}" if a else "0/0"
        lines.append(f"| {t} | " + (f"{a['median_steps']:g} ({seeds} reach)" if a else "—") + " | "
                     + " | ".join(cell(t, m) for m in methods) + " |")
    g = [f"{totals[m]['geomean']:.2f}x over {totals[m]['tasks']}" if totals[m]["geomean"] else "—" for m in methods]
    lines.append("| **geometric mean** (tasks with every seed) | | " + " | ".join(g) + " |")
    s = [str(len(totals[m]["slower"])) for m in methods]
    lines.append("| tasks slower than AdamW | | " + " | ".join(s) + " |")
    lines += ["", "Cells: speedup vs AdamW on the same seeds (median steps to target). * = at most half the seeds "
              "reach the target (a miss counts as 2 x budget in the median). Cells with fewer seeds than AdamW say so and are "
              "left out of the last two rows."]
    return "\n".join(lines)


def run_bench_suite(args: argparse.Namespace) -> int:
    labels = {}
    for item in args.label or []:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            print(f"ninocast bench suite: --label expects OLD=NEW, got {item!r}", file=sys.stderr)
            return 2
        labels[old] = new
    targets = {}
    for item in args.target or []:
        task, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not task or not math.isfinite(number):
            print(f"ninocast bench suite: --target expects TASK=NUMBER, got {item!r}", file=sys.stderr)
            return 2
        targets[task] = number
    try:
        runs, dropped = merge_runs([Path(p) for p in args.folders], labels)
        runs = retarget_tasks(runs, targets)
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
        tasks, methods, cells, totals = suite_table(runs, methods)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"ninocast bench suite: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(tasks, methods, cells, totals)
    (out / "suite.md").write_text(text + "\n")
    with open(out / "suite.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "seeds", "reached", "median_steps", "adamw_median_same_seeds", "speedup"])
        for (t, m), r in sorted(cells.items()):
            w.writerow([t, m, r["seeds"], r["reached"], r["median_steps"], r["adamw_median_same_seeds"],
                        "" if r["speedup"] is None else round(r["speedup"], 4)])
    print(text)
    print(f"wrote {out}/suite.md and suite.csv ({len(runs)} runs"
          + (f"; {dropped} duplicate runs dropped, the first folder's kept" if dropped else "") + ")",
          file=sys.stderr)
    return 0
