"""The service on Ray Serve (issue 10, DESIGN 10): the same app, its models in replicas across machines.

Needs the extra ``pip install "elgs[ray]"``; nothing else in elgs imports this module, so ``elgs serve``
without ``--ray`` runs without Ray installed.

Two kinds of deployment:

* ``ingress`` (CPU only, several replicas): the app of :func:`elgs.api.create_app`, so the same routers,
  schemas, errors, API key and web page; it decodes uploads and encodes answers. Its service object
  (:class:`RayServiceState`) has the interface of :class:`~elgs.api.state.ServiceState`, but each model's
  ``batcher`` is a :class:`RemoteBatcher` that sends the request, its image a uint8 NumPy array, through
  a ``DeploymentHandle``.
* ``model-<name>``, one per model (``num_cpus`` / ``num_gpus`` per replica): :class:`ModelReplica` holds
  the model resident with the two-pass engine and the project's own :class:`~elgs.batcher.Batcher` (it
  keeps the deadlines, drop-before-compute, OOM splitting and per-request failures that Ray's
  ``@serve.batch`` lacks). It answers only after warm-up, so a running replica is a ready one.

The ingress admits and queues requests itself (:mod:`elgs.api.ray_gate`, issue 18): at most what the running
replicas take at once is at Ray, and a request whose answer would come after its deadline, or that finds no
replica running, gets 503 with ``Retry-After`` at once instead of a 504 after waiting in Ray's queue. A request
whose model replica died goes to another replica (at most :data:`MAX_RESENDS` times); with none left it gets
503 as soon as ``serve.status()`` (asked at once) shows it. Ray's ``max_queued_requests`` turns into the same
503. Every computed answer carries ``X-Elgs-Replica: <host>:<pid>`` of the model replica, and
``/health/ready`` carries ``X-Elgs-Replicas: <model>=<running>/<target>,...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI
from prometheus_client import Counter
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elgs.api.app import create_app
from elgs.api.metrics import BATCHER_METRICS, BatcherMetricHooks, ServiceMetrics
from elgs.api.ray_gate import DeploymentGate, GateTicket
from elgs.api.settings import Settings
from elgs.api.state import RuntimeLookup, ServiceState
from elgs.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError
from elgs.engine import Request, Result
from elgs.errors import ServiceError

logger = logging.getLogger("elgs.api")

APP_NAME = "elgs"
INGRESS_NAME = "ingress"
REPLICA_HEADER = "X-Elgs-Replica"
REPLICAS_HEADER = "X-Elgs-Replicas"
STATUS_POLL_S = 1.0
# Requests in a model replica's warm-up batch (elgs.api.state.warmup_batch_sizes, uncompiled).
WARMUP_BATCH = 2
# Errors raised where the model replica went away (killed, crashed, drained): the request is sent again.
RETRIED_ERRORS = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


def replica_id() -> str:
    """``<host>:<pid>`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


# Model replicas ------------------------------------------------------------------------------------

class RayBatcherMetrics(BatcherMetricHooks):
    """The batcher's metrics of :data:`~elgs.api.metrics.BATCHER_METRICS`, exported through Ray's metrics agent
    (Prometheus names get Ray's ``ray_`` prefix and the ``deployment``, ``replica`` and ``application`` tags)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        kinds = {"histogram": metrics.Histogram, "gauge": metrics.Gauge, "counter": metrics.Counter}
        self.metrics = {
            hook: kinds[spec.kind](spec.name, spec.description, tag_keys=spec.labels,
                                   **({"boundaries": list(spec.buckets)} if spec.kind == "histogram" else {}))
            for hook, spec in BATCHER_METRICS.items()}

    def record(self, hook: str, value: float, labels: tuple[str, ...]) -> None:
        spec, metric = BATCHER_METRICS[hook], self.metrics[hook]
        tags = dict(zip(spec.labels, labels, strict=True))
        if spec.kind == "histogram":
            metric.observe(value, tags=tags)
        elif spec.kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.inc(value, tags=tags)


# A model replica returns its errors as values: a user exception raised in a replica reaches the caller
# wrapped in a RayTaskError. The service's own (elgs.errors.ServiceError: status, Retry-After) pickle whole.


def error_outcome(error: Exception) -> dict[str, Any]:
    """What :meth:`ModelReplica.submit` returns for ``error``; :func:`raise_outcome_error` raises it again: a
    :class:`~elgs.errors.ServiceError` as itself, any other as an internal error with its message."""
    if isinstance(error, ServiceError):
        return {"error": error}
    return {"error": "internal", "message": f"{type(error).__name__}: {error}"}


def raise_outcome_error(outcome: Mapping[str, Any]) -> None:
    """Raise the ingress-side exception for an error outcome (the app's handlers map it to its status)."""
    if isinstance(outcome["error"], ServiceError):
        raise outcome["error"]
    raise RuntimeError(f"the model replica failed: {outcome['message']}")


class ModelReplica:
    """One replica of a model deployment: the model resident in its compute thread, engine and batcher.

    Args:
        settings: the service settings (``models`` is replaced by ``[model]``).
        model: the zoo model this deployment serves.
        max_ongoing_requests: the deployment's ``max_ongoing_requests`` (the ingress sends no more at once).
    """

    async def __init__(self, settings: Settings, model: str, max_ongoing_requests: int | None = None) -> None:
        from elgs.api.state import load_models_placed

        # A replacement's Retry-After counts the whole start: the process and its imports too, not only the load.
        started = time.monotonic() - _process_age_s()
        self.settings = settings.model_copy(update={"models": [model]})
        self.replica = replica_id()
        loaded, threads = await load_models_placed(self.settings)
        service = ServiceState.build(self.settings, loaded, RayBatcherMetrics(), threads)  # type: ignore[arg-type]
        await self._serve(service, model, max_ongoing_requests, started)

    @classmethod
    async def around(cls, service: ServiceState, model: str, max_ongoing_requests: int | None = None) -> ModelReplica:
        """A replica of ``model`` around a built (not started) local ``service``, outside Ray: what the shared
        backend tests put behind a stand-in deployment handle."""
        replica = cls.__new__(cls)
        replica.settings, replica.replica = service.settings, replica_id()
        await replica._serve(service, model, max_ongoing_requests, time.monotonic())
        return replica

    async def _serve(self, service: ServiceState, model: str, max_ongoing_requests: int | None,
                     started: float) -> None:
        self.service = service
        await self.service.start(warmup=self.settings.warmup)
        await self.service.warmed_up()  # a replica is reported running only once it can answer
        self.runtime = self.service.runtimes[model]
        if self.runtime.warmup_error:
            raise RuntimeError(f"warm-up of {model} failed: {self.runtime.warmup_error}")
        self.max_ongoing_requests = max_ongoing_requests or 2 * self.runtime.batcher.max_batch_size
        self.startup_s = time.monotonic() - started
        logger.info("model %s ready in replica %s after %.1f s", model, self.replica, self.startup_s)

    def info(self) -> dict[str, Any]:
        """What the ingress shows in ``GET /models``, needs to decode uploads and to admit requests
        (the measured batch time, the requests a replica takes at once, how long a replica takes to start)."""
        model, batcher = self.runtime.model, self.runtime.batcher
        return {"describe": model.describe(), "name": model.name, "weights": model.weights,
                "input_size": model.input_size, "device": str(model.device),
                "max_batch_size": batcher.max_batch_size, "replica": self.replica,
                "batch_seconds": batcher.batch_seconds, "max_ongoing_requests": self.max_ongoing_requests,
                "startup_s": self.startup_s}

    async def submit(self, request: Request, timeout_s: float, finish: Callable[[Result], Any] | None = None
                     ) -> dict[str, Any]:
        """``{"answer": ..., "replica": "<host>:<pid>"}``, or an error outcome (see :func:`error_outcome`)."""
        if isinstance(request.image, np.ndarray) and not request.image.flags.writeable:
            # Ray hands NumPy arguments over read-only (zero copy); torch.from_numpy wants a writable array.
            request = replace(request, image=request.image.copy())
        try:
            answer = await self.runtime.batcher.submit(request, deadline=time.monotonic() + timeout_s, finish=finish)
        except Exception as error:
            return error_outcome(error)
        return {"answer": answer, "replica": self.replica}

    def check_health(self) -> None:
        """Ray restarts a replica whose batcher stopped."""
        if not self.service.ready:
            raise RuntimeError(f"model {self.runtime.name} is not ready in replica {self.replica}")

    async def __del__(self) -> None:
        await self.service.close()


def _process_age_s() -> float:
    """Seconds since this process started (0 where unknown)."""
    try:
        import psutil  # Ray's own copy in a Ray worker

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - an estimate for Retry-After only
        return 0.0


# Ingress -------------------------------------------------------------------------------------------

# One mutable holder per HTTP request, set by ReplicaHeaderMiddleware; RemoteBatcher.submit runs in a
# task with a copy of the context, so it writes into the holder instead of setting the variable.
_answering_replica: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "elgs_answering_replica", default=None)


@dataclass
class RemoteModel:
    """What the routers read of a :class:`~elgs.models.LoadedModel`, as a model replica reported it."""

    name: str
    weights: str
    input_size: int
    device: str
    description: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


# Times a request goes to Ray again after its replica died or drained (each time to another replica).
MAX_RESENDS = 2


class RemoteBatcher:
    """The :class:`~elgs.batcher.Batcher` interface the routers use, sending requests to a model deployment
    through its :class:`~elgs.api.ray_gate.DeploymentGate` (admission, queue, shedding at the ingress).

    Args:
        handle: the model deployment's handle.
        model: the model's name.
        max_batch_size: the replicas' batch size (for ``GET /models``).
        max_queue: requests the ingress queues for the model beyond what its replicas take at once.
        request_timeout_s: the default deadline.
        gate: the deployment's gate (default: one for a replica taking ``2 x max_batch_size`` requests).
        on_retry: called with the model's name when a request goes to Ray again (metrics).
        on_replica_lost: called when a replica died under a request (the ingress asks Ray's status at once).
    """

    def __init__(self, handle: DeploymentHandle, model: str, *, max_batch_size: int, max_queue: int,
                 request_timeout_s: float, gate: DeploymentGate | None = None,
                 on_retry: Callable[[str], None] | None = None, on_replica_lost: Callable[[], None] | None = None
                 ) -> None:
        self.handle = handle
        self.on_retry = on_retry
        self.on_replica_lost = on_replica_lost
        self.model_name = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.gate = gate or DeploymentGate(model, max_ongoing_requests=2 * max_batch_size, max_queue=max_queue,
                                           seconds_per_request=0.1, request_timeout_s=request_timeout_s)
        self.running = True

    def _deadline(self, deadline: float | None) -> float:
        return time.monotonic() + self.request_timeout_s if deadline is None else deadline

    def check_capacity(self, deadline: float | None = None) -> None:
        """Raise now what :meth:`submit` would raise for lack of room (see :meth:`DeploymentGate.check`)."""
        if not self.running:
            raise BatcherClosedError(f"model {self.model_name!r} is not accepting requests (shutting down)")
        self.gate.check(self._deadline(deadline))

    def reserve(self, deadline: float | None = None) -> GateTicket:
        """Admit a request before its body arrives; it counts against the gate until released or answered.

        Raises:
            BatcherClosedError, QueueFullError: as :meth:`check_capacity`.
        """
        if not self.running:
            raise BatcherClosedError(f"model {self.model_name!r} is not accepting requests (shutting down)")
        ticket = self.gate.admit(self._deadline(deadline))
        ticket.batcher = self
        return ticket

    async def submit(self, request: Request, *, deadline: float | None = None,
                     finish: Callable[[Result], Any] | None = None, reservation: GateTicket | None = None) -> Any:
        """Send ``request`` to a replica once the gate gives it a place; on a replica that died or shut down,
        to another one (at most :data:`MAX_RESENDS` times). ``reservation``: the ticket :meth:`reserve` gave
        this request (the admission middleware holds it), taken over here; without one it is admitted now.

        Raises:
            QueueFullError: refused by the gate or Ray (503); :class:`~elgs.api.ray_gate.NoReplicaError`
                when no replica runs.
            DeadlineExceededError: no answer before the deadline.
            What the replica's batcher raised (see :func:`raise_outcome_error`).
        """
        ticket = reservation
        if ticket is None or ticket.gate is not self.gate or ticket.state != "reserved":
            if not self.running:
                raise BatcherClosedError(f"model {self.model_name!r} is not accepting requests (shutting down)")
            ticket = self.gate.admit(self._deadline(deadline))
        try:
            await self.gate.acquire(ticket)
            return await self._call(ticket, request, finish)
        finally:
            ticket.release()

    async def _call(self, ticket: GateTicket, request: Request, finish: Callable[[Result], Any] | None) -> Any:
        lost = self.gate.lost()
        for attempt in range(MAX_RESENDS + 1):
            remaining = ticket.deadline - time.monotonic()
            if remaining <= 0:
                break
            response = self.handle.submit.remote(request, remaining, finish)
            call = asyncio.ensure_future(_result(response))
            call.add_done_callback(_retrieve)  # a cancelled call ends in RequestCancelledError: nobody reads it
            try:
                done, _ = await asyncio.wait({call, lost}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the client left: the replica's batcher drops it before compute
                _cancel(call, response)
                raise
            if call not in done:
                _cancel(call, response)
                if lost.done():  # the last replica went away: nothing will answer before a replacement
                    raise self.gate.no_replica_error()
                break
            try:
                outcome = call.result()
            except BackPressureError:
                raise QueueFullError(self.model_name, self.max_queue, 1) from None
            except RETRIED_ERRORS as error:
                self._replica_lost(error, attempt)
                if self.gate.replicas <= 0:
                    raise self.gate.no_replica_error() from None
                self.gate.resend(ticket)
                continue
            if isinstance(outcome.get("error"), BatcherClosedError):  # a replica draining: another one answers
                await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
                self.gate.resend(ticket)
                continue
            if "error" in outcome:
                raise_outcome_error(outcome)
            self.gate.answered(ticket)
            holder = _answering_replica.get()
            if holder is not None:
                holder["replica"] = outcome["replica"]
            return outcome["answer"]
        else:
            raise QueueFullError(self.model_name, self.max_queue, 1, reason=(
                f"the replicas of model {self.model_name!r} kept going away under this request"))
        raise DeadlineExceededError(f"no answer from model {self.model_name!r} within the deadline; "
                                    "retry later or raise ELGS_REQUEST_TIMEOUT_S")

    def _replica_lost(self, error: Exception, attempt: int) -> None:
        if self.on_retry is not None:
            self.on_retry(self.model_name)
        if self.on_replica_lost is not None:
            self.on_replica_lost()
        logger.warning("model %s: replica unavailable (%s); sending the request again (%d)", self.model_name,
                       type(error).__name__, attempt + 1)


def _retrieve(call: asyncio.Future) -> None:
    if not call.cancelled():
        call.exception()


def _cancel(call: asyncio.Future, response: Any) -> None:
    call.cancel()
    response.cancel()


async def _result(response: Any) -> Any:
    return await response


@dataclass(eq=False)
class RemoteRuntime:
    """:class:`~elgs.api.state.ModelRuntime`'s interface for a model deployment."""

    model: RemoteModel
    batcher: RemoteBatcher
    ready: bool = True
    warmup_error: str | None = None
    running_replicas: int = 1
    target_replicas: int = 1

    @property
    def name(self) -> str:
        return self.model.name

    @classmethod
    def from_info(cls, info: Mapping[str, Any], handle: DeploymentHandle, settings: Settings,
                  ingress_replicas: int = 1, **callbacks: Callable[..., None]) -> RemoteRuntime:
        """The runtime of the model a replica described in ``info`` (:meth:`ModelReplica.info`)."""
        name = info["name"]
        ongoing = info.get("max_ongoing_requests", 2 * info["max_batch_size"])
        # The warm-up batch's time shared by its requests: the first estimate, until answers measure it.
        per_request = info.get("batch_seconds", 1.0) / min(WARMUP_BATCH, info["max_batch_size"])
        gate = DeploymentGate(name, max_ongoing_requests=max(1, math.ceil(ongoing / ingress_replicas)),
                              max_queue=settings.max_queue, seconds_per_request=per_request,
                              request_timeout_s=settings.request_timeout_s, startup_s=info.get("startup_s", 30.0))
        batcher = RemoteBatcher(handle, name, max_batch_size=info["max_batch_size"], max_queue=settings.max_queue,
                                request_timeout_s=settings.request_timeout_s, gate=gate, **callbacks)
        model = RemoteModel(name=name, weights=info["weights"], input_size=info["input_size"], device=info["device"],
                            description=info["describe"])
        return cls(model=model, batcher=batcher)


@dataclass(eq=False)
class RayServiceState(RuntimeLookup[RemoteRuntime]):
    """:class:`~elgs.api.state.ServiceState`'s interface in an ingress replica; readiness from ``serve.status()``."""

    settings: Settings
    metrics: ServiceMetrics
    runtimes: dict[str, RemoteRuntime] = field(default_factory=dict)
    app_name: str = APP_NAME
    _poll: asyncio.Task | None = None
    _poll_now: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def connect(cls, settings: Settings, metrics: ServiceMetrics, handles: Mapping[str, DeploymentHandle],
                      app_name: str = APP_NAME, ingress_replicas: int = 1) -> RayServiceState:
        """Ask each model deployment for its model's description (waits for a first replica) and start polling;
        each of ``ingress_replicas`` ingress replicas sends its share of what the model replicas take at once."""
        state = cls(settings=settings, metrics=metrics, app_name=app_name)
        retries = Counter("elgs_replica_retries", "requests sent again because their model replica died or left",
                          ["model"], registry=metrics.registry)
        for name in settings.models:
            info = await handles[name].info.remote()
            state.runtimes[name] = RemoteRuntime.from_info(
                info, handles[name], settings, ingress_replicas, on_retry=lambda model: retries.labels(model).inc(),
                on_replica_lost=state._poll_now.set)
        state._poll = asyncio.get_running_loop().create_task(state._poll_status(), name="elgs-ray-status")
        return state

    @property
    def ready(self) -> bool:
        return all(runtime.ready for runtime in self.runtimes.values())

    def replicas_header(self) -> str:
        return ",".join(f"{n}={r.running_replicas}/{r.target_replicas}" for n, r in self.runtimes.items())

    def update(self, deployments: Mapping[str, Any]) -> None:
        """Readiness from ``serve.status()``'s deployments: a model is ready while one replica runs."""
        for name, runtime in self.runtimes.items():
            overview = deployments.get(model_deployment_name(name))
            if overview is None:
                continue
            states = {str(getattr(state, "value", state)): count for state, count in overview.replica_states.items()}
            runtime.running_replicas = states.get("RUNNING", 0)
            runtime.target_replicas = sum(states.values())
            runtime.ready = runtime.running_replicas >= 1
            gate = getattr(runtime.batcher, "gate", None)
            if gate is not None:
                gate.set_replicas(runtime.running_replicas)

    async def _poll_status(self) -> None:
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                application = status.applications.get(self.app_name)
                if application is not None:
                    self.update(application.deployments)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("serve.status() failed")
            # Every STATUS_POLL_S, and at once when a request met a dead replica.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), STATUS_POLL_S)
            self._poll_now.clear()

    async def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.batcher.running = False
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.wait({self._poll})


class ReplicaHeaderMiddleware:
    """Adds ``X-Elgs-Replica`` (the model replica that computed the answer) and, on ``/health/ready``,
    ``X-Elgs-Replicas`` (running/target replicas per model)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        token = _answering_replica.set(holder)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if "replica" in holder:
                    headers.append((REPLICA_HEADER.lower().encode(), holder["replica"].encode()))
                service = getattr(scope.get("app"), "state", None) and scope["app"].state.service
                if scope.get("path") == "/health/ready" and isinstance(service, RayServiceState):
                    headers.append((REPLICAS_HEADER.lower().encode(), service.replicas_header().encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _answering_replica.reset(token)


def create_ray_app(settings: Settings, handles: Mapping[str, DeploymentHandle], app_name: str = APP_NAME,
                   ingress_replicas: int = 1) -> FastAPI:
    """The ingress app: :func:`elgs.api.create_app` with the model deployments behind its routers
    (``ingress_replicas``: how many ingress replicas share the model replicas' capacity)."""

    async def connect(settings: Settings, metrics: ServiceMetrics) -> RayServiceState:
        return await RayServiceState.connect(settings, metrics, handles, app_name, ingress_replicas)

    app = create_app(settings, service_factory=connect)
    app.add_middleware(ReplicaHeaderMiddleware)
    return app


@serve.ingress()
class Ingress:
    """The ingress deployment (HTTP, decode, encode); ``models`` maps each model to its deployment's handle."""

    def __init__(self, settings: Settings, models: dict[str, DeploymentHandle], ingress_replicas: int = 1) -> None:
        self.settings = settings
        self.models = models
        self.ingress_replicas = ingress_replicas
        # The name `serve run`, `serve deploy` or elgs serve --ray gave the application (for serve.status()).
        self.app_name = serve.get_replica_context().app_name

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_ray_app(self.settings, self.models, self.app_name, self.ingress_replicas)


# Building and running ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayOptions:
    """How the deployments are laid out.

    Attributes:
        replicas: replicas of each model deployment.
        ingress_replicas: replicas of the ingress.
        model_num_cpus, model_num_gpus: Ray resources of each model replica (one GPU each on GPU hosts).
        ingress_num_cpus: Ray resources of each ingress replica (no GPU).
        max_ongoing_requests: requests a model replica takes at once (default: 2 batches, so one batch
            fills while the other computes).
    """

    replicas: int = 1
    ingress_replicas: int = 1
    model_num_cpus: float = 1.0
    model_num_gpus: float = 0.0
    ingress_num_cpus: float = 0.5
    max_ongoing_requests: int | None = None

    def __post_init__(self) -> None:
        for name in ("replicas", "ingress_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("model_num_cpus", "model_num_gpus", "ingress_num_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def build_application(settings: Settings, options: RayOptions = RayOptions()) -> serve.Application:
    """The Serve application: one deployment per model in ``settings.models`` and the ingress.

    Without ``settings.torch_threads`` (``ELGS_TORCH_THREADS``) each model replica runs
    ``max(1, int(options.model_num_cpus))`` torch threads.
    """
    if settings.torch_threads is None:  # each replica's torch threads follow its CPU share, not the node's cores
        settings = settings.model_copy(update={"torch_threads": max(1, int(options.model_num_cpus))})
    handles = {}
    for name in settings.models:
        # The batch size each replica will use: Settings.batch_size_for its device, as in elgs serve.
        batch = settings.batch_size_for(torch.device("cuda" if options.model_num_gpus > 0 else "cpu"))
        max_ongoing = options.max_ongoing_requests or 2 * batch
        deployment = serve.deployment(
            ModelReplica, name=model_deployment_name(name), num_replicas=options.replicas,
            ray_actor_options={"num_cpus": options.model_num_cpus, "num_gpus": options.model_num_gpus},
            max_ongoing_requests=max_ongoing,
            max_queued_requests=settings.max_queue, health_check_period_s=2, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=settings.request_timeout_s)
        handles[name] = deployment.bind(settings, name, max_ongoing_requests=max_ongoing)
    ingress = serve.deployment(
        Ingress, name=INGRESS_NAME, num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": options.ingress_num_cpus, "num_gpus": 0},
        max_ongoing_requests=max(64, 2 * settings.max_queue))
    return ingress.bind(settings, handles, ingress_replicas=options.ingress_replicas)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``import_path: elgs.api.ray:app_builder`` for ``serve run`` / ``serve deploy`` (deploy/ray/serve.yaml).

    ``args`` holds :class:`RayOptions` fields (``replicas``, ``model_num_gpus`` ...) and settings
    (``models``, ``max_batch_size`` ...); settings not given come from the ``ELGS_*`` environment.
    """
    args = dict(args or {})
    option_names = set(RayOptions.__dataclass_fields__)
    options = RayOptions(**{k: v for k, v in args.items() if k in option_names})
    settings = Settings(**{k: v for k, v in args.items() if k not in option_names})
    return build_application(settings, options)


def local_cpu_share(models: int, replicas: int, ingress: RayOptions = RayOptions()) -> float:
    """Ray CPUs per model replica so that every replica and the ingress fit this machine (at most 1)."""
    from elgs.compute import available_cores

    free = available_cores() - ingress.ingress_num_cpus * ingress.ingress_replicas
    return max(0.01, min(1.0, math.floor(100 * free / (models * replicas)) / 100))


def serve_forever(settings: Settings, options: RayOptions, address: str | None = None) -> None:
    """``elgs serve --ray``: start (``address`` None) or join a Ray instance, deploy, serve until Ctrl-C/SIGTERM.

    On the way out the application is deleted; a Ray instance this call started is shut down.
    """
    started_here = address is None
    ray.init(address="local" if started_here else address, include_dashboard=False,
             runtime_env={"env_vars": _forwarded_environment()}, log_to_driver=True)
    # Ctrl-C and SIGTERM both end in the clean shutdown below (SIGINT even where a shell ignored it).
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
        print(f"elgs: serving {', '.join(settings.models)} on Ray Serve at http://{settings.host}:{settings.port} "
              f"({options.replicas} replica(s) per model, {options.ingress_replicas} ingress); Ctrl-C stops",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("elgs: shutting down", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if started_here:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()


def _forwarded_environment() -> dict[str, str]:
    """The driver's ``ELGS_*``, ``TORCH_HOME`` and ``PYTHONPATH`` for the replicas."""
    return {key: value for key, value in os.environ.items()
            if key.startswith("ELGS_") or key in ("TORCH_HOME", "PYTHONPATH")}


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
