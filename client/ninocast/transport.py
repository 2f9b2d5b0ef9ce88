"""NowcastClient: a typed HTTP client for the ninocast server.

Control messages are JSON; tensors travel as raw safetensors bytes. Every failure becomes a ``NowcastAPIError``
subclass that carries the server's ``error`` code and ``detail`` sentence, so callers can tell "the server is
busy, try later" from "your request is wrong".
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Mapping

import httpx
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .flat import state_dtype
from .session_settings import SessionSettings
from .spec import ModelSpec


def check_url(url: str) -> str:
    """``url`` without a trailing slash, or a ValueError saying what is wrong: a mistyped server address is a
    configuration error to report at once, not a transient fault to retry during training."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"server must be a URL like http://HOST:PORT, got {url!r}")
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise ValueError(f"server {url!r} is not a valid URL ({e}); expected http://HOST:PORT") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"server {url!r} has no http:// or https:// scheme; expected http://HOST:PORT, e.g. "
                         f"'http://{url.strip()}'")
    if not parsed.host:
        raise ValueError(f"server {url!r} names no host; expected http://HOST:PORT")
    return url.strip().rstrip("/")


class NowcastAPIError(Exception):
    """Any failure talking to the server. ``status`` is None when no HTTP answer came back."""

    kind = "error"

    def __init__(self, message: str, status: int | None = None, error: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.detail = status, error, detail


class ServerUnavailable(NowcastAPIError):
    """No answer (connection refused, timeout) or a 5xx: worth retrying later."""

    kind = "unavailable"


class ServerBusy(NowcastAPIError):
    """503 with Retry-After: the server's queue or memory budget is full."""

    kind = "busy"

    def __init__(self, *args: Any, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.retry_after = retry_after


class RequestRejected(NowcastAPIError):
    """A 4xx: the request itself is wrong (bad spec, too few states, unknown session...)."""

    kind = "rejected"


class AuthError(RequestRejected):
    """401: missing or wrong API key."""

    kind = "auth"


class NotFound(RequestRejected):
    """404: no such session for this key (deleted, expired, or someone else's)."""

    kind = "not_found"


class DeadlineExceeded(NowcastAPIError):
    """The caller's time budget ran out before an answer came (NowcastOptimizer's nowcast deadline)."""

    kind = "timeout"


class InvalidResponse(NowcastAPIError):
    """The server answered 2xx with a body that is not what the API promises."""

    kind = "invalid_response"


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    error: str | None = None
    detail: str | None = None
    try:
        body = resp.json()
        if isinstance(body, dict):
            error = None if body.get("error") is None else str(body["error"])
            detail = None if body.get("detail") is None else str(body["detail"])
    except Exception:
        pass
    if detail is None:
        detail = resp.text[:500] or resp.reason_phrase
    msg = f"{resp.request.method} {resp.request.url.path} -> {resp.status_code}" + \
        (f" {error}" if error else "") + f": {detail}"
    if resp.status_code == 503:
        try:
            retry_after = float(resp.headers["Retry-After"])
        except (KeyError, ValueError):
            retry_after = None
        raise ServerBusy(msg, resp.status_code, error, detail, retry_after=retry_after)
    if resp.status_code >= 500:
        raise ServerUnavailable(msg, resp.status_code, error, detail)
    cls = {401: AuthError, 404: NotFound}.get(resp.status_code, RequestRejected)
    raise cls(msg, resp.status_code, error, detail)


class NowcastClient:
    """``NowcastClient("http://gpu-box:8000", api_key=...)``; retries transport failures, 5xx and 503s
    (``retries`` times, exponential ``backoff`` or the server's Retry-After, at most ``max_retry_wait`` s each)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 2,
                 backoff: float = 0.5, transport: httpx.BaseTransport | None = None,
                 max_retry_wait: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries, self.backoff, self.max_retry_wait = retries, backoff, max_retry_wait
        self.timeout = timeout
        self._http = httpx.Client(base_url=check_url(url), headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "NowcastClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, deadline: float | None = None, **kw: Any) -> httpx.Response:
        """Send with retries on no-answer, 5xx and 503; 4xx answers are final. ``deadline`` (a
        ``time.monotonic()`` value) bounds the whole call, retries and waits included: each attempt's timeout is
        cut to the time left, and no retry starts after it."""
        last: NowcastAPIError | None = None
        for attempt in range(self.retries + 1):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    last = last or ServerUnavailable(f"{method} {path}: no time left before the deadline")
                    break
                kw["timeout"] = min(self.timeout, left) if self.timeout is not None else left
            try:
                resp = self._http.request(method, path, **kw)
                _raise_for(resp)
                return resp
            except httpx.TransportError as e:
                last = ServerUnavailable(f"{method} {path}: {type(e).__name__}: {e}")
            except (ServerUnavailable, ServerBusy) as e:
                last = e
            if attempt < self.retries:
                wait = min(getattr(last, "retry_after", None) or self.backoff * 2**attempt, self.max_retry_wait)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    break
                time.sleep(wait)
        assert last is not None
        raise last

    def _json(self, method: str, path: str, key: str | None = None, deadline: float | None = None,
              **kw: Any) -> Any:
        """The JSON answer (or its ``key``); anything else is an InvalidResponse."""
        resp = self._request(method, path, deadline=deadline, **kw)
        try:
            body = resp.json()
            return body[key] if key is not None else body
        except Exception as e:
            raise InvalidResponse(f"{method} {path}: unexpected answer ({type(e).__name__}: {e}): "
                                  f"{resp.text[:200]!r}", resp.status_code) from None

    # ------------------------------------------------------------------ API
    def health(self) -> dict:
        return self._json("GET", "/healthz")

    def ready(self) -> dict:
        """``/readyz``: ``{"status": "ready", "checks": {...}}``; a ServerBusy (503) when not ready."""
        return self._json("GET", "/readyz")

    def nowcasters(self) -> dict:
        """The catalogue as served: ``{"default": name, "devices": [...], "nowcasters": [{name, kind, ...}]}``."""
        return self._json("GET", "/v1/nowcasters")

    def create_session(self, settings: SessionSettings | ModelSpec, deadline: float | None = None,
                       **fields: Any) -> dict:
        """Create a session: from ``settings``, or from a spec and SessionSettings fields as keywords
        (``nowcaster=``, ``ctx=``, ``period=``, ``max_train_steps=``, ``name=``, ``record=``)."""
        if isinstance(settings, ModelSpec):
            settings = SessionSettings(settings, **fields)
        elif fields:
            raise TypeError(f"give the session's fields in its SessionSettings, not as keywords: {sorted(fields)}")
        return self._json("POST", "/v1/sessions", json=settings.to_json(), deadline=deadline)

    def get_session(self, session_id: str, deadline: float | None = None) -> dict:
        """Settings, the steps held, the nowcasts done and their timings (GET /v1/sessions/{id})."""
        return self._json("GET", f"/v1/sessions/{session_id}", deadline=deadline)

    def list_sessions(self) -> list[dict]:
        """This key's sessions (the ``sessions`` list of GET /v1/sessions)."""
        return self._json("GET", "/v1/sessions", key="sessions")

    def delete_session(self, session_id: str, deadline: float | None = None) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}", deadline=deadline)

    def put_state(self, session_id: str, step: int, tensors: Mapping[str, torch.Tensor] | bytes,
                  deadline: float | None = None) -> dict:
        """Upload one snapshot (named tensors, or ready safetensors bytes). Idempotent by step."""
        body = tensors if isinstance(tensors, bytes) else encode_state(tensors)
        return self._json("PUT", f"/v1/sessions/{session_id}/states/{step}", content=Chunked(body),
                          headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(body))},
                          deadline=deadline)

    def nowcast(self, session_id: str, k: int | None = None, dtype: str | None = None) -> dict[str, torch.Tensor]:
        """Nowcasted parameters by name, from the session's newest ctx states. ``dtype``: float32 (the
        server's default), bfloat16, float16, or 'uploaded' (each tensor as in the newest state)."""
        return self.nowcast_with_info(session_id, k=k, dtype=dtype)[0]

    def nowcast_with_info(self, session_id: str, k: int | None = None, dtype: str | None = None,
                          deadline: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, info)``; info: ``k``, ``steps`` (the states used, oldest first), ``nowcaster``,
        ``device`` and ``server_timing`` as the server's headers tell (None where absent)."""
        body = {key: v for key, v in (("k", k), ("dtype", dtype)) if v is not None}
        resp = self._request("POST", f"/v1/sessions/{session_id}/nowcast", json=body, deadline=deadline)
        try:
            tensors = st_load(resp.content)
        except Exception as e:
            raise InvalidResponse(f"nowcast answer is not a safetensors body: {e}", resp.status_code) from None
        h = resp.headers
        try:
            info = {"k": int(h["X-Ninocast-K"]) if "X-Ninocast-K" in h else None,
                    "steps": [int(x) for x in h["X-Ninocast-Steps"].split(",")] if h.get("X-Ninocast-Steps")
                    else None,
                    "nowcaster": h.get("X-Ninocast-Nowcaster"), "device": h.get("X-Ninocast-Device"),
                    "server_timing": h.get("Server-Timing")}
        except ValueError as e:
            raise InvalidResponse(f"nowcast answer has malformed X-Ninocast headers: {e}", resp.status_code) \
                from None
        return tensors, info

    def report_nowcast(self, session_id: str, step: int, report: Mapping[str, Any]) -> dict:
        """Attach a nowcast's verification report (accepted, alpha, probe values...) to the session's history;
        idempotent by step (POST /v1/sessions/{id}/nowcasts/{step}/report)."""
        return self._json("POST", f"/v1/sessions/{session_id}/nowcasts/{step}/report", json=dict(report))


class Chunked:
    """A request body sent in 1 MiB memoryview pieces (re-iterable, so a retry can resend it).

    httpx/httpcore send a ``bytes`` body with ``buffer = buffer[sent:]`` after every partial ``send``, which
    copies the rest of the body each time: quadratic in the body size (180 MB/s for 100 MB here, against
    1.1 GB/s for the same bytes in pieces).
    """

    def __init__(self, data: bytes, piece: int = 1 << 20) -> None:
        self.data, self.piece = memoryview(data), piece

    def __iter__(self) -> Iterator[memoryview]:
        for i in range(0, len(self.data), self.piece):
            yield self.data[i : i + self.piece]


def encode_state(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Named tensors -> safetensors bytes (contiguous CPU copies only where needed), each in the dtype it travels
    in (``ninocast.flat.state_dtype``: float64 as float32, as NowcastOptimizer's snapshots are)."""
    return st_save({k: v.detach().to("cpu", dtype=state_dtype(v.dtype)).contiguous() for k, v in tensors.items()})
