"""Operational routes: liveness, readiness, Prometheus metrics and the nowcaster catalogue."""

from __future__ import annotations

import os
import shutil
import tempfile

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from .auth import require_owner
from .deps import ServerDep
from .schemas import ErrorBody, Health, NotReady, NowcasterInfo, NowcasterList, Ready

router = APIRouter()
ERR = {"model": ErrorBody, "description": "JSON {error, detail}"}


@router.get("/healthz", tags=["ops"], operation_id="healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers (liveness)."""
    return Health(status="ok")


@router.head("/healthz", tags=["ops"], operation_id="healthz_head", responses={200: {"description": "alive"}})
async def healthz_head() -> Response:
    """Liveness for probes that send HEAD."""
    return Response(status_code=200)


@router.get("/readyz", tags=["ops"], operation_id="readyz", response_model=Ready,
            responses={503: {"model": NotReady, "description": "not ready"}})
async def readyz(srv: ServerDep) -> Ready | JSONResponse:
    """Nowcasters loaded, the engine importable, the data dir writable with at least NINOCAST_MIN_FREE_DISK_BYTES
    free, the workers alive (readiness)."""
    free = _free_bytes(srv.store.root)
    checks = {"nowcasters": bool(srv.registry.names), "engine": srv.graphs is not None,
              "data_dir_writable": _writable(srv.store.tmp_dir),
              "disk_space": free is not None and free >= srv.settings.min_free_disk_bytes,
              "workers": srv.queue.alive()}
    if all(checks.values()):
        return Ready(status="ready", checks=checks, free_disk_bytes=free)
    failed = ", ".join(k for k, v in checks.items() if not v)
    detail = f"failing checks: {failed}"
    if not checks["disk_space"]:
        detail += (f"; {free} bytes free in the data dir, below NINOCAST_MIN_FREE_DISK_BYTES="
                   f"{srv.settings.min_free_disk_bytes} (uploads may fail with 507 disk_full)")
    body = NotReady(error="not_ready", detail=detail, checks=checks, free_disk_bytes=free)
    return JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", tags=["ops"], operation_id="metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(srv: ServerDep) -> PlainTextResponse:
    """Prometheus text format."""
    return PlainTextResponse(srv.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/nowcasters", tags=["nowcasters"], dependencies=[Depends(require_owner)],
            operation_id="list_nowcasters", response_model=NowcasterList, responses={401: ERR, 500: ERR})
async def nowcasters(srv: ServerDep) -> NowcasterList:
    """Name, kind, size (parameters), ctx, horizon, the graph families each nowcaster supports and the scope
    it was meta-trained on."""
    return NowcasterList(default=srv.registry.default, devices=srv.registry.devices,
                         nowcasters=[NowcasterInfo(**d) for d in srv.registry.describe()])


def _free_bytes(d) -> int | None:
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


def _writable(d) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=d, prefix=".ready-")
        os.close(fd)
        os.unlink(name)
        return True
    except OSError:
        return False
