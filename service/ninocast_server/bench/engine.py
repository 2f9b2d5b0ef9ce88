"""``ninocast bench engine``: nowcast wall time and peak memory on the three reference models.

Each model runs in a fresh subprocess so its peak RSS is its own (``import torch`` alone is ~0.22 GB here).
The timed nowcast includes building the neural graph and its eigenvectors (a cold cache), as a first nowcast of
a run would; a second, warm call shows the steady state the server sees once the graph is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Reference implementation on this 2-core machine, identical inputs (issue #2): seconds, GB peak RSS.
REFERENCE = {"c10-32": (1.08, 0.48), "mlp-1m": (28.5, 4.15), "gpt2-3m": (112.0, 8.1)}
SHARED_CKPT = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "checkpoints" / "nino_no_posw.pt"


def bench_spec(name: str):
    from ninocast.spec import ModelSpec

    if name == "c10-32":  # vision Net C10-32: 3x3 convs (32, 64, 64) on 3 channels, linear to 10 classes
        params = [("fc.0.weight", (32, 3, 3, 3)), ("fc.0.bias", (32,)), ("fc.2.weight", (64, 32, 3, 3)),
                  ("fc.2.bias", (64,)), ("fc.4.weight", (64, 64, 3, 3)), ("fc.4.bias", (64,)),
                  ("fc.8.weight", (10, 64)), ("fc.8.bias", (10,))]
        return ModelSpec("generic", tuple(params))
    if name == "mlp-1m":  # MLP 784-1024-256-10
        dims = [784, 1024, 256, 10]
        params = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            params += [(f"{2 * i}.weight", (b, a)), (f"{2 * i}.bias", (b,))]
        return ModelSpec("generic", tuple(params))
    if name == "gpt2-3m":  # GPT-2: 3 layers, d=64, 4 heads, vocab 50257, 1024 positions
        d, f = 64, 256
        params = [("transformer.wte.weight", (50257, d)), ("transformer.wpe.weight", (1024, d))]
        for b in range(3):
            h = f"transformer.h.{b}."
            params += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                       (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                       (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                       (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                       (h + "mlp.c_fc.weight", (d, f)), (h + "mlp.c_fc.bias", (f,)),
                       (h + "mlp.c_proj.weight", (f, d)), (h + "mlp.c_proj.bias", (d,))]
        params += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
        return ModelSpec("gpt2", tuple(params), num_heads=4)
    raise ValueError(f"unknown benchmark model {name!r}; choose from {sorted(REFERENCE)}")


def synthetic_states(n_params: int, ctx: int, seed: int = 0):
    """A drifting trajectory: a random start plus steps with a persistent direction and noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    states = torch.empty(n_params, ctx)
    w = torch.randn(n_params, generator=g) * 0.05
    drift = torch.randn(n_params, generator=g) * 1e-3
    for i in range(ctx):
        states[:, i] = w
        w = w + drift + torch.randn(n_params, generator=g) * 2e-4
    return states


def run_one(model_name: str, nowcaster_ref: str, k: int, device: str, repeat: int) -> dict:
    """Measured inside the child process."""
    import resource

    import torch

    from ninocast_server.engine.graphs import GraphCache
    from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster
    from ninocast_server.engine.runner import nowcast

    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    spec = bench_spec(model_name)
    model = load_nowcaster(nowcaster_ref, device=device)
    states = synthetic_states(spec.n_params, model.ctx)
    cache = GraphCache()
    t0 = time.perf_counter()
    pred = nowcast(model, spec, states, k, graph_cache=cache)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        nowcast(model, spec, states, k, graph_cache=cache)
        warm.append(time.perf_counter() - t0)
    delta = pred - states[:, -1]
    return {
        "model": model_name, "params": spec.n_params, "nowcaster": model.name, "k": k, "device": device,
        "threads": torch.get_num_threads(), "cold_s": round(cold, 3),
        "warm_s": round(min(warm), 3) if warm else None,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "rss_after_import_gb": round(rss_after_import, 3),
        "update_norm": float(delta.norm()),
    }


def format_table(rows: list[dict]) -> str:
    lines = ["| model | params | cold nowcast (s) | warm nowcast (s) | peak RSS (GB) | reference (s / GB) | speedup | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref_t, ref_m = REFERENCE.get(r["model"], (float("nan"), float("nan")))
        lines.append(f"| {r['model']} | {r['params']:,} | {r['cold_s']:.2f} | "
                     f"{r['warm_s'] if r['warm_s'] is not None else '-'} | {r['peak_rss_gb']:.2f} | "
                     f"{ref_t} / {ref_m} | {ref_t / r['cold_s']:.1f}x | {r['peak_rss_gb'] / ref_m:.2f} |")
    return "\n".join(lines)


def run_bench_engine(args: argparse.Namespace) -> int:
    from ninocast.cli import CommandError

    ref = args.nowcaster or str(SHARED_CKPT)
    if args.nowcaster is None and not SHARED_CKPT.is_file():
        raise CommandError(f"no --nowcaster given and {SHARED_CKPT} is absent")
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        bench_spec(name)  # fail early on a bad name
        cmd = [sys.executable, "-m", "ninocast_server.bench.engine", name, ref, str(args.k), args.device,
               str(args.repeat)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            raise CommandError(f"benchmark of {name} failed:\n{res.stderr[-2000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name}: cold {row['cold_s']:.2f} s, warm {row['warm_s']} s, peak RSS {row['peak_rss_gb']:.2f} GB",
              file=sys.stderr)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    name, ref, k, device, repeat = sys.argv[1:6]
    print(json.dumps(run_one(name, ref, int(k), device, int(repeat))))
