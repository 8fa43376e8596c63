"""Prometheus metrics of one app, in the app's own registry (several apps can live in one process)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elgs.batcher import BatcherHooks
from elgs.defenses import DEFENSES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class MetricSpec:
    """One metric, declared once for ``elgs serve`` (prometheus_client) and the Ray model replicas (Ray's metrics).

    Attributes:
        kind: ``histogram``, ``gauge`` or ``counter``.
        buckets: the histogram's upper bounds.
    """

    name: str
    description: str
    kind: str
    labels: tuple[str, ...] = ("model",)
    buckets: tuple[float, ...] = ()


# The batcher's metrics, by the BatcherHooks method that records them.
BATCHER_METRICS: dict[str, MetricSpec] = {
    "queue_wait": MetricSpec("elgs_queue_wait_seconds", "time a request waited in its model's queue", "histogram",
                             buckets=LATENCY_BUCKETS),
    "batch": MetricSpec("elgs_batch_size", "requests per batch", "histogram", buckets=BATCH_BUCKETS),
    "queue_depth": MetricSpec("elgs_queue_depth", "requests waiting in the model's queue", "gauge"),
    "model_pass": MetricSpec("elgs_model_pass_seconds", "engine time of one batch (both passes and the defence)",
                             "histogram", buckets=LATENCY_BUCKETS),
    "dropped": MetricSpec("elgs_dropped_requests",
                          "queued requests dropped before compute (client gone or deadline passed)", "counter",
                          labels=("model", "reason")),
}


class BatcherMetricHooks(BatcherHooks):
    """The batcher's hooks recorded into the metrics of :data:`BATCHER_METRICS`; subclasses say how one
    is recorded (:meth:`record`)."""

    def record(self, hook: str, value: float, labels: tuple[str, ...]) -> None:
        """Observe (histogram), set (gauge) or add (counter) ``value`` on ``BATCHER_METRICS[hook]``."""
        raise NotImplementedError

    def queue_wait(self, model: str, seconds: float) -> None:
        self.record("queue_wait", seconds, (model,))

    def batch(self, model: str, size: int) -> None:
        self.record("batch", size, (model,))

    def queue_depth(self, model: str, depth: int) -> None:
        self.record("queue_depth", depth, (model,))

    def model_pass(self, model: str, seconds: float, size: int) -> None:
        self.record("model_pass", seconds, (model,))

    def dropped(self, model: str, reason: str) -> None:
        self.record("dropped", 1, (model, reason))


def _prometheus_metric(spec: MetricSpec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    if spec.kind == "histogram":
        return Histogram(spec.name, spec.description, list(spec.labels), buckets=spec.buckets, registry=registry)
    kind = {"gauge": Gauge, "counter": Counter}[spec.kind]
    return kind(spec.name, spec.description, list(spec.labels), registry=registry)


class ServiceMetrics(BatcherMetricHooks):
    """The service's metrics; also the batchers' hooks.

    Attributes:
        registry: the app's own registry, served by ``GET /metrics``.
        batcher_metrics: the metrics of :data:`BATCHER_METRICS` by hook name.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "elgs_requests", "HTTP requests by endpoint (route template; /defend/<method> per defence), "
            "HTTP method and status", ["endpoint", "method", "status"], registry=self.registry)
        self.request_latency = Histogram(
            "elgs_request_latency_seconds", "HTTP request latency", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batcher_metrics = {hook: _prometheus_metric(spec, self.registry) for hook, spec in BATCHER_METRICS.items()}
        self.cascade_paths = Counter(
            "elgs_cascade_answers", "answers of a cascade (/defend/auto) by the path that decided them: screen (the "
            "cheap screen passed the image) or strong (flagged, decided by the strong defence), and the verdict",
            ["model", "method", "path", "attacked"], registry=self.registry)

    def record(self, hook: str, value: float, labels: tuple[str, ...]) -> None:
        metric = self.batcher_metrics[hook].labels(*labels)
        kind = BATCHER_METRICS[hook].kind
        if kind == "histogram":
            metric.observe(value)
        elif kind == "gauge":
            metric.set(value)
        else:
            metric.inc(value)

    def cascade_answer(self, model: str, method: str, path: str, attacked: bool | None) -> None:
        """Count a cascade's answer by its path and verdict (``attacked``: true, false or unknown)."""
        self.cascade_paths.labels(model, method, path, "unknown" if attacked is None else str(attacked).lower()).inc()

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
