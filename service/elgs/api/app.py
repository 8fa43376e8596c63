"""The app factory and its lifespan: load the models once, warm them up, keep them resident."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from elgs.api.dependencies import require_api_key
from elgs.api.errors import install_error_handlers
from elgs.api.metrics import MetricsMiddleware, ServiceMetrics
from elgs.api.middleware import (
    AdmissionMiddleware,
    ApiKeyMiddleware,
    InFlightLimitMiddleware,
    RequestIdMiddleware,
    route_patterns,
)
from elgs.api.routes import INFERENCE_ROUTERS, OPEN_ROUTERS, PROTECTED_ROUTERS, UNLIMITED_ROUTERS
from elgs.api.routes.page import STATIC_DIR
from elgs.api.settings import Settings
from elgs.api.state import ServiceBackend, ServiceState, load_models_placed
from elgs.api.uploads import BodyLimitMiddleware, DecodePool
from elgs.compute import tune_allocator
from elgs.models import LoadedModel

logger = logging.getLogger("elgs.api")

# (settings, metrics) -> a started service (elgs.api.state.ServiceBackend); see create_app.
ServiceFactory = Callable[[Settings, ServiceMetrics], Awaitable[ServiceBackend]]

DESCRIPTION = """
Defends image classifiers against adversarial patch attacks with Local Gradients Smoothing (LGS) and
its saliency-guided successors SLGS and WLGS.

Upload an image as the multipart field `image`:

    curl -F image=@cat.jpg 'http://localhost:8000/defend/slgs?lambda=3.5'
    curl -F image=@cat.jpg 'http://localhost:8000/defend/slgs?response=image' -o defended.png

Every error is `{"detail": "..."}` saying what to fix; every response carries `X-Request-ID` (yours, if you
send a plain one), which a 500 quotes and the server's log names. When the server sets `ELGS_API_KEY`, send
`Authorization: Bearer <key>`; the health probes, `/metrics`, the web page at `/` (it asks for the key)
and these docs stay open.
"""


def _lifespan(settings: Settings, service_metrics: ServiceMetrics, models: Sequence[LoadedModel] | None,
              service_factory: ServiceFactory | None):
    """The app's lifespan: start the service (load, place and warm up the models, or the factory's backend)
    and the decode pool before serving; close both after."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service: ServiceBackend
        if service_factory is not None:
            service = await service_factory(settings, service_metrics)
        else:
            if models is not None:
                loaded, compute_threads = list(models), None
            else:
                try:  # each model in the thread that will run it (issue 8)
                    loaded, compute_threads = await load_models_placed(settings)
                except Exception as error:
                    logger.error("cannot start: %s", error)
                    raise
            service = ServiceState.build(settings, loaded, service_metrics, compute_threads)
            await service.start(warmup=settings.warmup)
        app.state.decoder = DecodePool(settings.decode_concurrency)
        app.state.service = service
        try:
            yield
        finally:
            app.state.service = None
            await service.close()
            app.state.decoder.close()

    return lifespan


def create_app(settings: Settings | None = None, models: Sequence[LoadedModel] | None = None, *,
               service_factory: ServiceFactory | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: defaults to :class:`Settings` read from the ``ELGS_*`` environment.
        models: already loaded models to serve (tests pass a tiny CNN); by default the lifespan loads
            ``settings.models`` from the zoo.
        service_factory: another backend for the same routers: ``await service_factory(settings, metrics)``
            returns a started :class:`~elgs.api.state.ServiceBackend` (Ray Serve: :mod:`elgs.api.ray`);
            by default the models run in this process.

    Returns:
        The FastAPI app; its lifespan loads and warms up the models and shuts the batchers down.
    """
    settings = settings or Settings()
    if service_factory is None:
        tune_allocator(settings.malloc_tuning)  # before the server's threads allocate (elgs.compute)
    service_metrics = ServiceMetrics()

    lifespan = _lifespan(settings, service_metrics, models, service_factory)

    from elgs import __version__

    app = FastAPI(
        title="elgs", version=__version__, description=DESCRIPTION, lifespan=lifespan,
        openapi_tags=[
            {"name": "inference", "description": "classify, defend, saliency (multipart field `image`)"},
            {"name": "catalogue", "description": "what is loaded and available"},
            {"name": "health", "description": "probes and Prometheus metrics (no API key needed)"},
        ],
    )
    app.state.settings = settings
    app.state.metrics = service_metrics
    app.state.service = None
    app.state.decoder = None  # the lifespan's bounded decode pool
    install_error_handlers(app)
    # Outermost last. In order of arrival: metrics (see every answer), request id (and clean 500s),
    # in-flight limit (503), API key, body limits (size 413, time 408), admission (503): all before the body is read.
    app.add_middleware(AdmissionMiddleware, inference=route_patterns(INFERENCE_ROUTERS))
    app.add_middleware(BodyLimitMiddleware, max_upload_mb=settings.max_upload_mb,
                       body_timeout_s=settings.body_timeout_s)
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app.add_middleware(ApiKeyMiddleware, api_key=api_key, protected=route_patterns(PROTECTED_ROUTERS))
    app.add_middleware(InFlightLimitMiddleware, max_in_flight=settings.max_connections,
                       exempt=route_patterns(UNLIMITED_ROUTERS))
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=service_metrics)

    # The middleware checks the key; the dependency also declares bearer auth in the OpenAPI
    # document, so only when a key is set.
    protected = [Depends(require_api_key)] if api_key is not None else []
    for router in PROTECTED_ROUTERS:
        app.include_router(router, dependencies=protected)
    for router in OPEN_ROUTERS:
        app.include_router(router)
    # check_dir=False: an installation without the page's files still serves the API.
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app
