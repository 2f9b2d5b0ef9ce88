"""What every request passes before the app reads a byte of its body: the API key, the declared size, then a
streamed byte cap and an idle timeout while the body arrives.

A pure ASGI middleware, because FastAPI reads a JSON body (and would buffer any other) before a route's
dependencies run: an unauthenticated client must not be able to make the server hold its body. A refusal is
sent with ``Connection: close``, so the rest of an unwanted body is not even received.
"""

from __future__ import annotations

import asyncio
import json
import re
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..sessions.errors import ServiceError
from .auth import Authenticator

STATE_UPLOAD = re.compile(r"/v1/sessions/[^/]+/states/[^/]+/?")


class RequestGuard:
    def __init__(self, app: ASGIApp, auth: Authenticator, max_json_bytes: int, max_body_bytes: int,
                 body_idle_timeout_s: float) -> None:
        self.app, self.auth = app, auth
        self.max_json_bytes, self.max_body_bytes, self.idle_s = max_json_bytes, max_body_bytes, body_idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        if path == "/v1" or path.startswith("/v1/"):
            try:
                scope.setdefault("state", {})["owner"] = self.auth.owner(headers.get("authorization"))
            except ServiceError as e:
                await refuse(send, e.status, e.code, e.detail, e.headers)
                return
        if scope["method"] == "PUT" and STATE_UPLOAD.fullmatch(path):
            limit, what = self.max_body_bytes, "NINOCAST_MAX_BODY_BYTES"
        else:
            limit, what = self.max_json_bytes, "NINOCAST_MAX_JSON_BYTES"
        detail = f"the body exceeds this server's limit of {limit} bytes for {scope['method']} {path[:200]} ({what})"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await refuse(send, 413, "body_too_large", detail)
            return
        await self.app(scope, self._guarded(receive, limit, detail), send)

    def _guarded(self, receive: Receive, limit: int, detail: str) -> Receive:
        """receive() for the app: errors are raised inside it, so the route's own clean-up (temp files) runs
        and errors.py renders them."""
        seen, done = 0, False

        async def guarded() -> Message:
            nonlocal seen, done
            if done:  # after the body only a disconnect can come: no timeout (a streamed answer waits on it)
                return await receive()
            msg = await _receive_within(receive, self.idle_s)
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                done = True
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise HTTPException(413, detail, {"Connection": "close"})  # rendered as JSON by errors.py
            return msg

        return guarded


async def _receive_within(receive: Receive, seconds: float) -> Message:
    """The next message, or 408 when no body byte came for ``seconds`` (asyncio.timeout: no task per chunk)."""
    try:
        if hasattr(asyncio, "timeout"):
            async with asyncio.timeout(seconds):
                return await receive()
        return await asyncio.wait_for(receive(), seconds)  # Python 3.10
    except (TimeoutError, asyncio.TimeoutError):
        raise HTTPException(408, f"no byte of the request body arrived for {seconds:g} s "
                            "(NINOCAST_BODY_IDLE_TIMEOUT_S)", {"Connection": "close"}) from None


async def refuse(send: Send, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
    """Answer before the body is read, and close the connection: the client may still be sending it."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
