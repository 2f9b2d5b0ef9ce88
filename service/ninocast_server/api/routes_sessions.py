"""/v1/sessions: create a session, stream its states in, nowcast, inspect, delete.

HTTP only: parse, authenticate, call the service in ``sessions/``, answer. A nowcast is
``sessions.nowcast.nowcast`` (plan, run on a queue worker, encode, record); a new session is
``sessions.create.create_session``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, BackgroundTasks, Depends, Path as PathParam, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..sessions.create import create_session as create
from ..sessions.errors import ServiceError
from ..sessions.nowcast import nowcast as run_nowcast
from ..sessions.safetensors_io import validate_state
from ..sessions.upload import receive_to_file
from .auth import require_owner
from .deps import Owner, ServerDep
from .schemas import (CreateSession, CreatedSession, ErrorBody, NowcastReport, NowcastRequest, ReportAck,
                      SessionDetail, SessionList, StateAck, session_created, session_detail, session_summary,
                      state_ack)

SID = PathParam(..., min_length=1, max_length=64, description="session id from POST /v1/sessions")
STEP = PathParam(..., pattern=r"^[0-9]{1,15}$", examples=["1000"],
                 description="the optimizer call (0-based, as in the k schedule) at which the state was taken, in "
                 "plain decimal digits; also the idempotency key")
SEND_CHUNK = 8 << 20
ERR = {"model": ErrorBody, "description": "JSON {error, detail}; the error codes are listed in the README"}
SESSION_LINKS = {  # what a client does next with a created session (OpenAPI links; schemathesis follows them)
    "GetSession": {"operationId": "get_session", "parameters": {"session_id": "$response.body#/id"}},
    "PutState": {"operationId": "put_state", "parameters": {"session_id": "$response.body#/id"}},
    "Nowcast": {"operationId": "nowcast", "parameters": {"session_id": "$response.body#/id"}},
    "DeleteSession": {"operationId": "delete_session", "parameters": {"session_id": "$response.body#/id"}},
}
STATE_LINKS = {  # after an upload: the next upload, or the nowcast once ctx states are held
    "PutState": {"operationId": "put_state", "parameters": {"session_id": "$response.body#/session"}},
    "Nowcast": {"operationId": "nowcast", "parameters": {"session_id": "$response.body#/session"}},
}

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_owner)],
                   responses={400: ERR, 401: ERR, 408: ERR, 413: ERR, 422: ERR, 500: ERR})


@router.post("", status_code=201, operation_id="create_session", response_model=CreatedSession, responses={
    201: {"description": "the session (Location: its URL)", "links": SESSION_LINKS}, 429: ERR, 507: ERR})
async def create_session(body: CreateSession, srv: ServerDep, owner: Owner, response: Response) -> CreatedSession:
    """Create a session for one training run; its settings fix the k schedule and the nowcaster."""
    s, warnings, start_step = await run_in_threadpool(
        create, srv.store, srv.registry, srv.queue, srv.settings, owner, body.spec, body.nowcaster, body.ctx,
        body.period, body.max_train_steps, body.record, body.name)
    response.headers["Location"] = f"/v1/sessions/{s.id}"
    return session_created(s, srv.settings.session_ttl_s, warnings, start_step)


@router.get("", operation_id="list_sessions", response_model=SessionList)
async def list_sessions(srv: ServerDep, owner: Owner) -> SessionList:
    """This key's sessions (never another key's)."""
    return SessionList(sessions=[session_summary(s, srv.settings.session_ttl_s) for s in srv.store.list(owner)])


@router.get("/{session_id}", operation_id="get_session", response_model=SessionDetail, responses={404: ERR})
async def get_session(srv: ServerDep, owner: Owner, session_id: str = SID) -> SessionDetail:
    """Settings, states held (steps), nowcasts done and their timings."""
    return session_detail(srv.store.get(owner, session_id), srv.settings.session_ttl_s)


@router.delete("/{session_id}", status_code=204, operation_id="delete_session",
               responses={204: {"description": "deleted with its states"}, 404: ERR})
async def delete_session(srv: ServerDep, owner: Owner, session_id: str = SID) -> Response:
    """Delete the session and every state it holds."""
    await run_in_threadpool(srv.store.delete, owner, session_id)
    return Response(status_code=204)


@router.put("/{session_id}/states/{step}", status_code=201, operation_id="put_state", response_model=StateAck,
            responses={201: {"description": "validated and durably on disk", "links": STATE_LINKS},
                       200: {"model": StateAck, "description": "the same state was stored before (a safe retry)",
                             "links": STATE_LINKS},
                       404: ERR, 409: ERR, 415: ERR, 507: ERR},
            openapi_extra={"requestBody": {"required": True, "description": "a safetensors file of the parameters",
                                           "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                               "format": "binary"}}}}})
async def put_state(request: Request, srv: ServerDep, owner: Owner, response: Response, background: BackgroundTasks,
                    session_id: str = SID, step: str = STEP) -> StateAck:
    """Upload the state at ``step``. Acknowledged (201) only once validated and durably on disk; repeating
    the same step with the same bytes answers 200."""
    s = srv.store.get(owner, session_id)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/octet-stream":
        raise ServiceError(415, "unsupported_media_type", "a state must be sent as application/octet-stream "
                           f"(a safetensors file), got {ctype or 'no Content-Type'!r}")
    n = int(step)
    with srv.store.reserve(owner, srv.settings.disk_quota_per_key) as quota:
        # validated on a worker thread while the file is fsynced; committed only after both
        tmp, size, _ = await receive_to_file(request, srv.store.tmp_dir, srv.settings.max_body_bytes, quota.grow,
                                             check=lambda path: validate_state(path, s.spec))
        garbage: list[Path] = []  # superseded states, unlinked after the answer is sent
        try:
            new = await run_in_threadpool(srv.store.commit_state, s, n, tmp, size, garbage)
        finally:
            tmp.unlink(missing_ok=True)
    if garbage:
        background.add_task(_unlink_all, garbage)
    response.status_code = 201 if new else 200
    return state_ack(s, n, size, new)


@router.post("/{session_id}/nowcast", operation_id="nowcast", response_class=StreamingResponse, responses={
    200: {"description": "safetensors file of the nowcasted parameters (headers X-Ninocast-K, "
                         "X-Ninocast-Steps, Server-Timing)",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    404: ERR, 409: ERR, 503: ERR})
async def nowcast(srv: ServerDep, owner: Owner, body: NowcastRequest | None = None,
                  session_id: str = SID) -> StreamingResponse:
    """Nowcast from the newest ctx states; the answer is a safetensors file with the spec's tensors."""
    body = body or NowcastRequest()
    res = await run_nowcast(srv.store, srv.registry, srv.queue, srv.graphs, owner, session_id, body.k, body.dtype)
    srv.metrics.observe_nowcast(res.nowcaster, res.device, res.load_s + res.compute_s)
    headers = {"Content-Length": str(len(res.head) + len(res.data)), "X-Ninocast-K": str(res.k),
               "X-Ninocast-Steps": ",".join(map(str, res.steps)), "X-Ninocast-Nowcaster": res.nowcaster,
               "X-Ninocast-Device": res.device,
               "Server-Timing": f"load;dur={res.load_s * 1e3:.1f}, compute;dur={res.compute_s * 1e3:.1f}, "
                                f"total;dur={res.total_s * 1e3:.1f}"}
    return StreamingResponse(_chunks(res.head, res.data), media_type="application/octet-stream", headers=headers)


@router.post("/{session_id}/nowcasts/{step}/report", status_code=201, operation_id="report_nowcast",
             response_model=ReportAck, responses={404: ERR})
async def report_nowcast(body: NowcastReport, srv: ServerDep, owner: Owner, session_id: str = SID,
                         step: str = STEP) -> ReportAck:
    """Record what the client did with the nowcast at ``step`` (verified: accepted, shortened or rejected;
    or skipped); shown under ``reports`` and ``verification`` in GET /v1/sessions/{id}. A repeat replaces."""
    s = srv.store.get(owner, session_id)
    report = {"step": int(step), "at": time.time(), **body.model_dump()}
    await run_in_threadpool(srv.store.add_report, s, report)
    return ReportAck(session=s.id, step=int(step), stored=True, reports=len(s.reports))


def _unlink_all(paths: list[Path]) -> None:
    """Runs on a worker thread after the answer: deleting a large file costs milliseconds on ext4."""
    for p in paths:
        p.unlink(missing_ok=True)


async def _chunks(head: bytes, data: memoryview) -> AsyncIterator[bytes | memoryview]:
    yield head
    for i in range(0, len(data), SEND_CHUNK):
        yield data[i : i + SEND_CHUNK]
