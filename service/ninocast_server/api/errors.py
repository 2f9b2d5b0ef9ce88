"""Every error leaves the server as JSON ``{"error": <short code>, "detail": <what and where>}``.

FastAPI's own answers (validation, malformed JSON, unknown routes, body limits) are rewritten to that shape, and
anything unexpected becomes a logged 500 instead of a dropped connection.
"""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..sessions.errors import ServiceError

log = logging.getLogger("ninocast.api")

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              408: "request_timeout", 413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request",
              429: "too_many_requests", 503: "server_busy"}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, e: ServiceError) -> JSONResponse:
        return error_response(e.status, e.code, e.detail, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            pos = next((err["loc"][-1] for err in errs if err.get("type") == "json_invalid"), "?")
            return error_response(400, "malformed_json", f"the request body is not valid JSON (error at byte {pos})")
        parts = []
        for err in errs[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
        return error_response(422, "invalid_request", "; ".join(parts) + more)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        headers = dict(e.headers) if e.headers else {}
        if e.status_code == 405:
            allowed = allowed_methods(request)
            detail = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
            headers["Allow"] = ", ".join(allowed)
        elif e.status_code == 400 and isinstance(e.__cause__, RecursionError):
            detail = "the JSON body nests too deeply"
        elif e.status_code == 400 and isinstance(e.__cause__, Exception):
            detail = f"cannot read the request body: {e.__cause__}"[:500]
        return error_response(e.status_code, HTTP_CODES.get(e.status_code, "http_error"), detail, headers or None)

    @app.exception_handler(OSError)
    async def _os(request: Request, e: OSError) -> JSONResponse:
        if e.errno in DISK_FULL:
            log.error("disk full while serving %s %s: %s", request.method, request.url.path, e)
            return error_response(507, "disk_full", "the server's disk is full: nothing was stored by this request; "
                                  "retry after space is freed (the operator sees this in /readyz)")
        return await _crash(request, e)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"{type(e).__name__} while serving {request.url.path}; "
                              "the server logged the details")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first matching route's)."""
    routes = request.app.router.routes
    return [m for m in METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]
