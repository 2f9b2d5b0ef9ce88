"""The ``ninocast`` command line. Subcommands that need the engine import it lazily, so the client-only install
still answers ``--help`` and says what to install."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

# Before torch loads OpenMP: spinning worker threads turn a 2-core box shared with other jobs into a 5-10x
# slowdown (mlp-1m nowcast: 40-90 s spinning vs 8 s passive at load 5; no measurable cost when idle).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SERVER_EXTRA_HINT = "this command needs the engine: pip install 'ninocast[server]'"


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (e.name.startswith("ninocast_server") or e.name in ("scipy", "fastapi", "uvicorn")):
                raise CommandError(f"{SERVER_EXTRA_HINT} (missing module {e.name!r})") from None
            raise
        return getattr(mod, func)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ninocast",
        description="Weight nowcasting for neural-network training: nowcast saved runs, serve nowcasters "
        "to a team, benchmark and train them.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("step", help="nowcast a saved run offline from ctx state files",
                       description="Read ctx safetensors state files, nowcast k snapshot intervals ahead, write "
                       "the predicted parameters. The files are ordered by the step in their metadata "
                       "('ninocast.step') or by the numbers in their names (step_200 before step_1000); an order "
                       "neither tells is refused. Keys not in the spec (buffers) pass through from the newest "
                       "file; every tensor keeps its dtype.")
    s.add_argument("states", nargs="+", metavar="STATE.safetensors", help="state files, in any order")
    s.add_argument("--in-given-order", action="store_true",
                   help="take the files oldest first as listed (for names without step numbers)")
    s.add_argument("--nowcaster", required=True,
                   help="'linefit', a nowcaster directory (ninocast format) or an official .pt checkpoint")
    s.add_argument("--spec", help="model spec JSON; default: spec.json beside the state files "
                   "(or the 'ninocast.spec' metadata inside them)")
    s.add_argument("--k", type=int, required=True, help="horizon in snapshot intervals (1..40)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.set_defaults(func=_lazy("ninocast_server.engine.step_cli", "run_step"))

    s = sub.add_parser("spec", help="write the spec file of a model (for `ninocast step` and the API)",
                       description="Build the model (on PyTorch's meta device: no memory for weights) and write "
                       "its spec JSON: its trainable parameters that a neural graph can place, the graph family "
                       "and head counts (a Hugging Face GPT-2 or Llama is found under any module name).")
    s.add_argument("model", metavar="MODULE:FACTORY | config.json",
                   help="a Python factory (package.module:make_model, called without arguments; the current "
                   "directory is importable) or a Hugging Face config.json (or its directory; needs transformers)")
    s.add_argument("-o", "--out", required=True, metavar="SPEC.json")
    s.add_argument("--family", default="auto", choices=["auto", "generic", "gpt2", "llama"])
    s.set_defaults(func=run_spec)

    s = sub.add_parser("import-checkpoint", help="convert an official NiNo .pt checkpoint to ninocast format",
                       description="Load a published .pt checkpoint safely (weights only) and write a "
                       "directory with config.json + model.safetensors that the server loads.")
    s.add_argument("checkpoint", metavar="FILE.pt")
    s.add_argument("-o", "--out", required=True, metavar="DIR")
    s.add_argument("--name", help="nowcaster name (default: the file's stem)")
    s.set_defaults(func=_lazy("ninocast_server.engine.step_cli", "run_import"))

    s = sub.add_parser("route", help="combine nowcaster directories into one routed nowcaster (a member per family)",
                       description="Copy each member directory into OUT and write a routed config.json: the "
                       "nowcaster OUT serves every model with the member of its graph family, and warns with that "
                       "member's scope.")
    s.add_argument("-o", "--out", required=True, metavar="DIR", help="routed nowcaster directory to write (new)")
    s.add_argument("--member", action="append", required=True, metavar="FAMILIES=DIR",
                   help="e.g. generic=runs/vision or gpt2,llama=runs/language (repeatable; a family named again "
                   "gets an alternate member, which serves runs whose snapshot spacing its scope.spacing holds)")
    s.add_argument("--upd-scale", action="append", default=[], metavar="FAMILY=X",
                   help="scale the predicted update of FAMILY's first member by X for that family (e.g. "
                   "llama=1.0; the member's weights are shared, not copied; repeatable)")
    s.add_argument("--name", help="nowcaster name (default: OUT's directory name)")
    s.set_defaults(func=_lazy("ninocast_server.engine.step_cli", "run_route"))

    s = sub.add_parser("serve", help="run the nowcast server (uvicorn)",
                       description="Serve nowcasters over HTTP. Settings come from NINOCAST_* environment "
                       "variables and an optional TOML file; flags override both.")
    s.add_argument("--host", help="bind address (NINOCAST_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (NINOCAST_PORT, default 8000)")
    s.add_argument("--config", metavar="FILE.toml", help="settings file (NINOCAST_CONFIG)")
    s.add_argument("--data-dir", help="sessions and states (NINOCAST_DATA_DIR, default ./data)")
    s.add_argument("--models-dir", help="every subdirectory is a nowcaster to load (NINOCAST_MODELS_DIR)")
    s.add_argument("--keys-file", help="API key hashes; without it the server is open (NINOCAST_KEYS_FILE)")
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N (NINOCAST_DEVICE)")
    s.add_argument("--default-nowcaster", help="NINOCAST_DEFAULT_NOWCASTER (default ninocast-nino, the bundled graph model)")
    s.add_argument("--open", action="store_true", help="serve without API keys even on a non-loopback address")
    s.set_defaults(func=_lazy("ninocast_server.api.serve_cli", "run_serve"))

    s = sub.add_parser("keys", help="manage API keys of a shared server")
    ks = s.add_subparsers(dest="keys_command", metavar="ACTION")
    a = ks.add_parser("add", help="create a key; prints it once, alone on stdout (only its hash is stored)")
    a.add_argument("name")
    a.add_argument("--keys-file", required=True)
    a.set_defaults(func=_lazy("ninocast_server.api.serve_cli", "run_keys_add"))
    a = ks.add_parser("list", help="list key names (never the keys)")
    a.add_argument("--keys-file", required=True)
    a.set_defaults(func=_lazy("ninocast_server.api.serve_cli", "run_keys_list"))
    a = ks.add_parser("revoke", help="remove a key by name")
    a.add_argument("name")
    a.add_argument("--keys-file", required=True)
    a.set_defaults(func=_lazy("ninocast_server.api.serve_cli", "run_keys_revoke"))

    s = sub.add_parser("bench", help="benchmarks")
    bs = s.add_subparsers(dest="bench_command", metavar="WHAT")
    b = bs.add_parser("engine", help="nowcast wall time and peak memory of the engine on three models")
    b.add_argument("--nowcaster", default=None, help="default: the official nino_no_posw.pt from ../shared")
    b.add_argument("--models", default="c10-32,mlp-1m,gpt2-3m",
                   help="comma-separated; also gpt2-45m, gpt2-124m, llama-30m, llama-1b (docs/benchmarks.md)")
    b.add_argument("--states-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="precision the states are held in (bfloat16: as a bf16 upload is; llama-1b needs it)")
    b.add_argument("--k", type=int, default=10)
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeat", type=int, default=1, help="timed nowcasts per model after the first")
    b.set_defaults(func=_lazy("ninocast_server.bench.engine", "run_bench_engine"))
    b = bs.add_parser("client", help="the client's cost to the training loop: ordinary and nowcast steps",
                      description="Median wall time of an ordinary step with NowcastOptimizer against the bare "
                      "optimizer (~1M-parameter MLP; target < 2%% overhead), and the end-to-end cost of a nowcast "
                      "step in local mode and through a real server (docs/benchmarks-client.md).")
    b.add_argument("--parts", default="ordinary,nowcast", help="comma-separated: ordinary, nowcast")
    b.add_argument("--width", type=int, default=512, help="MLP width w, layers w-2w-w (512: 1.05M parameters)")
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--steps", type=int, default=1000, help="interleaved ordinary steps per optimizer")
    b.add_argument("--period", type=int, default=1000, help="period in the ordinary-step part")
    b.add_argument("--nowcasts", type=int, default=5, help="nowcasts timed per mode")
    b.add_argument("--nowcast-period", type=int, default=50, help="period in the nowcast part")
    b.add_argument("--nowcaster", default=None, help="default: linefit locally, the server's default remotely")
    b.add_argument("--server", default=None, help="URL of a running server (default: start one on loopback)")
    b.add_argument("--no-server", action="store_true", help="local mode only")
    b.add_argument("--api-key", default=None)
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    b.add_argument("--json", default=None, help="also write the results to this file")
    b.set_defaults(func=_lazy("ninocast_server.bench.client", "run_bench_client"))
    b = bs.add_parser("server", help="upload throughput, nowcast round trip vs engine, sustained load",
                      description="Start a real server on a free loopback port (temporary data dir) and measure "
                      "state upload MB/s against a file copy + fsync, the nowcast round trip (upload + nowcast + "
                      "download) against the engine alone, and N concurrent sessions streaming states and "
                      "nowcasting (p50/p99 latency, errors, peak server RSS). Prints markdown tables.")
    b.add_argument("--parts", default="upload,roundtrip,load", help="comma-separated subset of upload,roundtrip,load")
    b.add_argument("--nowcaster", default=None, metavar="FILE.pt",
                   help="checkpoint imported into the server's models dir; default: the official "
                   "nino_no_posw.pt from ../shared")
    b.add_argument("--models", default="c10-32,mlp-1m,gpt2-3m", help="round-trip models (engine benchmark names)")
    b.add_argument("--upload-models", default="gpt2-3m,linear-25m",
                   help="upload states: engine benchmark names or linear-25m (100 MB)")
    b.add_argument("--k", type=int, default=10)
    b.add_argument("--device", default="cpu", help="server (NINOCAST_DEVICE) and in-process engine device")
    b.add_argument("--repeat", type=int, default=3, help="timed uploads / warm round trips per model")
    b.add_argument("--duration", type=float, default=120.0, help="seconds of sustained load")
    b.add_argument("--sessions", type=int, default=16, help="concurrent sessions of the load part")
    b.add_argument("--load-model", default="c10-32", help="model of the load part (engine benchmark name)")
    b.add_argument("--load-nowcaster", default="nino", help="'nino' (the imported checkpoint) or 'linefit'")
    b.add_argument("--nowcast-every", type=int, default=5, help="uploads between nowcasts per session")
    b.add_argument("--think", type=float, default=0.05, help="pause (s) after each request of a load session")
    b.add_argument("--threads", type=int, default=None,
                   help="torch threads of the server and of the in-process engine (default: torch's)")
    b.add_argument("--work-dir", default=None, help="parent of the temporary directory (default: the system's)")
    b.add_argument("--keep", action="store_true", help="keep the temporary directory (server logs, data)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write every number as JSON")
    b.set_defaults(func=_lazy("ninocast_server.bench.server", "run_bench_server"))
    b = bs.add_parser("speedup", help="steps to a task's target: AdamW vs AdamW + nowcasters, with plots",
                      description="Train each task with AdamW alone and wrapped by each nowcaster (NowcastOptimizer, "
                      "local engine or --server), same init and batches per seed; write results.md, summary.csv, "
                      "runs.csv, runs.jsonl and plots/<task>.png to --out. Tasks (docs/tasks.md): fm-16, fm-32, "
                      "fm-16-bn, fm-mlp-ln, digits, digits-cnn, kjv-gpt2-3-24, kjv-gpt2-2-32, kjv-gpt2-3-64, "
                      "kjv-llama-3-24, "
                      "kjv-gpt2-3-24-10k, kjv-gpt2-2-32-10k, kjv-gpt2-3-64-10k, kjv-llama-3-24-10k, "
                      "fortunes-gpt2-3-24-10k, kjv-gpt2-4-16-10k, kjv-llama-2-32-10k, kjv-gpt2-4-48, "
                      "kjv-gpt2-2-80, kjv-llama-2-64, jargon-gpt2-3-24-10k, jargon-gpt2-2-32-10k, "
                      "devil-gpt2-3-24-10k.")
    b.add_argument("--task", action="append", metavar="NAME[,NAME]",
                   help="task(s), repeatable or comma-separated (default fm-16; digits with --quick)")
    b.add_argument("--nowcasters", metavar="REF[,REF]",
                   help="comma list: linefit, nino (official nino_no_posw.pt), wnn+ (nino_mlp.pt), a .pt file, a "
                   "nowcaster directory, or a server's nowcaster name; AdamW is always included "
                   "(default nino,wnn+,linefit; linefit with --quick)")
    b.add_argument("--seeds", help="comma list (default 1000,2000,3000; 1000,2000 with --quick)")
    b.add_argument("--server", metavar="URL", help="nowcast through a running server (default: local engine)")
    b.add_argument("--api-key", help="API key for --server (default: NINOCAST_API_KEY)")
    b.add_argument("--eval-every", type=int, help="evaluate every N steps (default: the task's, e.g. 50 for FM)")
    b.add_argument("--max-steps", type=int, help="training budget override (default: the task's)")
    b.add_argument("--period", type=int, help="nowcast period override (default: the task's, 1000 for FM)")
    b.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    b.add_argument("--no-early-stop", action="store_true", help="train the whole budget even after the target")
    b.add_argument("--resume", action="store_true", help="keep the runs already in OUT/runs.jsonl, do the rest")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--report-only", action="store_true",
                   help="only rewrite results.md, CSVs and plots from OUT/runs.jsonl (e.g. while a run is going)")
    b.add_argument("--target", type=float, help="steps-to-target threshold override (default: the task's); with "
                   "--report-only, re-scores the stored curves into OUT/target-<value>/ (or --retarget-out)")
    b.add_argument("--retarget-out", metavar="DIR", help="with --report-only --target: where to write the reports")
    b.add_argument("--verify", choices=["off", "on", "both"], default="off",
                   help="verify every nowcast on a fixed probe batch (ninocast.Verify): 'on' runs each nowcaster "
                   "verified only (labelled NAME+v), 'both' unverified and verified (default off)")
    b.add_argument("--verify-tolerance", type=float, default=0.0, metavar="X",
                   help="with --verify: accept a jump whose probe loss rises by at most X (relative; default 0)")
    b.add_argument("--graph", choices=["auto", "traced", "both"], default="auto",
                   help="the nowcasters' graphs: 'traced' builds every spec with its traced topology "
                   "(ModelSpec.from_module(graph='traced'), labelled NAME@traced) even where a hand-written layout "
                   "exists (GPT-2, Llama, chains), 'both' runs each nowcaster both ways (default auto)")
    b.add_argument("--verify-delay", type=int, default=0, metavar="D",
                   help="with --verify: delayed checks with rollback, Verify(delay=D): a jump that dips the probe by "
                   "at most --verify-max-dip is kept tentatively and probed again D steps later (labelled "
                   "NAME+vdD; default 0: immediate checks only)")
    b.add_argument("--verify-max-dip", type=float, default=None, metavar="X",
                   help="with --verify-delay: the largest relative rise of the probe a tentative jump may have "
                   "(default: Verify's, 2, or no limit with --verify-shadow; 'inf' for none)")
    b.add_argument("--verify-baseline", choices=["before", "trend"], default="before",
                   help="with --verify-delay: what the delayed check compares with (Verify(baseline=...)): the "
                   "probe before the jump, or where plain training was heading (labelled NAME+vdD-trend)")
    b.add_argument("--verify-shadow", action="store_true",
                   help="with --verify-delay: train the pre-jump copy alongside while a check is pending and keep "
                   "the branch with the lower probe, Verify(shadow=True) (labelled NAME+vdDs): a rejected jump "
                   "costs D + 1 extra forward/backward passes instead of D training steps")
    b.add_argument("--verify-confidence", type=float, default=None, metavar="Z",
                   help="with --verify-shadow: standard errors by which the jump must beat plain training, batch by "
                   "batch over the probe's batches (Verify(confidence=Z); default: Verify's, 0: the means alone)")
    b.add_argument("--verify-patience", type=int, default=None, metavar="P",
                   help="with --verify-shadow: a jump behind plain training at its check but closing on it races on "
                   "for another delay, at most P times (Verify(patience=P); default: Verify's, 2 with a shadow; "
                   "labelled NAME+vdDsP, 0: one look, NAME+vdDs)")
    b.add_argument("--final-nowcast", choices=["skip", "keep"], default="skip",
                   help="NowcastOptimizer's rule for the budget's last nowcast (default skip: a normal step)")
    b.add_argument("--start-step", type=int, default=None, metavar="N",
                   help="NowcastOptimizer(start_step=N): no nowcast in the first N calls (labelled NAME@start=N; "
                   "default: the nowcaster's own advice)")
    b.add_argument("--quick", action="store_true", help="smoke run in seconds (digits + linefit, tiny budget)")
    b.add_argument("--out", default="bench-speedup", metavar="DIR", help="output directory (default ./bench-speedup)")
    b.set_defaults(func=_lazy("ninocast_server.bench.speedup", "run_bench_speedup"))
    b = bs.add_parser("suite", help="one task x method table (speedups, geometric means) over bench speedup folders",
                      description="Merge the runs.jsonl of several `bench speedup --out` folders (the first folder wins "
                      "where a (task, method, seed) repeats) into suite.md and suite.csv: median steps and speedup "
                      "vs AdamW per task and method, then each method's geometric mean and how many tasks it is "
                      "slower than AdamW on.")
    b.add_argument("folders", nargs="+", metavar="FOLDER", help="bench speedup output folders (or runs.jsonl files)")
    b.add_argument("--label", action="append", metavar="OLD=NEW", help="rename a method (repeatable)")
    b.add_argument("--methods", metavar="M[,M]", help="columns, in order (default: every method found)")
    b.add_argument("--target", action="append", metavar="TASK=VALUE",
                   help="re-score a task's stored curves at another target (repeatable; e.g. fm-32=90)")
    b.add_argument("--out", default="bench-suite", metavar="DIR", help="output directory (default ./bench-suite)")
    b.set_defaults(func=_lazy("ninocast_server.bench.suite", "run_bench_suite"))
    _add_metatrain_parsers(sub)
    _add_graph_parser(sub)
    return p


def _add_graph_parser(sub: argparse._SubParsersAction) -> None:
    """graph (docs/graphs.md)."""
    s = sub.add_parser("graph", help="show the neural graph a model gets (or why it gets none)",
                       description="Trace a model (MODULE:FACTORY, a function returning the nn.Module or "
                       "(module, example input)) or read a spec .json, and print its neural graph: layers, node and "
                       "edge counts, edge types, what was left out and why. A model whose graph cannot be derived "
                       "faithfully is refused with the layer and what to do (exit status 2).")
    s.add_argument("target", metavar="MODULE:FACTORY|SPEC.json")
    s.add_argument("--input", metavar="SIZES", help="example input: a random float tensor of these comma-separated "
                   "sizes, e.g. 2,3,32,32 (default: the factory's, else guessed from the first layer)")
    s.add_argument("--leave-out", action="append", metavar="NAME", help="leave this parameter or module out of "
                   "the spec (repeatable); its tensors pass through nowcasts unchanged")
    s.add_argument("--spec-out", metavar="FILE.json", help="also write the spec (with its topology) here")
    s.add_argument("--traced", action="store_true", help="trace GPT-2, Llama and plain chains too (their specs "
                   "then carry the topology; the graph is the hand-written one, docs/graphs.md)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--pyg", metavar="FILE.pt", help="also save the graph, with its Laplacian encoding, as a PyTorch "
                   "Geometric Data object (torch.load(FILE, weights_only=False))")
    s.set_defaults(func=_lazy("ninocast_server.engine.graph_cli", "run_graph"))


def _add_metatrain_parsers(sub: argparse._SubParsersAction) -> None:
    """collect, metatrain, export-trajectories, validate-trajectories (docs/metatrain.md)."""
    s = sub.add_parser("collect", help="train tasks with AdamW and record their trajectories for meta-training",
                       description="Train every (task, seed, lr scale) with AdamW and record the flat parameters "
                       "every --interval steps into a trajectory store (safetensors shards + manifest.json). "
                       "Resumable: complete runs are skipped, partial runs continue from their last shard.")
    s.add_argument("-o", "--out", required=True, metavar="STORE", help="trajectory store directory")
    s.add_argument("--tasks", default="fm-16,digits", help="comma-separated task names (default fm-16,digits)")
    s.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    s.add_argument("--lr-scales", default="1", help="comma-separated multipliers of each task's lr (default 1)")
    s.add_argument("--steps", type=int, help="optimiser steps per run (default: the task's budget)")
    s.add_argument("--interval", type=int, default=200, help="steps between snapshots (default 200)")
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    s.add_argument("--shard-snapshots", type=int, default=10, help="snapshots per shard / resume point (default 10)")
    s.add_argument("--no-eval", action="store_true", help="do not evaluate the metric at each snapshot")
    s.add_argument("--allow-held-out", action="store_true", help="allow held-out tasks (FM-32, 3-64, Llama)")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_lazy("ninocast_server.metatrain.cli", "run_collect"))

    s = sub.add_parser("metatrain", help="meta-train a NiNo or WNN+ nowcaster on trajectory stores",
                       description="Train a nowcaster on windows of recorded trajectories (NINO_SPEC 6): L1 on "
                       "scaled future states, AdamW + cosine decay, clipping; NaN-safe and resumable. Writes "
                       "config.json + model.safetensors + MODEL_CARD.md + loss_curve.png into --out.")
    s.add_argument("stores", nargs="+", metavar="STORE")
    s.add_argument("-o", "--out", required=True, metavar="DIR", help="nowcaster directory to write")
    s.add_argument("--model", choices=["nino", "wnn"], default="nino")
    s.add_argument("--name", help="nowcaster name (default: the --out directory's name)")
    s.add_argument("--init", metavar="DIR", help="fine-tune this nowcaster (ninocast format) instead of a fresh one")
    s.add_argument("--iters", type=int, default=20000)
    s.add_argument("--batch-trajectories", type=int, default=4)
    s.add_argument("--windows", type=int, default=4, help="windows per trajectory (default 4)")
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--weight-decay", type=float, default=1e-2)
    s.add_argument("--clip", type=float, default=5.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--spacing", type=int, default=200, help="optimiser steps between a window's states (default 200)")
    s.add_argument("--hid", type=int, default=128)
    s.add_argument("--layers", type=int, default=3)
    s.add_argument("--wte-pos-enc", action="store_true", help="NiNo: learn token-id embeddings (+6.4M parameters)")
    s.add_argument("--per-tensor-lm-scaling", action="store_true",
                   help="scale GPT-2 trajectories per tensor (default: globally from wte on, as the reference)")
    s.add_argument("--tasks", help="only these tasks (comma-separated)")
    s.add_argument("--task-weight", action="append", default=[], metavar="TASK=W",
                   help="sample TASK W times as often as a task of weight 1 (repeatable; default: uniform)")
    s.add_argument("--early-fraction", type=float, default=0.0,
                   help="share of training trajectories whose windows start in the first ctx snapshots, where the "
                        "first (longest) nowcast jumps from (default 0: uniform, as the reference)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="held-out runs per task (default 0.2)")
    s.add_argument("--val-batches", type=int, default=8)
    s.add_argument("--val-every", type=int, default=200)
    s.add_argument("--ckpt-every", type=int, default=200)
    s.add_argument("--work-dir", help="checkpoint and history (default: OUT/train)")
    s.add_argument("--max-minutes", type=float, help="stop after this much wall time (resumable; the cosine "
                   "schedule still spans --iters)")
    s.add_argument("--keep", choices=["best", "last"], default="best",
                   help="write the weights with the lowest validation loss (default) or the last ones")
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--device", default="cpu")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_lazy("ninocast_server.metatrain.cli", "run_metatrain"))

    s = sub.add_parser("export-trajectories", help="turn a server's recorded sessions into a trajectory store",
                       description="Read the server's data directory (sessions created with record=true) and "
                       "write one run per session into a trajectory store, for `ninocast metatrain --init`.")
    s.add_argument("--data-dir", required=True, help="the server's data directory (NINOCAST_DATA_DIR)")
    s.add_argument("-o", "--out", required=True, metavar="STORE")
    s.add_argument("--owners", help="only these key owners (comma-separated)")
    s.add_argument("--sessions", help="only these session ids (comma-separated)")
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    s.set_defaults(func=_lazy("ninocast_server.metatrain.cli", "run_export"))

    s = sub.add_parser("validate-trajectories", help="check a trajectory store's shards against its manifest")
    s.add_argument("store", metavar="STORE")
    s.add_argument("--deep", action="store_true", help="also read every shard and check values and steps")
    s.set_defaults(func=_lazy("ninocast_server.metatrain.cli", "run_validate"))


def run_spec(args: argparse.Namespace) -> int:
    """``ninocast spec``: client-only (torch; transformers for a config.json)."""
    import json

    from .spec import ModelSpec, SpecError

    model = build_model(args.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    try:
        spec = ModelSpec.from_module(model, family=args.family, include=trainable)
    except SpecError as e:
        raise CommandError(f"{args.model}: {e}") from None
    with open(args.out, "w") as f:
        json.dump(spec.to_json(), f, indent=1)
    print(f"{spec.family} spec of {len(spec.params)} tensors, {spec.n_params:,} parameters -> {args.out}")
    return 0


def build_model(ref: str):  # -> torch.nn.Module
    """The model a ``ninocast spec`` argument names, built on the meta device where the factory allows it."""
    import json

    import torch

    path = ref if not os.path.isdir(ref) else os.path.join(ref, "config.json")
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise CommandError(f"{path}: no such file")
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ModuleNotFoundError:
            raise CommandError("a Hugging Face config.json needs transformers: pip install transformers") from None
        try:
            with open(path) as f:
                raw = json.load(f)
            config = AutoConfig.for_model(**raw)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CommandError(f"{path}: not a Hugging Face causal-LM config ({type(e).__name__}: {e})") from None
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"{ref!r}: expected MODULE:FACTORY (e.g. mypkg.models:make_model) or a config.json")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise CommandError(f"cannot import {ref!r}: {e}") from None
    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # noqa: BLE001 - some factories need real tensors: build it on the CPU then
        model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except CommandError as e:
        print(f"ninocast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

