"""Shared by the API tests: a real uvicorn server in a thread, a gated tiny model, test images."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib

import httpx
import uvicorn
from PIL import Image
from torch import nn

from elgs.api import Settings, create_app
from elgs.batcher import BatcherHooks
from elgs.images import sample_photo
from elgs.models import LoadedModel
from tests.conftest import make_tiny_model


class Gate(nn.Module):
    """Wraps a module; forward blocks while the gate is closed (a slow model the test controls)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.opened = threading.Event()
        self.opened.set()
        self.entered = threading.Event()

    def forward(self, x):
        self.entered.set()
        if not self.opened.wait(timeout=30):
            raise RuntimeError("the test never opened the gate")
        return self.inner(x)


def gated_tiny_model(**kwargs) -> tuple[LoadedModel, Gate]:
    model = make_tiny_model(**kwargs)
    gate = Gate(model.module).eval()
    model.module = gate
    return model, gate


class BatchRecorder(BatcherHooks):
    """Records every engine call: (batch size, model forward calls it made)."""

    def __init__(self, module) -> None:
        self.module = module
        self.passes: list[tuple[int, int]] = []
        self._last_calls = module.calls
        self.dropped_reasons: list[str] = []

    def model_pass(self, model: str, seconds: float, size: int) -> None:
        calls = self.module.calls
        self.passes.append((size, calls - self._last_calls))
        self._last_calls = calls

    def dropped(self, model: str, reason: str) -> None:
        self.dropped_reasons.append(reason)


def tiny_settings(**overrides) -> Settings:
    """Settings for a tiny-model server, independent of the caller's ELGS_* environment."""
    values = {"models": ["tiny"], "weights": "random", "max_batch_size": 4, "max_wait_ms": 5.0, "max_queue": 256,
              "request_timeout_s": 30.0, "max_upload_mb": 20.0, "max_pixels": 40_000_000, "api_key": None}
    values.update(overrides)
    return Settings(**values)


class LiveServer:
    """``create_app(settings, models)`` served by uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, settings: Settings, models: list[LoadedModel]) -> None:
        self.app = create_app(settings, models=models)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def service(self):
        return self.app.state.service

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        self.__exit__(None, None, None)
        raise RuntimeError("the test server did not become ready")

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


def encode(image: Image.Image, format: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_args)
    return buffer.getvalue()


def photo_png(name: str = "chelsea", size: int | None = 64) -> bytes:
    """A scikit-image photograph as PNG bytes, shrunk to ``size`` on its long side (None: full size)."""
    image = sample_photo(name)
    if size is not None:
        image.thumbnail((size, size))
    return encode(image)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")
