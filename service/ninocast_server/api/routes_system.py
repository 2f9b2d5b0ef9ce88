"""Operational routes: liveness, readiness, Prometheus metrics and the nowcaster catalogue."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .auth import require_owner

router = APIRouter()


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """The process answers (liveness)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], responses={503: {"description": "not ready: {error, detail, checks}"}})
async def readyz(request: Request) -> JSONResponse:
    """Nowcasters loaded, the engine importable, the data dir writable, the workers alive (readiness)."""
    st = request.app.state
    checks = {"nowcasters": bool(st.registry.names), "engine": st.graphs is not None,
              "data_dir_writable": _writable(st.store.tmp_dir), "workers": st.queue.alive()}
    if all(checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failed = ", ".join(k for k, v in checks.items() if not v)
    return JSONResponse({"error": "not_ready", "detail": f"failing checks: {failed}", "checks": checks},
                        status_code=503)


@router.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format."""
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/nowcasters", tags=["nowcasters"], dependencies=[Depends(require_owner)])
async def nowcasters(request: Request) -> dict[str, Any]:
    """Name, kind, size (parameters), ctx, horizon and the graph families each nowcaster supports."""
    st = request.app.state
    return {"default": st.registry.default, "devices": st.registry.devices, "nowcasters": st.registry.describe()}


def _writable(d) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=d, prefix=".ready-")
        os.close(fd)
        os.unlink(name)
        return True
    except OSError:
        return False
