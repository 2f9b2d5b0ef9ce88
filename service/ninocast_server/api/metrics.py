"""Prometheus metrics kept in process: request counts and bytes by route, nowcast latency histograms.

The collectors and the text rendering are prometheus_client's; each app has its own registry, so several apps in
one process (the tests) count separately. A pure ASGI middleware counts every request (a label lookup and two
increments; no per-request task or body copy). Gauges (queue depth, sessions, disk) are read from their owners
when /metrics is scraped.
"""

from __future__ import annotations

from typing import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# The *_created series (one timestamp per label set) would double the output and nobody here reads them.
prometheus_client.disable_created_metrics()


class Metrics:
    """One app's collectors; ``render`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("ninocast_requests", "HTTP requests by route template, method and status.",
                                 ("route", "method", "status"), registry=self.registry)
        self._bytes_in = Counter("ninocast_request_bytes", "Request body bytes by route template.", ("route",),
                                 registry=self.registry)
        self._bytes_out = Counter("ninocast_response_bytes", "Response body bytes by route template.", ("route",),
                                  registry=self.registry)
        self._latency = Histogram("ninocast_nowcast_seconds", "Nowcast time on the worker (states read + engine).",
                                  ("nowcaster", "device"), buckets=BUCKETS, registry=self.registry)

    def count_request(self, route: str, method: str, status: int, n_in: int, n_out: int) -> None:
        self._requests.labels(route, method, str(status)).inc()
        self._bytes_in.labels(route).inc(n_in)
        self._bytes_out.labels(route).inc(n_out)

    def observe_nowcast(self, nowcaster: str, device: str, seconds: float) -> None:
        self._latency.labels(nowcaster, device).observe(seconds)

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` at each scrape."""
        Gauge(name, help, registry=self.registry).set_function(read)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


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
