"""Fixtures for the SDK tests: the real app around the tiny CNN, in-process (sync and async) and
behind a real uvicorn on 127.0.0.1 (see ``servers.py``).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from elgs.api import Settings, create_app
from elgs.images import sample_photo
from elgs.models import LoadedModel
from elgs_client import AsyncClient, Client
from tests.client.servers import (
    TEST_BASE_URL,
    LiveServer,
    ModelControl,
    async_client_for,
    controlled_tiny_model,
    live_tiny_server,
)


@dataclass
class Service:
    app: FastAPI
    model: LoadedModel
    control: ModelControl


@pytest.fixture
def make_service() -> Callable[..., Service]:
    """``make_service(**settings)``: the real app serving the tiny CNN (no warm-up unless asked)."""

    def make(**overrides) -> Service:
        overrides.setdefault("warmup", False)
        settings = Settings(models=["tiny"], weights="random", **overrides)
        model, control = controlled_tiny_model()
        return Service(app=create_app(settings, models=[model]), model=model, control=control)

    return make


@pytest.fixture
def service(make_service) -> Service:
    return make_service()


@pytest.fixture
def sync_client(service) -> Iterator[Client]:
    """A :class:`Client` talking to the app in-process through Starlette's test client."""
    with TestClient(service.app, base_url=TEST_BASE_URL) as http:
        yield Client(TEST_BASE_URL, http_client=http, max_retries=0)


@pytest.fixture
async def async_client(make_service) -> AsyncIterator[AsyncClient]:
    """An :class:`AsyncClient` on its own app (an app's lifespan runs in one event loop only)."""
    async with async_client_for(make_service().app) as client:
        yield client


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    """A real uvicorn serving the tiny CNN (warmed up) for the tests of one module."""
    with live_tiny_server() as server:
        yield server


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo_png() -> bytes:
    """A real photograph (scikit-image's chelsea, 90x60, not square) as PNG bytes."""
    return png_bytes(sample_photo("chelsea").resize((90, 60)))
