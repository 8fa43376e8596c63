"""What the app holds while it runs: one engine and one batcher per loaded model, and readiness."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from elgs.api.metrics import ServiceMetrics
from elgs.api.settings import Settings
from elgs.batcher import Batcher
from elgs.engine import Engine, Request
from elgs.models import LoadedModel, load_model

logger = logging.getLogger("elgs.api")


class ModelNotLoadedError(LookupError):
    """A request named a model this server did not load (HTTP 404)."""


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


def load_models(settings: Settings) -> list[LoadedModel]:
    """Load ``settings.models`` from the zoo (blocking; raises what :func:`load_model` raises)."""
    return [
        load_model(name, weights=settings.weights, device=settings.device, input_size=settings.input_size,
                   weights_dir=settings.weights_dir, allow_download=settings.allow_download)
        for name in settings.models
    ]


@dataclass(eq=False)
class ServiceState:
    """The running service: ``runtimes`` by model name, the first being the default."""

    settings: Settings
    metrics: ServiceMetrics
    runtimes: dict[str, ModelRuntime] = field(default_factory=dict)
    _warmup: asyncio.Task | None = None

    @classmethod
    def build(cls, settings: Settings, models: Sequence[LoadedModel], metrics: ServiceMetrics) -> ServiceState:
        if not models:
            raise ValueError("the service needs at least one model")
        state = cls(settings=settings, metrics=metrics)
        for model in models:
            if model.name in state.runtimes:
                raise ValueError(f"model {model.name!r} is given twice")
            engine = Engine(model)
            batcher = Batcher(engine, max_batch_size=settings.batch_size_for(model.device),
                              max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                              request_timeout_s=settings.request_timeout_s, hooks=[metrics])
            state.runtimes[model.name] = ModelRuntime(model=model, engine=engine, batcher=batcher)
        return state

    @property
    def default_model(self) -> str:
        return next(iter(self.runtimes))

    @property
    def ready(self) -> bool:
        return all(runtime.ready and runtime.batcher.running for runtime in self.runtimes.values())

    def runtime(self, name: str | None) -> ModelRuntime:
        """The runtime of model ``name`` (None: the default model)."""
        if name is None:
            return self.runtimes[self.default_model]
        try:
            return self.runtimes[name]
        except KeyError:
            raise ModelNotLoadedError(
                f"model {name!r} is not loaded on this server; loaded: {', '.join(self.runtimes)}"
            ) from None

    async def start(self, *, warmup: bool = True) -> None:
        """Start the batchers; warm up in the background (readiness turns true when done)."""
        for runtime in self.runtimes.values():
            await runtime.batcher.start()
        if warmup:
            self._warmup = asyncio.get_running_loop().create_task(self._warm_up_all(), name="elgs-warmup")
        else:
            for runtime in self.runtimes.values():
                runtime.ready = True

    async def _warm_up_all(self) -> None:
        for runtime in self.runtimes.values():
            size = runtime.model.input_size
            image = torch.rand((3, size, size), generator=torch.Generator().manual_seed(0))
            # One batch that exercises both passes, the input gradient and a gradient defence.
            batch = [Request(image=image, task="defend", method="slgs"), Request(image=image, task="classify")]
            try:
                await runtime.batcher.warm_up(batch[: max(1, runtime.batcher.max_batch_size)])
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.exception("warm-up of %r failed", runtime.name)
                runtime.warmup_error = f"{type(error).__name__}: {error}"
                continue
            runtime.ready = True
            logger.info("model %s ready on %s (%s weights)", runtime.name, runtime.model.device, runtime.model.weights)

    async def close(self) -> None:
        """Cancel the warm-up, stop the batchers (queued requests get 503)."""
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
            await asyncio.wait({self._warmup})  # unlike `await`, keeps a cancellation of close() itself
        for runtime in self.runtimes.values():
            await runtime.batcher.close()
