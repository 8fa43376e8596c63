"""Servers for the SDK and load-benchmark tests: the real app around the tiny CNN (with knobs on its
forward), in-process for the async client and behind a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI

from elgs.api import Settings, create_app
from elgs.models import LoadedModel
from elgs_client import AsyncClient
from tests.conftest import make_tiny_model

TEST_BASE_URL = "http://testserver"

@dataclass
class ModelControl:
    """Knobs on the tiny model's forward: ``gate`` blocks it while clear, ``delay_s`` slows it down,
    ``entered`` is set each time a forward starts."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        self.gate.set()


def controlled_tiny_model() -> tuple[LoadedModel, ModelControl]:
    """The conftest tiny CNN with a :class:`ModelControl` wrapped around its forward."""
    model = make_tiny_model()
    control = ModelControl()
    forward = model.module.forward

    def controlled_forward(x):
        control.entered.set()
        if not control.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        if control.delay_s:
            time.sleep(control.delay_s)
        return forward(x)

    model.module.forward = controlled_forward
    return model, control


@contextlib.asynccontextmanager
async def async_client_for(app: FastAPI, *, event_hooks: dict | None = None, **options) -> AsyncIterator[AsyncClient]:
    """An :class:`AsyncClient` talking to ``app`` in this event loop through ``httpx.ASGITransport``,
    with the app's lifespan (model start-up and shut-down) run around it."""
    options.setdefault("max_retries", 0)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=TEST_BASE_URL,
                                     event_hooks=event_hooks) as http:
            yield AsyncClient(TEST_BASE_URL, http_client=http, **options)


def free_port_socket() -> socket.socket:
    """A listening-ready socket bound to 127.0.0.1 on a free port (handed to uvicorn, so no race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def uvicorn_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn in a thread on 127.0.0.1; yields its base URL, stops it after."""
    sock = free_port_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@dataclass
class LiveServer:
    url: str
    control: ModelControl


@contextlib.contextmanager
def live_tiny_server() -> Iterator[LiveServer]:
    """A real uvicorn serving the tiny CNN, warmed up and ready."""
    model, control = controlled_tiny_model()
    app = create_app(Settings(models=["tiny"], weights="random"), models=[model])
    with uvicorn_server(app) as url:
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.05)
        yield LiveServer(url=url, control=control)
