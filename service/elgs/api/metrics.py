"""Prometheus metrics of one app, in the app's own registry (several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elgs.batcher import BatcherHooks
from elgs.defenses import DEFENSES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics(BatcherHooks):
    """The service's metrics; also the batchers' hooks.

    Attributes:
        registry: the app's own registry, served by ``GET /metrics``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "elgs_requests", "HTTP requests by endpoint (route template; /defend/<method> per defence), "
            "HTTP method and status", ["endpoint", "method", "status"], registry=self.registry)
        self.request_latency = Histogram(
            "elgs_request_latency_seconds", "HTTP request latency", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram(
            "elgs_queue_wait_seconds", "time a request waited in its model's queue", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "elgs_batch_size", "requests per batch", ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth_gauge = Gauge(
            "elgs_queue_depth", "requests waiting in the model's queue", ["model"], registry=self.registry)
        self.model_pass_seconds = Histogram(
            "elgs_model_pass_seconds", "engine time of one batch (both passes and the defence)", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.dropped_requests = Counter(
            "elgs_dropped_requests", "queued requests dropped before compute (client gone or deadline passed)",
            ["model", "reason"], registry=self.registry)

    # BatcherHooks
    def queue_wait(self, model: str, seconds: float) -> None:
        self.queue_wait_seconds.labels(model).observe(seconds)

    def batch(self, model: str, size: int) -> None:
        self.batch_size.labels(model).observe(size)

    def queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth_gauge.labels(model).set(depth)

    def model_pass(self, model: str, seconds: float, size: int) -> None:
        self.model_pass_seconds.labels(model).observe(seconds)

    def dropped(self, model: str, reason: str) -> None:
        self.dropped_requests.labels(model, reason).inc()

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.request_latency.labels(endpoint).observe(seconds)


def endpoint_label(scope: Scope) -> str:
    """The matched route's path template (bounded cardinality); registered defences get their own label."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return "unmatched"
    if path == "/defend/{method}":
        method = scope.get("path_params", {}).get("method")
        if method in DEFENSES:
            return f"/defend/{method}"
    return path


class MetricsMiddleware:
    """Pure ASGI middleware counting requests and timing them (does not touch the body stream)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe_request(endpoint_label(scope), scope["method"], status,
                                         time.perf_counter() - started)
