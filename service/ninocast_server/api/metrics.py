"""Prometheus metrics kept in process: request counts and bytes by route, nowcast latency histograms.

A pure ASGI middleware counts every request (a few dict updates; no per-request task or body copy). Gauges
(queue depth, sessions, disk) are read from their owners when /metrics is scraped.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.bytes_in: dict[str, int] = defaultdict(int)
        self.bytes_out: dict[str, int] = defaultdict(int)
        self.latency: dict[tuple[str, str], list[float]] = {}  # (nowcaster, device) -> bucket counts + sum, count
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def count_request(self, route: str, method: str, status: int, n_in: int, n_out: int) -> None:
        with self._lock:
            self.requests[(route, method, status)] += 1
            self.bytes_in[route] += n_in
            self.bytes_out[route] += n_out

    def observe_nowcast(self, nowcaster: str, device: str, seconds: float) -> None:
        with self._lock:
            h = self.latency.setdefault((nowcaster, device), [0.0] * (len(BUCKETS) + 2))
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help, read)

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            out += ["# HELP ninocast_requests_total HTTP requests by route template, method and status.",
                    "# TYPE ninocast_requests_total counter"]
            for (route, method, status), n in sorted(self.requests.items()):
                out.append(f'ninocast_requests_total{{route="{_esc(route)}",method="{method}",status="{status}"}} {n}')
            for name, data, what in (("ninocast_request_bytes_total", self.bytes_in, "Request body bytes"),
                                     ("ninocast_response_bytes_total", self.bytes_out, "Response body bytes")):
                out += [f"# HELP {name} {what} by route template.", f"# TYPE {name} counter"]
                out += [f'{name}{{route="{_esc(r)}"}} {n}' for r, n in sorted(data.items())]
            out += ["# HELP ninocast_nowcast_seconds Nowcast time on the worker (states read + engine).",
                    "# TYPE ninocast_nowcast_seconds histogram"]
            for (nc, dev), h in sorted(self.latency.items()):
                lab = f'nowcaster="{_esc(nc)}",device="{dev}"'
                for b, c in zip(BUCKETS, h):
                    out.append(f'ninocast_nowcast_seconds_bucket{{{lab},le="{b}"}} {int(c)}')
                out.append(f'ninocast_nowcast_seconds_bucket{{{lab},le="+Inf"}} {int(h[-1])}')
                out.append(f"ninocast_nowcast_seconds_sum{{{lab}}} {h[-2]:.6f}")
                out.append(f"ninocast_nowcast_seconds_count{{{lab}}} {int(h[-1])}")
        for name, (help, read) in sorted(self.gauges.items()):
            out += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(out) + "\n"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsMiddleware:
    """Counts requests by route template (not raw path: ids would explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        n_in = n_out = 0
        status = 500

        async def counting_receive() -> Message:
            nonlocal n_in
            msg = await receive()
            n_in += len(msg.get("body", b""))
            return msg

        async def counting_send(msg: Message) -> None:
            nonlocal n_out, status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body":
                n_out += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.count_request(route, scope["method"], status, n_in, n_out)
