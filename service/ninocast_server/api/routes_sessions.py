"""/v1/sessions: create a session, stream its states in, nowcast, inspect, delete.

The path of one nowcast: ``nowcast`` below -> ``SessionStore`` (which states) -> ``ComputeQueue`` (a worker
thread) -> ``compute.run_nowcast`` (states from disk -> ``engine.runner.nowcast``) -> ``safetensors_io.encode``
-> a streamed safetensors body.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Path as PathParam, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ninocast.schedule import k_at_step
from ninocast.spec import ModelSpec, SpecError

from ..sessions.compute import NowcastJob, estimate_bytes, run_nowcast
from ..sessions.errors import ServiceError
from ..sessions.safetensors_io import DTYPE_NAMES, check_against_spec, check_finite, dtypes_of, encode, parse_header
from ..sessions.store import Session
from ..sessions.upload import receive_to_file
from .auth import require_owner
from .schemas import CreateSession, NowcastReport, NowcastRequest, session_view, state_ack

SID = PathParam(..., min_length=1, max_length=64, description="session id from POST /v1/sessions")
STEP = PathParam(..., ge=0, le=10**15, description="the optimizer call (0-based, as in the k schedule) at which "
                 "the state was taken; also the idempotency key")
SEND_CHUNK = 8 << 20
ERR = {"model": dict, "description": "JSON {error, detail}"}


def build_router() -> APIRouter:
    r = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_owner)],
                  responses={401: ERR, 404: ERR, 422: ERR})

    @r.post("", status_code=201, responses={413: ERR, 429: ERR})
    async def create_session(body: CreateSession, request: Request, response: Response,
                             owner: str = Depends(require_owner)) -> dict[str, Any]:
        """Create a session for one training run; its settings fix the k schedule and the nowcaster."""
        st = request.app.state
        try:
            spec = ModelSpec.from_json(body.spec)
        except SpecError as e:
            raise ServiceError(422, "invalid_spec", str(e)) from None
        if spec.n_params > st.settings.max_params_per_session:
            raise ServiceError(422, "spec_too_large", f"the spec has {spec.n_params} parameters, this server "
                               f"accepts at most {st.settings.max_params_per_session} (NINOCAST_MAX_PARAMS_PER_SESSION)")
        name = body.nowcaster or st.registry.default
        model = st.registry.get(name)
        if spec.family not in model.families:
            raise ServiceError(422, "unsupported_family", f"nowcaster {name!r} supports {list(model.families)}, "
                               f"not family {spec.family!r}")
        ctx = body.ctx or model.ctx
        if ctx != model.ctx and model.kind != "linefit":
            raise ServiceError(422, "invalid_ctx", f"nowcaster {name!r} needs ctx={model.ctx}, got {ctx}")
        s = await run_in_threadpool(st.store.create, owner, spec, name, ctx, body.period, body.max_train_steps,
                                    body.record, body.name)
        response.headers["Location"] = f"/v1/sessions/{s.id}"
        return session_view(s, st.settings.session_ttl_s)

    @r.get("")
    async def list_sessions(request: Request, owner: str = Depends(require_owner)) -> dict[str, Any]:
        """This key's sessions (never another key's)."""
        st = request.app.state
        return {"sessions": [session_view(s, st.settings.session_ttl_s, full=False) for s in st.store.list(owner)]}

    @r.get("/{session_id}")
    async def get_session(request: Request, session_id: str = SID,
                          owner: str = Depends(require_owner)) -> dict[str, Any]:
        """Settings, states held (steps), nowcasts done and their timings."""
        st = request.app.state
        return session_view(st.store.get(owner, session_id), st.settings.session_ttl_s)

    @r.delete("/{session_id}", status_code=204)
    async def delete_session(request: Request, session_id: str = SID, owner: str = Depends(require_owner)) -> Response:
        """Delete the session and every state it holds."""
        await run_in_threadpool(request.app.state.store.delete, owner, session_id)
        return Response(status_code=204)

    @r.put("/{session_id}/states/{step}", status_code=201, responses={
        200: {"description": "the same state was stored before (a safe retry)"}, 400: ERR, 409: ERR, 413: ERR,
        415: ERR, 507: ERR},
        openapi_extra={"requestBody": {"required": True, "description": "a safetensors file of the parameters",
                                       "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                           "format": "binary"}}}}})
    async def put_state(request: Request, session_id: str = SID, step: int = STEP,
                        owner: str = Depends(require_owner)) -> JSONResponse:
        """Upload the state at ``step``. Acknowledged (201) only once validated and durably on disk; repeating
        the same step with the same bytes answers 200."""
        st = request.app.state
        s = st.store.get(owner, session_id)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/octet-stream":
            raise ServiceError(415, "unsupported_media_type", "a state must be sent as application/octet-stream "
                               f"(a safetensors file), got {ctype or 'no Content-Type'!r}")
        quota_left = st.settings.disk_quota_per_key - st.store.used_bytes(owner)
        tmp, size, _ = await receive_to_file(request, st.store.tmp_dir, st.settings.max_body_bytes, quota_left,
                                             check=lambda path: _validate(path, s))
        garbage: list[Path] = []  # superseded states, unlinked after the answer is sent
        try:
            new = await run_in_threadpool(st.store.commit_state, s, step, tmp, size, garbage)
        finally:
            tmp.unlink(missing_ok=True)
        return JSONResponse(state_ack(s, step, size, new), status_code=201 if new else 200,
                            background=BackgroundTask(_unlink_all, garbage) if garbage else None)

    @r.post("/{session_id}/nowcast", responses={
        200: {"description": "safetensors body of the nowcasted parameters",
              "content": {"application/octet-stream": {}}}, 409: ERR, 503: ERR})
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

        res, (head, data) = await st.queue.run(owner, work, estimate_bytes(s.spec, s.ctx))
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

    @r.post("/{session_id}/nowcasts/{step}/report", status_code=201, responses={413: ERR})
    async def report_nowcast(request: Request, body: NowcastReport, session_id: str = SID, step: int = STEP,
                             owner: str = Depends(require_owner)) -> dict[str, Any]:
        """Record what the client did with the nowcast at ``step`` (verified: accepted, shortened or rejected;
        or skipped); shown under ``reports`` and ``verification`` in GET /v1/sessions/{id}. A repeat replaces."""
        st = request.app.state
        s = st.store.get(owner, session_id)
        report = {"step": step, "at": time.time(), **body.model_dump()}
        await run_in_threadpool(st.store.add_report, s, report)
        return {"session": s.id, "step": step, "stored": True, "reports": len(s.reports)}

    return r


def _validate(tmp: Path, s: Session) -> None:
    """Trust nothing in the body until its header, names, shapes, dtypes and values check out (runs while the
    upload is fsynced; the state is committed only after both)."""
    header = parse_header(tmp)
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
