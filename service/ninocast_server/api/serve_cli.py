"""``ninocast serve`` and ``ninocast keys add|list|revoke``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ninocast.cli import CommandError

from ..settings import SettingsError, load_settings
from . import auth


def run_serve(args: argparse.Namespace) -> int:
    """Validate the settings, build the app (loading every nowcaster), then hand it to uvicorn."""
    import uvicorn

    from .app import create_app
    from .http_protocol import protocol_class

    flags = {k: getattr(args, k, None) for k in ("host", "port", "data_dir", "models_dir", "keys_file", "device",
                                                  "default_nowcaster")}
    if getattr(args, "open", False):
        flags["open_mode"] = True
    try:
        settings = load_settings(getattr(args, "config", None), **flags)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(settings)
    except SettingsError as e:
        raise CommandError(str(e)) from None
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.log_level == "debug", timeout_graceful_shutdown=10,
                http=protocol_class(settings), timeout_keep_alive=settings.keep_alive_timeout_s,
                h11_max_incomplete_event_size=settings.max_header_bytes)
    return 0


def run_keys_add(args: argparse.Namespace) -> int:
    try:
        key = auth.add_key(Path(args.keys_file), args.name)
    except (ValueError, OSError) as e:
        raise CommandError(str(e)) from None
    print(key)  # alone on stdout, so `KEY=$(ninocast keys add alice --keys-file keys.json)` works
    print(f"added key {args.name!r} to {args.keys_file}; it is shown only now", file=sys.stderr)
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    try:
        entries = auth.read_keys(Path(args.keys_file))
    except ValueError as e:
        raise CommandError(str(e)) from None
    for e in entries:
        print(f"{e.name}\towner={e.owner}\tsha256={e.sha256[:12]}…")
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    try:
        auth.revoke_key(Path(args.keys_file), args.name)
    except (ValueError, OSError) as e:
        raise CommandError(str(e)) from None
    print(f"revoked key {args.name!r}", file=sys.stderr)
    return 0
