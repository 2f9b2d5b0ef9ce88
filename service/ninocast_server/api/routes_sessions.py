"""/v1/sessions: create a session, stream its states in, nowcast, inspect, delete.

The path of one nowcast: ``nowcast`` below -> ``SessionStore`` (which states) -> ``ComputeQueue`` (a worker
thread) -> ``compute.run_nowcast`` (states from disk -> ``engine.runner.nowcast``) -> ``safetensors_io.encode``
-> a streamed safetensors body.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Path as PathParam, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ninocast.schedule import k_at_step
from ninocast.spec import SpecError

from ..engine.graphs import check_spec_for
from ..sessions.compute import NowcastJob, estimate_bytes, run_nowcast
from ..sessions.errors import ServiceError
from ..sessions.safetensors_io import (DTYPE_NAMES, check_against_spec, check_finite, dtypes_of, encode,
                                       header_limit, parse_header)
from ..sessions.spec_limits import parse_spec
from ..sessions.store import Session
from ..sessions.upload import receive_to_file
from .auth import require_owner
from .schemas import (CreateSession, CreatedSession, ErrorBody, NowcastReport, NowcastRequest, ReportAck,
                      SessionDetail, SessionList, StateAck, session_view, state_ack)

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


def build_router() -> APIRouter:
    r = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_owner)],
                  responses={400: ERR, 401: ERR, 408: ERR, 413: ERR, 422: ERR, 500: ERR})

    @r.post("", status_code=201, operation_id="create_session", response_class=JSONResponse, responses={
        201: {"model": CreatedSession, "description": "the session (Location: its URL)", "links": SESSION_LINKS},
        429: ERR, 507: ERR})
    async def create_session(body: CreateSession, request: Request,
                             owner: str = Depends(require_owner)) -> JSONResponse:
        """Create a session for one training run; its settings fix the k schedule and the nowcaster."""
        st = request.app.state
        cfg = st.settings
        spec = await run_in_threadpool(parse_spec, body.spec, cfg.max_tensors_per_spec, cfg.max_name_length,
                                       cfg.max_params_per_session)
        name = body.nowcaster or st.registry.default
        model = st.registry.get(name)
        if spec.family not in model.families:
            raise ServiceError(422, "unsupported_family", f"nowcaster {name!r} supports {list(model.families)}, "
                               f"not family {spec.family!r}")
        try:  # a graph that would be wrong or unreadable is refused now, not at the first nowcast
            check_spec_for(spec, model)
        except SpecError as e:
            raise ServiceError(422, "invalid_spec", f"nowcaster {name!r}: {e}") from None
        ctx = body.ctx or model.ctx
        if ctx != model.ctx and model.kind != "linefit":
            raise ServiceError(422, "invalid_ctx", f"nowcaster {name!r} needs ctx={model.ctx}, got {ctx}")
        st.queue.check_fits(estimate_bytes(spec, ctx), "spec_too_large")
        s = await run_in_threadpool(st.store.create, owner, spec, name, ctx, body.period, body.max_train_steps,
                                    body.record, body.name)
        out_of_scope = model.scope_warning(spec)  # served anyway, but said once, here (issue 11)
        return JSONResponse({**session_view(s, cfg.session_ttl_s), "warnings": [out_of_scope] if out_of_scope else []},
                            status_code=201, headers={"Location": f"/v1/sessions/{s.id}"})

    @r.get("", operation_id="list_sessions", response_class=JSONResponse, responses={200: {"model": SessionList}})
    async def list_sessions(request: Request, owner: str = Depends(require_owner)) -> JSONResponse:
        """This key's sessions (never another key's)."""
        st = request.app.state
        return JSONResponse({"sessions": [session_view(s, st.settings.session_ttl_s, full=False)
                                          for s in st.store.list(owner)]})

    @r.get("/{session_id}", operation_id="get_session", response_class=JSONResponse,
           responses={200: {"model": SessionDetail}, 404: ERR})
    async def get_session(request: Request, session_id: str = SID, owner: str = Depends(require_owner)) -> JSONResponse:
        """Settings, states held (steps), nowcasts done and their timings."""
        st = request.app.state
        return JSONResponse(session_view(st.store.get(owner, session_id), st.settings.session_ttl_s))

    @r.delete("/{session_id}", status_code=204, operation_id="delete_session",
              responses={204: {"description": "deleted with its states"}, 404: ERR})
    async def delete_session(request: Request, session_id: str = SID, owner: str = Depends(require_owner)) -> Response:
        """Delete the session and every state it holds."""
        await run_in_threadpool(request.app.state.store.delete, owner, session_id)
        return Response(status_code=204)

    @r.put("/{session_id}/states/{step}", status_code=201, operation_id="put_state", response_class=JSONResponse,
           responses={201: {"model": StateAck, "description": "validated and durably on disk", "links": STATE_LINKS},
                      200: {"model": StateAck, "description": "the same state was stored before (a safe retry)",
                            "links": STATE_LINKS},
                      404: ERR, 409: ERR, 415: ERR, 507: ERR},
           openapi_extra={"requestBody": {"required": True, "description": "a safetensors file of the parameters",
                                          "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                              "format": "binary"}}}}})
    async def put_state(request: Request, session_id: str = SID, step: str = STEP,
                        owner: str = Depends(require_owner)) -> JSONResponse:
        """Upload the state at ``step``. Acknowledged (201) only once validated and durably on disk; repeating
        the same step with the same bytes answers 200."""
        st = request.app.state
        s = st.store.get(owner, session_id)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/octet-stream":
            raise ServiceError(415, "unsupported_media_type", "a state must be sent as application/octet-stream "
                               f"(a safetensors file), got {ctype or 'no Content-Type'!r}")
        n = int(step)
        with st.store.reserve(owner, st.settings.disk_quota_per_key) as quota:
            tmp, size, _ = await receive_to_file(request, st.store.tmp_dir, st.settings.max_body_bytes, quota.grow,
                                                 check=lambda path: _validate(path, s))
            garbage: list[Path] = []  # superseded states, unlinked after the answer is sent
            try:
                new = await run_in_threadpool(st.store.commit_state, s, n, tmp, size, garbage)
            finally:
                tmp.unlink(missing_ok=True)
        return JSONResponse(state_ack(s, n, size, new), status_code=201 if new else 200,
                            background=BackgroundTask(_unlink_all, garbage) if garbage else None)

    @r.post("/{session_id}/nowcast", operation_id="nowcast", response_class=StreamingResponse, responses={
        200: {"description": "safetensors file of the nowcasted parameters (headers X-Ninocast-K, "
                             "X-Ninocast-Steps, Server-Timing)",
              "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        404: ERR, 409: ERR, 503: ERR})
    async def nowcast(request: Request, body: NowcastRequest | None = None, session_id: str = SID,
                      owner: str = Depends(require_owner)) -> StreamingResponse:
        """Nowcast from the newest ctx states; the answer is a safetensors file with the spec's tensors."""
        st = request.app.state
        body = body or NowcastRequest()
        s = st.store.get(owner, session_id)
        steps = s.newest_steps(s.ctx)
        if len(steps) < s.ctx:
            raise ServiceError(409, "too_few_states", f"session {s.id} holds {len(steps)} state(s) "
                               f"(steps {steps}); a nowcast needs ctx={s.ctx}: upload {s.ctx - len(steps)} more")
        model = st.registry.get(s.nowcaster)
        k = body.k if body.k is not None else k_at_step(steps[-1], s.max_train_steps, s.period, model.horizon)
        if not 1 <= k <= model.horizon:
            raise ServiceError(422, "invalid_k", f"k must be in 1..{model.horizon}, got {k}")
        job = NowcastJob(s.spec, s.nowcaster, s.ctx, k, tuple(s.state_path(x) for x in steps))
        t0 = time.perf_counter()

        def work(device: str):
            res = run_nowcast(job, st.registry, st.graphs, device)
            dt = DTYPE_NAMES.get(body.dtype) or dtypes_of(job.paths[-1], job.spec)
            meta = {"format": "pt", "ninocast.k": str(k), "ninocast.step": str(steps[-1]),
                    "ninocast.nowcaster": s.nowcaster}
            return res, encode(res.flat, job.spec, dt, meta)

        res, (head, data) = await st.queue.run(owner, work, estimate_bytes(s.spec, s.ctx))  # 422 over the budget
        total = time.perf_counter() - t0
        st.metrics.observe_nowcast(s.nowcaster, res.device, res.load_s + res.compute_s)
        entry = {"at": time.time(), "k": k, "steps": steps, "device": res.device, "load_s": round(res.load_s, 6),
                 "compute_s": round(res.compute_s, 6), "total_s": round(total, 6)}
        headers = {"Content-Length": str(len(head) + len(data)), "X-Ninocast-K": str(k),
                   "X-Ninocast-Steps": ",".join(map(str, steps)), "X-Ninocast-Nowcaster": s.nowcaster,
                   "X-Ninocast-Device": res.device,
                   "Server-Timing": f"load;dur={res.load_s * 1e3:.1f}, compute;dur={res.compute_s * 1e3:.1f}, "
                                    f"total;dur={total * 1e3:.1f}"}
        return StreamingResponse(_chunks(head, data), media_type="application/octet-stream", headers=headers,
                                 background=BackgroundTask(run_in_threadpool, st.store.add_nowcast, s, entry))

    @r.post("/{session_id}/nowcasts/{step}/report", status_code=201, operation_id="report_nowcast",
            response_class=JSONResponse, responses={201: {"model": ReportAck}, 404: ERR})
    async def report_nowcast(request: Request, body: NowcastReport, session_id: str = SID, step: str = STEP,
                             owner: str = Depends(require_owner)) -> JSONResponse:
        """Record what the client did with the nowcast at ``step`` (verified: accepted, shortened or rejected;
        or skipped); shown under ``reports`` and ``verification`` in GET /v1/sessions/{id}. A repeat replaces."""
        st = request.app.state
        s = st.store.get(owner, session_id)
        report = {"step": int(step), "at": time.time(), **body.model_dump()}
        await run_in_threadpool(st.store.add_report, s, report)
        return JSONResponse({"session": s.id, "step": int(step), "stored": True, "reports": len(s.reports)},
                            status_code=201)

    return r


def _validate(tmp: Path, s: Session) -> None:
    """Trust nothing in the body until its header, names, shapes, dtypes and values check out (runs while the
    upload is fsynced; the state is committed only after both)."""
    header = parse_header(tmp, header_limit(s.spec))
    check_against_spec(header, s.spec)
    check_finite(tmp, header, s.spec)


def _unlink_all(paths: list[Path]) -> None:
    """Runs on a worker thread after the answer: deleting a large file costs milliseconds on ext4."""
    for p in paths:
        p.unlink(missing_ok=True)


async def _chunks(head: bytes, data: memoryview) -> AsyncIterator[bytes | memoryview]:
    yield head
    for i in range(0, len(data), SEND_CHUNK):
        yield data[i : i + SEND_CHUNK]
