"""``ninocast bench client``: what the training-loop client costs the loop (docs/benchmarks-client.md).

1. Ordinary steps: the median wall time of a non-nowcast step with ``NowcastOptimizer`` against the bare base
   optimizer, on an MLP of about 1M parameters (target: under 2% overhead). Two identical models train side by
   side and the two steps alternate, so load from other processes hits both alike. Measured twice: the
   ``step()`` call alone (the wrapper's own cost against AdamW's), and the whole iteration (zero_grad, forward,
   backward, step). Snapshot steps (one call in ``period // ctx``) are timed separately.
2. Nowcast steps: the wall time of the ``step()`` call that nowcasts, end to end as the loop sees it (wait for
   pending uploads, request, write the parameters), in local mode and through a real server (started on a free
   loopback port unless ``--server`` is given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def make_model(width: int, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


WRAPPED = ("wrapped_local", "wrapped_server")


def bench_ordinary(width: int, steps: int, batch: int, period: int, url: str | None,
                   api_key: str | None = None) -> dict[str, Any]:
    """Bare AdamW (twice: the second twin shows the noise floor) and NowcastOptimizer(AdamW) in local mode and in
    server mode (snapshots uploaded in the background to ``url``) on identical models, steps interleaved in
    rotating order. ``steps`` < ``period``: no nowcast happens; snapshot calls (every period // 5) are timed on
    their own, and the mean over all calls shows what they and the uploads cost amortised."""
    import torch
    from torch import nn

    from ninocast import NowcastOptimizer

    keys = ["bare", "bare_twin", "wrapped_local"] + (["wrapped_server"] if url else [])
    models = {key: make_model(width) for key in keys}
    opts: dict[str, Any] = {key: torch.optim.AdamW(models[key].parameters(), lr=1e-3) for key in keys}
    common = dict(period=period, max_train_steps=100 * period)
    opts["wrapped_local"] = NowcastOptimizer(opts["wrapped_local"], models["wrapped_local"], local=True,
                                             nowcaster="linefit", **common)
    if url:
        opts["wrapped_server"] = NowcastOptimizer(opts["wrapped_server"], models["wrapped_server"], server=url,
                                                  api_key=api_key, **common)
    n_params = sum(p.numel() for p in models["bare"].parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
    q = opts["wrapped_local"].snapshot_interval
    t_step: dict[str, list[float]] = {k: [] for k in keys}
    t_iter: dict[str, list[float]] = {k: [] for k in keys}
    snapshot_calls: list[int] = []
    for s in range(steps):
        if (s + 1) % q == 0:
            snapshot_calls.append(s)
        for key in keys[s % len(keys):] + keys[: s % len(keys)]:  # rotate who goes first
            model, opt = models[key], opts[key]
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            t_step[key].append(t2 - t1)
            t_iter[key].append(t2 - t0)
    failures = {}
    for key in WRAPPED:
        if key in opts:
            opts[key].close()
            failures[key] = dict(opts[key].failures)
    if any(failures.values()):
        raise RuntimeError(f"the wrapped optimizers failed during the benchmark: {failures}")
    warm = 20  # the first steps allocate Adam's state
    ordinary = [i for i in range(warm, steps) if i not in set(snapshot_calls)]
    out: dict[str, Any] = {"n_params": n_params, "steps": steps, "batch": batch, "period": period,
                           "snapshot_every": q, "snapshot_calls": len(snapshot_calls), "server": bool(url)}
    for what, table in (("step", t_step), ("iteration", t_iter)):
        med = {k: statistics.median(table[k][i] for i in ordinary) * 1e3 for k in keys}
        row: dict[str, Any] = {f"{k}_ms": round(v, 4) for k, v in med.items()}
        for k in keys[1:]:
            # paired: the median of per-step differences against bare (drifting load cancels out)
            paired = statistics.median(table[k][i] - table["bare"][i] for i in ordinary) * 1e3
            row[f"{k}_pct"] = round(100 * (med[k] / med["bare"] - 1), 2)
            row[f"{k}_paired_pct"] = round(100 * paired / med["bare"], 2)
            # all calls after warm-up, snapshot calls and background uploads included: the amortised cost
            row[f"{k}_mean_all_pct"] = round(100 * (statistics.mean(table[k][warm:]) /
                                                    statistics.mean(table["bare"][warm:]) - 1), 2)
        out[what] = row
    out["snapshot_step_ms"] = {k: round(statistics.median(t_step[k][i] for i in snapshot_calls) * 1e3, 3)
                               for k in keys if snapshot_calls}
    out["wrapper_call_us"] = round(wrapper_call_overhead_us(), 3)
    out["wrapper_call_pct"] = round(100 * out["wrapper_call_us"] / 1e3 / out["step"]["bare_ms"], 4)
    return out


def wrapper_call_overhead_us(calls: int = 20_000, rounds: int = 15) -> float:
    """The wrapper's own Python cost per ordinary ``step()``: a no-op base optimizer, wrapped or called bare."""
    import torch
    from torch import nn

    from ninocast import NowcastOptimizer

    class NoOp(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            return None

    model = nn.Linear(2, 2)
    bare = NoOp(model.parameters())
    wrapped = NowcastOptimizer(NoOp(model.parameters()), model, local=True, nowcaster="linefit",
                               period=10 * calls, max_train_steps=10 * calls)
    best: dict[str, float] = {}
    for _ in range(rounds):  # best of several rounds: the least disturbed by other processes
        for key, opt in (("bare", bare), ("wrapped", wrapped)):
            t0 = time.perf_counter()
            for _ in range(calls):
                opt.step()
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)
    wrapped.close()
    return (best["wrapped"] - best["bare"]) / calls * 1e6


def bench_nowcast(width: int, nowcasts: int, period: int, batch: int, server: str | None,
                  nowcaster: str | None, api_key: str | None) -> dict[str, Any]:
    """Time the nowcast calls of a short run; snapshot calls and ordinary calls for comparison."""
    import torch
    from torch import nn

    from ninocast import NowcastOptimizer

    model = make_model(width)
    kw: dict[str, Any] = dict(server=server, api_key=api_key, nowcaster=nowcaster) if server else \
        dict(local=True, nowcaster=nowcaster or "linefit")
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, period=period,
                           max_train_steps=period * max(nowcasts, 1), **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
    t_nowcast, t_snapshot, t_ordinary = [], [], []
    t_start = time.perf_counter()
    for s in range(period * nowcasts):
        kind = "nowcast" if not opt.need_grads else ("snapshot" if (s + 1) % opt.snapshot_interval == 0
                                                     else "ordinary")
        if opt.need_grads:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        {"nowcast": t_nowcast, "snapshot": t_snapshot, "ordinary": t_ordinary}[kind].append(dt)
    total = time.perf_counter() - t_start
    opt.close()
    if opt.failures:
        raise RuntimeError(f"nowcasts failed during the benchmark: {dict(opt.failures)}")
    info = getattr(opt.backend, "last_info", {}) or {}
    return {"mode": "server" if server else "local", "nowcaster": nowcaster or "linefit (default)",
            "nowcasts": len(t_nowcast), "period": period,
            "nowcast_step_ms": {"median": round(_median_ms(t_nowcast), 2), "min": round(min(t_nowcast) * 1e3, 2),
                                "max": round(max(t_nowcast) * 1e3, 2)},
            "snapshot_step_ms": round(_median_ms(t_snapshot), 3),
            "ordinary_step_ms": round(_median_ms(t_ordinary), 3),
            "server_timing_last": info.get("server_timing"), "run_s": round(total, 2)}


def run_bench_client(args: argparse.Namespace) -> int:
    import os

    import torch

    torch.set_num_threads(args.threads)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    unknown = parts - {"ordinary", "nowcast"}
    if unknown:
        raise ValueError(f"unknown --parts {sorted(unknown)}; choose from ordinary, nowcast")
    result: dict[str, Any] = {"threads": args.threads, "width": args.width,
                              "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    print(f"# ninocast bench client: MLP {args.width}-{2 * args.width}-{args.width}, {args.threads} thread(s), "
          f"load average {result['load_avg_start']}", flush=True)
    server = None
    url = args.server
    try:
        if url is None and not args.no_server:
            from ..testing import ServerProcess

            tmp = tempfile.mkdtemp(prefix="ninocast-bench-client-")
            server = ServerProcess(Path(tmp) / "data", log_level="warning").start()
            url = server.url
        result["server"] = None if url is None else ("started by the benchmark (loopback)" if server else url)
        if "ordinary" in parts:
            r = bench_ordinary(args.width, args.steps, args.batch, args.period, url, args.api_key)
            result["ordinary"] = r
            _print_ordinary(r)
        if "nowcast" in parts:
            result["nowcast"] = []
            for u in [None] + ([url] if url else []):
                r = bench_nowcast(args.width, args.nowcasts, args.nowcast_period, args.batch, u, args.nowcaster,
                                  args.api_key)
                result["nowcast"].append(r)
                _print_nowcast(r)
    finally:
        if server is not None:
            server.stop()
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"# load average at the end {result['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _print_ordinary(r: dict[str, Any]) -> None:
    print(f"ordinary steps ({r['n_params']:,} params, {r['steps']} interleaved calls each, {r['snapshot_calls']} "
          f"of them snapshot calls; medians of the other calls, overhead against bare):")
    for what in ("step", "iteration"):
        v = r[what]
        cells = [f"bare {v['bare_ms']:.3f} ms"]
        for k in ("bare_twin",) + WRAPPED:
            if f"{k}_ms" in v:
                cells.append(f"{k} {v[f'{k}_ms']:.3f} ms {v[f'{k}_pct']:+.2f}% (paired {v[f'{k}_paired_pct']:+.2f}%,"
                             f" mean of all calls {v[f'{k}_mean_all_pct']:+.2f}%)")
        print(f"  {what}:\n    " + "\n    ".join(cells))
    print(f"  the wrapper's own cost per ordinary call: {r['wrapper_call_us']} us "
          f"({r['wrapper_call_pct']}% of a bare AdamW step)")
    print(f"  snapshot calls (1 in {r['snapshot_every']}), median ms: {r['snapshot_step_ms']}", flush=True)


def _print_nowcast(r: dict[str, Any]) -> None:
    v = r["nowcast_step_ms"]
    print(f"nowcast step, {r['mode']} ({r['nowcaster']}, {r['nowcasts']} nowcasts): median {v['median']} ms "
          f"(min {v['min']}, max {v['max']}); snapshot step {r['snapshot_step_ms']} ms; ordinary step "
          f"{r['ordinary_step_ms']} ms" + (f"; server {r['server_timing_last']}" if r.get("server_timing_last")
                                           else ""), flush=True)
