"""uvicorn's HTTP protocol with the limits uvicorn lacks: a header-read timeout, a header size cap, a connection
cap, and JSON bodies for the errors the HTTP layer answers itself.

uvicorn arms a timer only between kept-alive requests, so a client that opens a connection and sends half a
request line holds a file descriptor forever; a few hundred of them starve legitimate clients. Here each
request's headers must arrive within ``header_timeout_s`` (408, then close) and in at most
``max_header_bytes`` (431); a connection over ``max_connections`` is answered 503 and closed at once. Idle
bodies are the ASGI layer's job (api.limits.RequestGuard), keep-alive is uvicorn's ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from ..settings import Settings

log = logging.getLogger("ninocast.http")

REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
           503: b"Service Unavailable"}


def raw_error(status: int, code: str, detail: str, extra: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error response with a JSON {error, detail} body, closing the connection."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    head = [b"HTTP/1.1 %d %s" % (status, REASONS[status]), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close"]
    head += [f"{k}: {v}".encode() for k, v in (extra or {}).items()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def protocol_class(settings: Settings) -> Any:
    """The protocol class for ``uvicorn.run(http=...)``: httptools (uvicorn[standard]) with the limits above;
    plain h11 with its own incomplete-event cap where httptools is missing (no header timeout there)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        log.warning("httptools is not installed: no header-read timeout or connection cap (NINOCAST_HEADER_"
                    "TIMEOUT_S, NINOCAST_MAX_CONNECTIONS); install uvicorn[standard]")
        return "h11"

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        header_timeout_s = settings.header_timeout_s
        max_header_bytes = settings.max_header_bytes
        max_connections = settings.max_connections

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._awaiting_headers, self._header_bytes, self._seen_bytes = True, 0, 0
            self._header_timer: asyncio.TimerHandle | None = None
            if len(self.connections) > self.max_connections:
                self._refuse(503, "too_many_connections", f"the server holds {self.max_connections} connections "
                             "(NINOCAST_MAX_CONNECTIONS); retry shortly", {"retry-after": "1"})
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._seen_bytes += len(data)
            super().data_received(data)
            if self._awaiting_headers and not self.transport.is_closing():
                self._header_bytes += len(data)
                if self._header_bytes > self.max_header_bytes:
                    self._refuse(431, "headers_too_large", f"the request headers exceed {self.max_header_bytes} "
                                 "bytes (NINOCAST_MAX_HEADER_BYTES)")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._awaiting_headers, self._header_bytes = True, 0
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._awaiting_headers = False
            self._disarm()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, "malformed_http", f"{msg.rstrip('.')}: the request is not valid HTTP/1.1")

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self._awaiting_headers or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self._arm()  # a pipelined request behind one still being answered: wait for that one
                return
            if self._seen_bytes == 0 and self.cycle is None:
                self.transport.close()  # never said a word: nothing to answer
                return
            self._refuse(408, "request_timeout", f"the request headers did not arrive within "
                         f"{self.header_timeout_s:g} s (NINOCAST_HEADER_TIMEOUT_S)")

        def _refuse(self, status: int, code: str, detail: str, extra: dict[str, str] | None = None) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(raw_error(status, code, detail, extra))
                self.transport.close()

    return GuardedHttpToolsProtocol
