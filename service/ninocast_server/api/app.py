"""create_app(settings): wire the store, the nowcasters, the compute queue, auth and metrics into one FastAPI app.

Everything that can be wrong with the settings (models that do not load, a missing CUDA device, an unwritable
data dir) fails here, before the server binds its port.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI

import ninocast

from ..sessions.queue import ComputeQueue
from ..sessions.registry import NowcasterRegistry, RegistryError, resolve_devices
from ..sessions.store import SessionStore
from ..settings import Settings, SettingsError
from . import errors
from .auth import Authenticator
from .deps import Server
from .docs import install_docs
from .limits import RequestGuard
from .metrics import Metrics, MetricsMiddleware
from .routes_sessions import router as sessions_router
from .routes_system import router as system_router

if TYPE_CHECKING:
    from ..engine.graphs.cache import GraphCache

log = logging.getLogger("ninocast.api")

DESCRIPTION = """Weight nowcasting as a service. A training run creates a session with its model spec, uploads a
safetensors state every period/ctx steps (`PUT /v1/sessions/{id}/states/{step}`) and, once ctx states are held,
asks for a nowcast (`POST /v1/sessions/{id}/nowcast`), which answers with a safetensors file of predicted
parameters. Send `Authorization: Bearer KEY` unless the server runs in open mode. Errors are JSON
`{"error": code, "detail": text}`."""


def create_app(settings: Settings) -> FastAPI:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = SessionStore(settings.data_dir, settings.max_sessions_per_key, settings.session_ttl_s,
                             settings.max_history)
        store.open()
    except OSError as e:
        raise SettingsError(f"NINOCAST_DATA_DIR={settings.data_dir} is not usable: {e}") from None
    try:
        registry = NowcasterRegistry(resolve_devices(settings.device))
        registry.load(settings.models_dir, settings.default_nowcaster)
    except (RegistryError, ValueError) as e:
        raise SettingsError(str(e)) from None
    try:
        auth = Authenticator(settings.keys_file)
    except ValueError as e:
        raise SettingsError(f"NINOCAST_KEYS_FILE: {e}") from None
    queue = ComputeQueue(registry.devices, settings.queue_size, settings.memory_budget_bytes)
    metrics = Metrics()
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        sweeper = threading.Thread(target=_sweep, args=(store, stop, settings.session_ttl_s), daemon=True,
                                   name="session-expiry")
        sweeper.start()
        log.info("ninocast serving: %s mode, nowcasters %s on %s, data in %s",
                 "open" if auth.open else "API-key", registry.names, registry.devices, settings.data_dir)
        yield
        stop.set()
        queue.stop()

    app = FastAPI(title="ninocast", version=ninocast.__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = Server(settings, store, registry, queue, auth, metrics, _graph_cache())
    errors.install(app)
    app.add_middleware(RequestGuard, auth=auth, max_json_bytes=settings.max_json_bytes,
                       max_body_bytes=settings.max_body_bytes, body_idle_timeout_s=settings.body_idle_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refused requests too
    app.include_router(system_router)
    app.include_router(sessions_router)
    install_docs(app)
    metrics.gauge("ninocast_queue_depth", "Nowcasts waiting for a worker.", lambda: queue.depth)
    metrics.gauge("ninocast_nowcasts_running", "Nowcasts on a worker now.", lambda: queue.running)
    metrics.gauge("ninocast_sessions_active", "Sessions held.", store.count)
    metrics.gauge("ninocast_disk_used_bytes", "Bytes of acknowledged states on disk.", store.used_bytes)
    return app


def _graph_cache() -> "GraphCache | None":
    """The engine's graph cache, or None (readyz says so) while the engine cannot be imported."""
    try:
        from ..engine.graphs import GraphCache
    except ImportError as e:
        log.error("the engine is not importable (%s): nowcasts will fail", e)
        return None
    return GraphCache()


def _sweep(store: SessionStore, stop: threading.Event, ttl_s: float) -> None:
    """Delete idle sessions now and then (at least every minute, more often for short TTLs)."""
    while not stop.wait(min(60.0, max(0.5, ttl_s / 4))):
        try:
            store.expire()
        except Exception:  # never let the sweeper die
            log.exception("session expiry failed")
