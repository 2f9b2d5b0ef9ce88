"""``ninocast bench server``: the server's cost over the engine, measured against a real server subprocess.

Three parts, each against ``ninocast serve`` on a free loopback port (``ninocast_server.testing.ServerProcess``),
with its data dir in a fresh temporary directory:

* ``upload``: state upload throughput (MB/s, 1 MB = 10^6 bytes) against a plain file copy of the same bytes on the
  same disk (``shutil.copyfile`` of the page-cached file + fsync, which is what the server must do at least).
  Each state is sent twice: as a body in 1 MiB pieces (the server's throughput) and by
  ``NowcastClient.put_state`` (which sends its body in the same 1 MiB pieces, ``ninocast.transport.Chunked``).
* ``roundtrip``: upload of the last state + nowcast + download and decode of the answer, against the engine's own
  time (``runner.nowcast`` in this process, warm graph cache) on the same states, for the engine benchmark
  models; both sides use warm (second and later) nowcasts and report the median.
* ``load``: N concurrent sessions (one thread and one client each) streaming states and nowcasting for a fixed
  duration; p50/p99 latency per operation, errors, and the server's peak RSS (``VmHWM``).

Only loopback is used; every loop is bounded by a count or a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ninocast.transport import Chunked

from .engine import SHARED_CKPT, bench_spec, synthetic_states

MB = 1e6
UPLOAD_SPECS = {"linear-25m": (("weight", (5000, 5000)),)}  # 25M float32 parameters: 100 MB per state


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spec_for(name: str):
    from ninocast.spec import ModelSpec

    if name in UPLOAD_SPECS:
        return ModelSpec("generic", UPLOAD_SPECS[name])
    return bench_spec(name)


def encode_column(spec, flat) -> bytes:
    """(P,) float32 -> safetensors bytes of the spec's named tensors."""
    from safetensors.torch import save

    flat = flat.contiguous()
    return save({p.name: flat[p.start : p.stop].view(p.shape) for p in spec.layout})


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs; NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def client(url: str, retries: int = 0, timeout: float = 600.0):
    from ninocast.transport import NowcastClient

    return NowcastClient(url, timeout=timeout, retries=retries)


def catalogue(c) -> dict[str, dict]:
    """name -> description of the server's nowcasters (the client answers the list or the whole catalogue)."""
    cat = c.nowcasters()
    return {n["name"]: n for n in (cat["nowcasters"] if isinstance(cat, dict) else cat)}


# ------------------------------------------------------------------------------------------------ upload
def bench_upload(url: str, work: Path, names: list[str], repeat: int) -> list[dict]:
    import httpx
    import torch

    rows = []
    http = httpx.Client(base_url=url, timeout=600)
    with client(url) as c:
        for name in names:
            spec = spec_for(name)
            body = encode_column(spec, torch.randn(spec.n_params, generator=torch.Generator().manual_seed(0)))
            size = len(body)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            src = work / f"copy-src-{name}.safetensors"
            src.write_bytes(body)
            sid = c.create_session(spec, nowcaster="linefit", ctx=2, name=f"bench-upload-{name}")["id"]
            up, cl, cp = [], [], []
            for i in range(repeat + 1):  # the first of each is a warm-up
                t0 = time.perf_counter()
                r = http.put(f"/v1/sessions/{sid}/states/{1000 * (2 * i + 1)}", content=Chunked(body), headers=headers)
                t1 = time.perf_counter()
                if r.status_code != 201 or r.json()["bytes"] != size:
                    raise RuntimeError(f"upload answered {r.status_code}: {r.text[:300]}")
                c.put_state(sid, 1000 * (2 * i + 2), body)
                t2 = time.perf_counter()
                dst = work / f"copy-dst-{name}-{i}.safetensors"
                shutil.copyfile(src, dst)
                fd = os.open(dst, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                t3 = time.perf_counter()
                dst.unlink()
                if i:
                    up.append(t1 - t0)
                    cl.append(t2 - t1)
                    cp.append(t3 - t2)
            c.delete_session(sid)
            src.unlink()
            row = {"model": name, "params": spec.n_params, "bytes": size,
                   "upload_s": statistics.median(up), "client_s": statistics.median(cl), "copy_s": statistics.median(cp),
                   "upload_mb_s": size / MB / statistics.median(up), "client_mb_s": size / MB / statistics.median(cl),
                   "copy_mb_s": size / MB / statistics.median(cp), "upload_best_mb_s": size / MB / min(up),
                   "client_best_mb_s": size / MB / min(cl), "copy_best_mb_s": size / MB / min(cp)}
            row["ratio"] = row["upload_mb_s"] / row["copy_mb_s"]
            row["client_ratio"] = row["client_mb_s"] / row["copy_mb_s"]
            log(f"upload {name}: {row['upload_mb_s']:.0f} MB/s streamed, {row['client_mb_s']:.0f} MB/s by "
                f"NowcastClient.put_state, vs copy {row['copy_mb_s']:.0f} MB/s ({row['ratio']:.0%})")
            rows.append(row)
    http.close()
    return rows


# ------------------------------------------------------------------------------------------------ round trip
def bench_roundtrip(url: str, nowcaster_dir: Path, names: list[str], k: int, repeat: int, device: str) -> list[dict]:
    """Server and engine runs alternate, so both see the same machine load (others may share the cores)."""
    import gc

    import httpx
    import torch
    from safetensors.torch import load

    from ..engine.graphs import GraphCache
    from ..engine.nowcasters.checkpoint import load_nowcaster
    from ..engine.runner import nowcast

    rows = []
    http = httpx.Client(base_url=url, timeout=3600)
    octet = {"Content-Type": "application/octet-stream"}
    with client(url, timeout=3600) as c:
        ctx = catalogue(c)[nowcaster_dir.name]["ctx"]
        for name in names:
            spec = bench_spec(name)
            states = synthetic_states(spec.n_params, ctx + repeat + 1)
            bodies = [encode_column(spec, states[:, j]) for j in range(states.shape[1])]
            model = load_nowcaster(str(nowcaster_dir), device=device)
            cache = GraphCache()
            t0 = time.perf_counter()
            nowcast(model, spec, states[:, :ctx].contiguous(), k, graph_cache=cache)
            eng_cold = time.perf_counter() - t0
            sid = c.create_session(spec, nowcaster=nowcaster_dir.name, name=f"bench-roundtrip-{name}")["id"]
            for j in range(ctx):
                c.put_state(sid, 100 * j, bodies[j])
            t0 = time.perf_counter()
            c.nowcast(sid, k=k)  # cold: builds the graph
            cold = time.perf_counter() - t0
            log(f"roundtrip {name}: cold nowcast: server {cold:.2f} s, engine {eng_cold:.2f} s")
            trips, ups, downs, srv_timing, eng = [], [], [], [], []
            for r in range(repeat + 1):  # r = 0 is the second nowcast of each side: warm, measured
                j = ctx + r
                t0 = time.perf_counter()
                ack = http.put(f"/v1/sessions/{sid}/states/{100 * j}", content=Chunked(bodies[j]), headers=octet)
                t1 = time.perf_counter()
                resp = http.post(f"/v1/sessions/{sid}/nowcast", json={"k": k})
                out = load(resp.content) if resp.status_code == 200 else None
                t2 = time.perf_counter()
                if ack.status_code != 201 or out is None or set(out) != set(spec.names):
                    raise RuntimeError(f"round trip failed: {ack.status_code} {ack.text[:200]} / "
                                       f"{resp.status_code} {resp.text[:200] if out is None else ''}")
                trips.append(t2 - t0)
                ups.append(t1 - t0)
                downs.append(t2 - t1)
                srv_timing.append(_server_timing(resp.headers.get("server-timing", "")))
                window = states[:, r + 1 : r + 1 + ctx].contiguous()  # the same states the server used
                t0 = time.perf_counter()
                pred = nowcast(model, spec, window, k, graph_cache=cache)
                eng.append(time.perf_counter() - t0)
                got = torch.cat([out[n].reshape(-1) for n in spec.names])
                if not torch.allclose(got, pred, rtol=1e-4, atol=1e-5):
                    raise RuntimeError(f"{name}: the server's nowcast differs from the engine's "
                                       f"(max {float((got - pred).abs().max()):.3g})")
            c.delete_session(sid)
            del model, cache
            gc.collect()
            row = {"model": name, "params": spec.n_params, "state_bytes": len(bodies[0]), "ctx": ctx, "k": k,
                   "server_cold_s": cold, "engine_cold_s": eng_cold,
                   "roundtrip_s": statistics.median(trips), "upload_s": statistics.median(ups),
                   "nowcast_download_s": statistics.median(downs), "engine_s": statistics.median(eng),
                   "server_load_s": statistics.median(t["load"] for t in srv_timing),
                   "server_compute_s": statistics.median(t["compute"] for t in srv_timing),
                   "overhead_pairs": [round(t / e - 1, 4) for t, e in zip(trips, eng)],
                   "roundtrips": [round(x, 4) for x in trips], "engine_runs": [round(x, 4) for x in eng]}
            row["overhead"] = row["roundtrip_s"] / row["engine_s"] - 1
            log(f"roundtrip {name}: {row['roundtrip_s']:.3f} s vs engine {row['engine_s']:.3f} s "
                f"(overhead {row['overhead']:+.1%}; per pair {row['overhead_pairs']})")
            rows.append(row)
    http.close()
    return rows


def _server_timing(header: str) -> dict[str, float]:
    out = {"load": float("nan"), "compute": float("nan"), "total": float("nan")}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name in out and dur:
            out[name] = float(dur) / 1e3
    return out


# ------------------------------------------------------------------------------------------------ load
def bench_load(server, model_name: str, nowcaster: str, k: int, sessions: int, duration: float, think: float,
               nowcast_every: int) -> dict:
    import torch

    spec = spec_for(model_name)
    url = server.url
    with client(url) as c:
        ctx = catalogue(c)[nowcaster]["ctx"]
    lat: dict[str, list[float]] = {"upload": [], "nowcast": [], "queue_wait": [], "compute": []}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration
    rss_samples: list[int] = []
    stop_sampler = threading.Event()

    def sampler() -> None:
        while not stop_sampler.wait(0.5):
            v = server.proc_status("VmRSS")
            if v:
                rss_samples.append(v)

    def run(i: int) -> None:
        import httpx
        from safetensors.torch import load

        g = torch.Generator().manual_seed(i)
        base = torch.randn(spec.n_params, generator=g) * 0.05
        drift = torch.randn(spec.n_params, generator=g) * 1e-3
        cycle = [encode_column(spec, base + j * drift) for j in range(8)]  # reused with growing steps
        my_up, my_now, my_wait, my_compute, my_err = [], [], [], [], []
        try:
            with client(url, timeout=120) as c, httpx.Client(base_url=url, timeout=120) as http:
                sid = c.create_session(spec, nowcaster=nowcaster, name=f"bench-load-{i}")["id"]
                n = 0
                while time.monotonic() < deadline and n < 1_000_000:
                    try:
                        t0 = time.perf_counter()
                        c.put_state(sid, 10 * n, cycle[n % len(cycle)])
                        my_up.append(time.perf_counter() - t0)
                        n += 1
                        if n >= ctx and n % nowcast_every == 0 and time.monotonic() < deadline:
                            t0 = time.perf_counter()
                            r = http.post(f"/v1/sessions/{sid}/nowcast", json={"k": k})
                            if r.status_code != 200:
                                raise RuntimeError(f"nowcast answered {r.status_code}: {r.text[:200]}")
                            out = load(r.content)
                            my_now.append(time.perf_counter() - t0)
                            st = _server_timing(r.headers.get("server-timing", ""))
                            my_compute.append(st["load"] + st["compute"])
                            my_wait.append(st["total"] - st["load"] - st["compute"])
                            if set(out) != set(spec.names) or not all(bool(torch.isfinite(t).all()) for t in out.values()):
                                my_err.append("nowcast: wrong or non-finite answer")
                    except Exception as e:  # counted, not fatal: the load goes on
                        my_err.append(f"{type(e).__name__}: {e}"[:300])
                    if think:
                        time.sleep(think)
                c.delete_session(sid)
        except Exception as e:
            my_err.append(f"session: {type(e).__name__}: {e}"[:300])
        with lock:
            lat["upload"] += my_up
            lat["nowcast"] += my_now
            lat["queue_wait"] += my_wait
            lat["compute"] += my_compute
            errors.extend(my_err)

    rss_start = server.proc_status("VmRSS")
    la0 = load_avg()
    threads = [threading.Thread(target=run, args=(i,), name=f"load-{i}", daemon=True) for i in range(sessions)]
    smp = threading.Thread(target=sampler, daemon=True)
    smp.start()
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 600)
    wall = time.monotonic() - t0
    stop_sampler.set()
    smp.join(2)
    hung = sum(t.is_alive() for t in threads)
    if hung:
        errors.append(f"{hung} session thread(s) still running {wall:.0f} s after the start")
    res = {"model": model_name, "params": spec.n_params, "state_bytes": len(encode_column(spec, torch.zeros(spec.n_params))),
           "nowcaster": nowcaster, "ctx": ctx, "k": k, "sessions": sessions, "duration_s": duration,
           "wall_s": round(wall, 1), "think_s": think, "nowcast_every": nowcast_every,
           "uploads": len(lat["upload"]), "nowcasts": len(lat["nowcast"]), "errors": len(errors),
           "error_samples": sorted(set(errors))[:10],
           "peak_rss_bytes": server.proc_status("VmHWM"), "rss_start_bytes": rss_start,
           "rss_end_bytes": server.proc_status("VmRSS"), "load_avg_before": la0, "load_avg_after": load_avg()}
    for op, xs in lat.items():
        res[f"{op}_p50_s"], res[f"{op}_p99_s"] = pct(xs, 50), pct(xs, 99)
        res[f"{op}_max_s"] = max(xs) if xs else float("nan")
        res[f"{op}_per_s"] = len(xs) / wall
    log(f"load: {res['uploads']} uploads, {res['nowcasts']} nowcasts, {res['errors']} errors in {wall:.0f} s; "
        f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
    return res


# ------------------------------------------------------------------------------------------------ report
def format_report(res: dict) -> str:
    out = []
    if res.get("upload"):
        out += ["### State upload throughput (loopback)", "",
                "| state | bytes | upload, body in 1 MiB pieces (MB/s, median / best) | NowcastClient.put_state (MB/s, median / best) | file copy + fsync (MB/s, median / best) | upload / copy | target >= 50% |",
                "|---|---|---|---|---|---|---|"]
        for r in res["upload"]:
            out.append(f"| {r['model']} ({r['params']:,} params) | {r['bytes'] / MB:.1f} MB | "
                       f"{r['upload_mb_s']:.0f} / {r['upload_best_mb_s']:.0f} | {r['client_mb_s']:.0f} / "
                       f"{r['client_best_mb_s']:.0f} | {r['copy_mb_s']:.0f} / {r['copy_best_mb_s']:.0f} | "
                       f"{r['ratio']:.0%} ({r['client_ratio']:.0%} by put_state) | "
                       f"{'met' if r['ratio'] >= 0.5 else 'MISSED'} |")
        out.append("")
    if res.get("roundtrip"):
        out += ["### Nowcast round trip vs engine (warm graph cache, median of warm runs)", "",
                "| model | params | state | round trip (s) | = upload + nowcast & download (s) | server load / compute (s) | engine (s) | overhead | cold: server / engine (s) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in res["roundtrip"]:
            target = " (target < 20%: " + ("met)" if r["overhead"] < 0.2 else "MISSED)") if r["model"] == "gpt2-3m" else ""
            out.append(f"| {r['model']} | {r['params']:,} | {r['state_bytes'] / MB:.2f} MB | {r['roundtrip_s']:.3f} | "
                       f"{r['upload_s']:.3f} + {r['nowcast_download_s']:.3f} | {r['server_load_s']:.3f} / "
                       f"{r['server_compute_s']:.3f} | {r['engine_s']:.3f} | {r['overhead']:+.1%}{target} | "
                       f"{r['server_cold_s']:.2f} / {r['engine_cold_s']:.2f} |")
        out.append("")
    if res.get("load"):
        r = res["load"]
        out += [f"### Sustained load: {r['sessions']} sessions x {r['duration_s']:.0f} s, {r['model']} "
                f"({r['params']:,} params, {r['state_bytes'] / 1e3:.0f} kB states), nowcaster {r['nowcaster']} "
                f"(ctx {r['ctx']}, k {r['k']}), a nowcast every {r['nowcast_every']} uploads, {r['think_s']} s "
                "pause after each request", "",
                "| operation | count | per second | p50 (ms) | p99 (ms) | max (ms) |", "|---|---|---|---|---|---|"]
        for op, label in (("upload", "upload (PUT state)"), ("nowcast", "nowcast (POST + download)"),
                          ("queue_wait", "... of which waiting for the worker"),
                          ("compute", "... of which load states + compute")):
            count = r[op + "s"] if op in ("upload", "nowcast") else r["nowcasts"]
            out.append(f"| {label} | {count} | {r[op + '_per_s']:.1f} | {r[op + '_p50_s'] * 1e3:.1f} | "
                       f"{r[op + '_p99_s'] * 1e3:.1f} | {r[op + '_max_s'] * 1e3:.1f} |")
        out += ["", f"errors: **{r['errors']}** (target 0); server peak RSS (VmHWM): "
                f"**{(r['peak_rss_bytes'] or 0) / 2**20:.0f} MiB** (RSS {(r['rss_start_bytes'] or 0) / 2**20:.0f} MiB "
                f"at the start, {(r['rss_end_bytes'] or 0) / 2**20:.0f} MiB at the end); load average before / after: "
                f"{r['load_avg_before']} / {r['load_avg_after']}"]
        if r["error_samples"]:
            out += ["", "error samples:"] + [f"- `{e}`" for e in r["error_samples"]]
        out.append("")
    return "\n".join(out)


def import_nowcaster(ckpt: Path, models_dir: Path) -> Path:
    from ..testing import cli_cmd, server_env

    out = models_dir / ckpt.stem
    res = subprocess.run(cli_cmd("import-checkpoint", str(ckpt), "-o", str(out)), env=server_env(),
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"import-checkpoint failed:\n{res.stderr[-2000:]}")
    return out


def run_bench_server(args: argparse.Namespace) -> int:
    from ninocast.cli import CommandError

    from ..testing import ServerProcess

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"upload", "roundtrip", "load"}:
        raise CommandError(f"--parts takes upload, roundtrip, load; got {args.parts!r}")
    ckpt = Path(args.nowcaster) if args.nowcaster else SHARED_CKPT
    need_nino = "roundtrip" in parts or ("load" in parts and args.load_nowcaster != "linefit")
    if need_nino and not ckpt.is_file():
        raise CommandError(f"{ckpt} is absent: pass --nowcaster FILE.pt (or --parts upload / "
                           "--load-nowcaster linefit)")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    uploads = [m.strip() for m in args.upload_models.split(",") if m.strip()]
    for n in names + uploads + [args.load_model]:
        spec_for(n)  # fail early on a bad name
    if args.threads:  # this process's engine and the server's, alike
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    base = Path(args.work_dir) if args.work_dir else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ninocast-bench-server-", dir=base))
    import torch

    res: dict[str, Any] = {"load_avg_start": load_avg(), "cores": os.cpu_count(), "work_dir": str(work),
                           "torch_threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    log(f"bench server in {work}; load average {res['load_avg_start']}")
    try:
        models = work / "models"
        models.mkdir()
        nowcaster_dir = import_nowcaster(ckpt, models) if need_nino else None
        settings = {"device": args.device, "models_dir": models if need_nino else None}
        if parts & {"upload", "roundtrip"}:
            with ServerProcess(work / "data", log=work / "server.log", **settings) as srv:
                if "upload" in parts:
                    res["upload"] = bench_upload(srv.url, work, uploads, args.repeat)
                if "roundtrip" in parts:
                    res["roundtrip"] = bench_roundtrip(srv.url, nowcaster_dir, names, args.k, args.repeat,
                                                       args.device)
                res["server_peak_rss_bytes"] = srv.proc_status("VmHWM")
        if "load" in parts:
            load_nc = nowcaster_dir.name if args.load_nowcaster == "nino" else args.load_nowcaster
            with ServerProcess(work / "data-load", log=work / "server-load.log", **settings) as srv:
                res["load"] = bench_load(srv, args.load_model, load_nc, args.k, args.sessions, args.duration,
                                         args.think, args.nowcast_every)
        res["load_avg_end"] = load_avg()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = format_report(res)
    print(report)
    print(f"\nload average at the start / end: {res['load_avg_start']} / {res.get('load_avg_end')} "
          f"({res['cores']} cores, {res['torch_threads']} torch threads per process)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    failed = [r["model"] for r in res.get("upload", []) if r["ratio"] < 0.5]
    failed += [r["model"] for r in res.get("roundtrip", []) if r["model"] == "gpt2-3m" and r["overhead"] >= 0.2]
    if res.get("load", {}).get("errors"):
        failed.append("load errors")
    if failed:
        log(f"targets missed: {', '.join(failed)}")
    return 0
