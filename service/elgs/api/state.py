"""What the app holds while it runs: one engine and one batcher per loaded model, and readiness.

Each model is loaded in its own :class:`~elgs.compute.ComputeThread`, which then runs all its torch
ops (issue 8): the event loop and helper threads never run one. Models given to
:func:`elgs.api.create_app` already loaded (tests) get a new compute thread; they then have run
torch ops in two threads, which on a small CPU slows their passes (see :mod:`elgs.compute`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from elgs.api.metrics import ServiceMetrics
from elgs.api.settings import Settings
from elgs.batcher import Batcher
from elgs.compute import ComputeThread
from elgs.engine import Engine, Request, Result
from elgs.errors import ServiceError
from elgs.models import LoadedModel, load_model

logger = logging.getLogger("elgs.api")
R = TypeVar("R")


class ModelNotLoadedError(ServiceError, LookupError):
    """A request named a model this server did not load (HTTP 404)."""

    status = 404


# The backend contract (issue 16): what the routers, the middleware and the health probes use of a service.
# The local classes (ServiceState, ModelRuntime, LoadedModel, elgs.batcher.Batcher) and the Ray ingress's
# (elgs.api.ray: RayServiceState, RemoteRuntime, RemoteModel, RemoteBatcher) both implement it;
# tests/api/test_backend_protocol.py runs one suite against both.

@runtime_checkable
class AdmissionTicket(Protocol):
    """A request admitted before its body arrived (``Batcher.reserve``): its deadline, held until released."""

    deadline: float

    @property
    def released(self) -> bool: ...

    def release(self) -> None: ...


@runtime_checkable
class BatcherBackend(Protocol):
    """Admission and submission of one model's requests."""

    max_batch_size: int

    @property
    def running(self) -> bool: ...

    def check_capacity(self, deadline: float | None = None) -> None:
        """Raise ``QueueFullError`` / ``BatcherClosedError`` now when the request could not be taken in time."""

    def reserve(self, deadline: float | None = None) -> AdmissionTicket: ...

    async def submit(self, request: Request, *, deadline: float | None = None,
                     finish: Callable[[Result], Any] | None = None,
                     reservation: AdmissionTicket | None = None) -> Any:
        """The answer to ``request`` (``finish(result)`` when given), or the batcher's errors; ``reservation``: the
        ticket :meth:`reserve` gave it before its body arrived (None: admitted now)."""


@runtime_checkable
class ModelBackend(Protocol):
    """What the routers read of a model (``LoadedModel``, or a Ray model deployment's description)."""

    name: str
    weights: str
    input_size: int

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class RuntimeBackend(Protocol):
    """A served model: its description, its batcher, and whether it answers."""

    model: ModelBackend
    batcher: BatcherBackend
    ready: bool
    warmup_error: str | None

    @property
    def name(self) -> str: ...


@runtime_checkable
class ServiceBackend(Protocol):
    """A started service: its models by name (the first is the default), readiness, and shutdown."""

    settings: Settings
    runtimes: dict[str, Any]  # name -> RuntimeBackend

    @property
    def ready(self) -> bool: ...

    @property
    def default_model(self) -> str: ...

    def runtime(self, name: str | None) -> Any:
        """The :class:`RuntimeBackend` of model ``name`` (None: the default); ``ModelNotLoadedError`` otherwise."""

    async def close(self) -> None: ...


@dataclass(eq=False)
class ModelRuntime:
    """A resident model with its engine and its batcher."""

    model: LoadedModel
    engine: Engine
    batcher: Batcher
    ready: bool = False
    warmup_error: str | None = None

    @property
    def name(self) -> str:
        return self.model.name


def _load(settings: Settings, name: str) -> LoadedModel:
    return load_model(name, weights=settings.weights, device=settings.device, input_size=settings.input_size,
                      weights_dir=settings.weights_dir, allow_download=settings.allow_download)


def load_models(settings: Settings) -> list[LoadedModel]:
    """Load ``settings.models`` from the zoo in this thread (blocking; raises what :func:`load_model` raises)."""
    return [_load(settings, name) for name in settings.models]


async def load_models_placed(settings: Settings) -> tuple[list[LoadedModel], list[ComputeThread]]:
    """Load each of ``settings.models`` in a new compute thread, the one that will run it.

    Raises:
        What :func:`load_model` raises (the threads started so far are shut down).
    """
    models: list[LoadedModel] = []
    threads: list[ComputeThread] = []
    try:
        for name in settings.models:
            threads.append(ComputeThread(name, settings.torch_threads))
            models.append(await threads[-1].run(_load, settings, name))
    except BaseException:
        for thread in threads:
            thread.shutdown(wait=False)
        raise
    return models, threads


def warmup_batch_sizes(max_batch_size: int, compiled: bool) -> list[int]:
    """Batch sizes run at warm-up: one batch of up to 2, or for a compiled model 1, 2 and the largest
    (after sizes 1 and 2, torch.compile marks the batch dimension dynamic, so one more graph serves all)."""
    if not compiled:
        return [min(2, max_batch_size)]
    return sorted({1, min(2, max_batch_size), max_batch_size})


class RuntimeLookup(Generic[R]):
    """Finding a model's runtime by name, shared by the local service state and the Ray Serve ingress's
    (:class:`elgs.api.ray.RayServiceState`): ``runtimes`` by model name, the first being the default."""

    runtimes: dict[str, R]

    @property
    def default_model(self) -> str:
        return next(iter(self.runtimes))

    def runtime(self, name: str | None) -> R:
        """The runtime of model ``name`` (None: the default model).

        Raises:
            ModelNotLoadedError: no model of that name is loaded (404).
        """
        if name is None:
            return self.runtimes[self.default_model]
        try:
            return self.runtimes[name]
        except KeyError:
            raise ModelNotLoadedError(
                f"model {name!r} is not loaded on this server; loaded: {', '.join(self.runtimes)}"
            ) from None


@dataclass(eq=False)
class ServiceState(RuntimeLookup[ModelRuntime]):
    """The running service: ``runtimes`` by model name, the first being the default."""

    settings: Settings
    metrics: ServiceMetrics
    runtimes: dict[str, ModelRuntime] = field(default_factory=dict)
    _warmup: asyncio.Task | None = None

    @classmethod
    def build(cls, settings: Settings, models: Sequence[LoadedModel], metrics: ServiceMetrics,
              compute_threads: Sequence[ComputeThread] | None = None) -> ServiceState:
        """Runtimes for ``models``; ``compute_threads[i]`` is the thread that loaded ``models[i]``
        (None: each batcher starts its own)."""
        if not models:
            raise ValueError("the service needs at least one model")
        if compute_threads is not None and len(compute_threads) != len(models):
            raise ValueError(f"got {len(compute_threads)} compute threads for {len(models)} models")
        state = cls(settings=settings, metrics=metrics)
        for index, model in enumerate(models):
            if model.name in state.runtimes:
                raise ValueError(f"model {model.name!r} is given twice")
            engine = Engine(model, calibration_file=settings.calibration_file)
            batcher = Batcher(engine, max_batch_size=settings.batch_size_for(model.device),
                              max_batch_rows=settings.max_batch_rows,
                              max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                              request_timeout_s=settings.request_timeout_s, hooks=[metrics],
                              compute=compute_threads[index] if compute_threads is not None else None,
                              torch_threads=settings.torch_threads)
            state.runtimes[model.name] = ModelRuntime(model=model, engine=engine, batcher=batcher)
        return state

    @property
    def ready(self) -> bool:
        return all(runtime.ready and runtime.batcher.running for runtime in self.runtimes.values())

    async def start(self, *, warmup: bool = True) -> None:
        """Start the batchers; warm up in the background (readiness turns true when done)."""
        for runtime in self.runtimes.values():
            await runtime.batcher.start()
            if self.settings.dtype != "float32" or self.settings.compile:
                await runtime.batcher.compute_thread.run(runtime.model.configure_fast_path,
                                                         dtype=self.settings.dtype, compile=self.settings.compile)
        if warmup:
            self._warmup = asyncio.get_running_loop().create_task(self._warm_up_all(), name="elgs-warmup")
        else:
            for runtime in self.runtimes.values():
                runtime.ready = True

    async def _warm_up_all(self) -> None:
        for runtime in self.runtimes.values():
            size = runtime.model.input_size
            # NumPy, not torch: the image becomes a tensor in the compute thread.
            image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
            # Batches that exercise both passes, the input gradient and a gradient defence.
            sizes = warmup_batch_sizes(runtime.batcher.max_batch_size, self.settings.compile)
            tasks = [("defend", "slgs"), ("classify", "none")]
            try:
                for batch_size in sizes:
                    await runtime.batcher.warm_up([Request(image=image, task=tasks[i % 2][0], method=tasks[i % 2][1])
                                                   for i in range(batch_size)])
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.exception("warm-up of %r failed", runtime.name)
                runtime.warmup_error = f"{type(error).__name__}: {error}"
                continue
            runtime.ready = True
            logger.info("model %s ready on %s (%s weights)", runtime.name, runtime.model.device, runtime.model.weights)

    async def warmed_up(self) -> None:
        """Wait for the warm-up :meth:`start` began, if any (a Ray model replica reports ready after it)."""
        if self._warmup is not None:
            await asyncio.wait({self._warmup})

    async def close(self) -> None:
        """Cancel the warm-up, stop the batchers (queued requests get 503)."""
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
            await asyncio.wait({self._warmup})  # unlike `await`, keeps a cancellation of close() itself
        for runtime in self.runtimes.values():
            await runtime.batcher.close()
