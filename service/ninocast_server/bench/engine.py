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
    if name in TRANSFORMERS:
        family, dims = TRANSFORMERS[name]
        return gpt2_bench_spec(*dims) if family == "gpt2" else llama_bench_spec(*dims)
    raise ValueError(f"unknown benchmark model {name!r}; choose from {sorted(REFERENCE) + sorted(TRANSFORMERS)}")


# Sizes beyond the reference's reach (issue #16): family, (layers, d, heads[, kv heads, inner, vocab]).
TRANSFORMERS = {
    "gpt2-3m": ("gpt2", (3, 64, 4)),
    "gpt2-45m": ("gpt2", (6, 512, 8)),
    "gpt2-124m": ("gpt2", (12, 768, 12)),  # GPT-2 small, 124,439,808 parameters (lm_head tied, absent)
    "llama-30m": ("llama", (4, 512, 8, 2, 1536, 32000)),
    "llama-1b": ("llama", (16, 2048, 32, 8, 8192, 128256)),  # Llama-3.2-1B's shape, 1,235,814,400 parameters
}


def gpt2_bench_spec(layers: int, d: int, heads: int, vocab: int = 50257, positions: int = 1024):
    """HF GPT2LMHeadModel's tensors (lm_head tied to wte, so absent), MLP width 4d."""
    from ninocast.spec import ModelSpec

    f = 4 * d
    params = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (positions, d))]
    for b in range(layers):
        h = f"transformer.h.{b}."
        params += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                   (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                   (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                   (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                   (h + "mlp.c_fc.weight", (d, f)), (h + "mlp.c_fc.bias", (f,)),
                   (h + "mlp.c_proj.weight", (f, d)), (h + "mlp.c_proj.bias", (d,))]
    params += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return ModelSpec("gpt2", tuple(params), num_heads=heads)


def llama_bench_spec(layers: int, d: int, heads: int, kv: int, inner: int, vocab: int, tied: bool = True):
    """HF LlamaForCausalLM's tensors, grouped-query attention; tied embeddings (no lm_head) unless ``tied=False``."""
    from ninocast.spec import ModelSpec

    dkv = d // heads * kv
    params = [("model.embed_tokens.weight", (vocab, d))]
    for b in range(layers):
        h = f"model.layers.{b}."
        params += [(h + "self_attn.q_proj.weight", (d, d)), (h + "self_attn.k_proj.weight", (dkv, d)),
                   (h + "self_attn.v_proj.weight", (dkv, d)), (h + "self_attn.o_proj.weight", (d, d)),
                   (h + "mlp.gate_proj.weight", (inner, d)), (h + "mlp.up_proj.weight", (inner, d)),
                   (h + "mlp.down_proj.weight", (d, inner)), (h + "input_layernorm.weight", (d,)),
                   (h + "post_attention_layernorm.weight", (d,))]
    params += [("model.norm.weight", (d,))]
    if not tied:
        params += [("lm_head.weight", (vocab, d))]
    return ModelSpec("llama", tuple(params), num_heads=heads, num_key_value_heads=kv)


def synthetic_states(n_params: int, ctx: int, seed: int = 0, rows: int = 2**22, dtype=None):
    """A drifting trajectory: a random start plus steps with a persistent direction and noise. Made
    ``rows`` parameters at a time, so the only full-size allocation is the (P, ctx) result (of ``dtype``,
    default float32)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    states = torch.empty(n_params, ctx, dtype=dtype or torch.float32)
    for r0 in range(0, n_params, rows):
        n = min(rows, n_params - r0)
        w = torch.randn(n, generator=g) * 0.05
        drift = torch.randn(n, generator=g) * 1e-3
        for i in range(ctx):
            states[r0:r0 + n, i] = w
            w = w + drift + torch.randn(n, generator=g) * 2e-4
    return states


def run_one(model_name: str, nowcaster_ref: str, k: int, device: str, repeat: int,
            states_dtype: str = "float32") -> dict:
    """Measured inside the child process. The states are handed over (``consume_states``), as the server does
    with states it has just read: the engine scales them in place instead of copying them."""
    import resource

    import torch

    from ninocast_server.engine.graphs import GraphCache
    from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster
    from ninocast_server.engine.runner import nowcast

    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    spec = bench_spec(model_name)
    model = load_nowcaster(nowcaster_ref, device=device)
    dtype = getattr(torch, states_dtype)
    states = synthetic_states(spec.n_params, model.ctx, dtype=dtype)
    head = min(spec.n_params, 2**20)
    newest = states[:head, -1].float()  # for the update norm: the states themselves are consumed
    rss_states = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cache = GraphCache()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    pred = nowcast(model, spec, states, k, graph_cache=cache, consume_states=True)
    cold = time.perf_counter() - t0
    cold_cpu = _cpu_seconds() - cpu0
    del states
    graph = cache.get(spec, with_lpe=model.needs_lpe) if model.needs_graph else None
    warm = []
    for _ in range(repeat):
        states = synthetic_states(spec.n_params, model.ctx, dtype=dtype)
        t0 = time.perf_counter()
        nowcast(model, spec, states, k, graph_cache=cache, consume_states=True)
        warm.append(time.perf_counter() - t0)
        del states
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    edges = graph.num_edges if graph is not None else spec.n_params
    return {
        "model": model_name, "params": spec.n_params, "edges": edges, "nowcaster": model.name, "k": k,
        "device": device, "threads": torch.get_num_threads(), "states_dtype": states_dtype,
        "graph": type(graph).__name__ if graph is not None else None, "cold_s": round(cold, 3),
        "cold_cpu_s": round(cold_cpu, 1),
        "warm_s": round(min(warm), 3) if warm else None,
        "peak_rss_gb": round(peak, 3), "rss_after_import_gb": round(rss_after_import, 3),
        "rss_with_states_gb": round(rss_states, 3),
        "bytes_per_edge": round((peak - rss_after_import) * 2**30 / edges, 1),
        "us_per_edge": round(cold * 1e6 / edges, 3),
        "update_norm_first_1m": float((pred[:head] - newest).norm()),
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine, cold_cpu_s / threads approximates the
    wall time on idle cores."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def format_table(rows: list[dict]) -> str:
    lines = ["| model | params | cold nowcast (s) | warm nowcast (s) | peak RSS (GB) | reference (s / GB) | speedup | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = REFERENCE.get(r["model"])
        versus = (f"{ref[0]} / {ref[1]} | {ref[0] / r['cold_s']:.1f}x | {r['peak_rss_gb'] / ref[1]:.2f}" if ref
                  else "- | - | -")
        lines.append(f"| {r['model']} | {r['params']:,} | {r['cold_s']:.2f} | "
                     f"{r['warm_s'] if r['warm_s'] is not None else '-'} | {r['peak_rss_gb']:.2f} | {versus} |")
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
               str(args.repeat), args.states_dtype]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            raise CommandError(f"benchmark of {name} failed:\n{res.stderr[-2000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name}: cold {row['cold_s']:.2f} s, warm {row['warm_s']} s, peak RSS {row['peak_rss_gb']:.2f} GB",
              file=sys.stderr)
        print(json.dumps(row), file=sys.stderr)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    name, ref, k, device, repeat, states_dtype = sys.argv[1:7]
    print(json.dumps(run_one(name, ref, int(k), device, int(repeat), states_dtype)))
