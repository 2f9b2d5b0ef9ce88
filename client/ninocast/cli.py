"""The ``ninocast`` command line. Subcommands that need the engine import it lazily, so the client-only install
still answers ``--help`` and says what to install."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

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
                       description="Read ctx safetensors state files (oldest first), nowcast k snapshot "
                       "intervals ahead, write the predicted parameters. Keys not in the spec (buffers) pass "
                       "through from the newest file; every tensor keeps its dtype.")
    s.add_argument("states", nargs="+", metavar="STATE.safetensors", help="state files, oldest first")
    s.add_argument("--nowcaster", required=True,
                   help="'linefit', a nowcaster directory (ninocast format) or an official .pt checkpoint")
    s.add_argument("--spec", help="model spec JSON; default: spec.json beside the state files "
                   "(or the 'ninocast.spec' metadata inside them)")
    s.add_argument("--k", type=int, required=True, help="horizon in snapshot intervals (1..40)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.set_defaults(func=_lazy("ninocast_server.engine.step_cli", "run_step"))

    s = sub.add_parser("import-checkpoint", help="convert an official NiNo .pt checkpoint to ninocast format",
                       description="Load a published .pt checkpoint safely (weights only) and write a "
                       "directory with config.json + model.safetensors that the server loads.")
    s.add_argument("checkpoint", metavar="FILE.pt")
    s.add_argument("-o", "--out", required=True, metavar="DIR")
    s.add_argument("--name", help="nowcaster name (default: the file's stem)")
    s.set_defaults(func=_lazy("ninocast_server.engine.step_cli", "run_import"))

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
    s.add_argument("--default-nowcaster", help="NINOCAST_DEFAULT_NOWCASTER (default linefit)")
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
    b.add_argument("--models", default="c10-32,mlp-1m,gpt2-3m", help="comma-separated subset")
    b.add_argument("--k", type=int, default=10)
    b.add_argument("--device", default="cpu")
    b.add_argument("--repeat", type=int, default=1, help="timed nowcasts per model after the first")
    b.set_defaults(func=_lazy("ninocast_server.bench.engine", "run_bench_engine"))
    return p


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

