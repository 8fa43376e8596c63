"""Against a running server: concurrent requests do not cross, a full queue answers 503, a deadline 504,
and a client that disconnects while queued costs no model pass."""

import asyncio
import base64
import io
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api.helpers import BatchRecorder, LiveServer, gated_tiny_model, photo_png, tiny_settings
from tests.conftest import make_tiny_model

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "cat"]
ENDPOINTS = ["/classify", "/defend/lgs", "/defend/slgs", "/defend/wlgs", "/defend/none"]


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def _assert_same_answer(together: dict, alone: dict) -> None:
    for key in ("predictions", "original_predictions"):
        if key in alone:
            assert [(p["index"], p["label"]) for p in together[key]] == [(p["index"], p["label"]) for p in alone[key]]
            # float32 convolutions give last-bit differences between batch sizes (oneDNN), hence the tolerance
            assert [p["score"] for p in together[key]] == pytest.approx([p["score"] for p in alone[key]],
                                                                         rel=1e-4, abs=1e-6)
    for key in ("image", "mask"):
        if key in alone:
            assert np.abs(_pixels(together[key]) - _pixels(alone[key])).max() <= 1  # within 1/255


async def test_32_concurrent_mixed_requests_do_not_cross_talk():
    model = make_tiny_model()
    settings = tiny_settings(max_batch_size=8, max_wait_ms=250)  # wide: a slow machine spreads arrivals
    with LiveServer(settings, [model]) as server:
        batcher = server.service.runtimes["tiny"].batcher
        recorder = BatchRecorder(model.module)
        batcher.hooks.append(recorder)
        uploads = {name: photo_png(name, size=96) for name in PHOTOS}
        plan = [(ENDPOINTS[i % 5], PHOTOS[i % 8], {"lambda": str(1.0 + (i % 7))} if "gs" in ENDPOINTS[i % 5] else {})
                for i in range(32)]

        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=32)) as client:
            async def send(path, photo, params):
                response = await client.post(path, params=params, files={"image": (f"{photo}.png", uploads[photo],
                                                                                   "image/png")})
                assert response.status_code == 200, response.text
                return response.json()

            together = await asyncio.gather(*(send(*step) for step in plan))
            concurrent_passes = list(recorder.passes)
            batcher.max_wait_s = 0.0  # alone: no need to wait for company
            alone = [await send(*step) for step in plan]

    assert max(answer["batch_size"] for answer in together) > 1
    assert all(answer["batch_size"] == 1 for answer in alone)
    assert sum(size for size, _ in concurrent_passes) == 32
    assert all(calls <= 2 for _, calls in recorder.passes)  # at most two model calls per batch
    for got, want in zip(together, alone):
        assert got.get("method") == want.get("method")
        _assert_same_answer(got, want)


@pytest.fixture
def gated_server():
    model, gate = gated_tiny_model()
    settings = tiny_settings(max_batch_size=1, max_wait_ms=0, max_queue=2, request_timeout_s=20)
    with LiveServer(settings, [model]) as server:
        recorder = BatchRecorder(model.module.inner)  # after the warm-up
        server.service.runtimes["tiny"].batcher.hooks.append(recorder)
        gate.opened.clear()
        gate.entered.clear()  # the warm-up went through the gate
        try:
            yield server, gate, recorder
        finally:
            gate.opened.set()


def _wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


async def test_full_queue_answers_503_with_retry_after_at_once(gated_server):
    server, gate, _ = gated_server
    batcher = server.service.runtimes["tiny"].batcher
    cat = photo_png()
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        def classify():
            return asyncio.ensure_future(client.post("/classify", files={"image": ("cat.png", cat, "image/png")}))

        held = [classify()]
        assert await asyncio.to_thread(gate.entered.wait, 30)  # one computing
        held += [classify(), classify()]
        await asyncio.to_thread(_wait_until, lambda: batcher.depth == 2)  # two queued: the queue is full
        started = time.monotonic()
        rejected = await client.post("/classify", files={"image": ("cat.png", cat, "image/png")})
        assert time.monotonic() - started < 5.0  # at once: a queued request would wait for the gate (20 s)
        assert rejected.status_code == 503 and int(rejected.headers["retry-after"]) >= 1
        assert "queue of model 'tiny' is full" in rejected.json()["detail"]
        gate.opened.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]


async def test_request_past_its_deadline_gets_504_and_is_not_computed(gated_server):
    server, gate, recorder = gated_server
    server.app.state.settings.request_timeout_s = 0.3
    # Batches are known to be quick, so admission (expected wait < 0.3 s) lets both requests in.
    server.service.runtimes["tiny"].batcher.batch_time.seconds = 0.01
    cat = photo_png()
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        first = asyncio.ensure_future(client.post("/classify", files={"image": ("cat.png", cat, "image/png")}))
        assert await asyncio.to_thread(gate.entered.wait, 30)
        late = await client.post("/classify", files={"image": ("cat.png", cat, "image/png")})
        assert late.status_code == 504 and "no answer within" in late.json()["detail"]
        gate.opened.set()
        assert (await first).status_code == 504  # computing when its deadline passed
        assert (await client.get("/health/ready")).status_code == 200
        # A probe queued behind everything else: once it is answered, anything left in the queue has run.
        server.app.state.settings.request_timeout_s = 20
        assert (await client.post("/classify", files={"image": ("cat.png", cat, "image/png")})).status_code == 200
    assert recorder.dropped_reasons == ["deadline"]  # the queued one left the queue at its deadline...
    assert [size for size, _ in recorder.passes] == [1, 1]  # ...and never reached the model (first, probe)


def _raw_multipart_post(port: int, path: str, data: bytes) -> socket.socket:
    boundary = "elgs0boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"cat.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    connection.sendall(head + body)
    return connection


def test_client_that_disconnects_while_queued_costs_no_model_pass(gated_server):
    server, gate, recorder = gated_server
    batcher = server.service.runtimes["tiny"].batcher
    cat = photo_png()
    first = _raw_multipart_post(server.port, "/defend/slgs", cat)
    assert gate.entered.wait(30)  # the first request is computing
    leaving = _raw_multipart_post(server.port, "/defend/slgs", cat)
    _wait_until(lambda: batcher.depth == 1)
    leaving.close()
    _wait_until(lambda: batcher.depth == 0)  # taken out of the queue as soon as the client left
    gate.opened.set()
    first.settimeout(30)
    assert first.recv(64).startswith(b"HTTP/1.1 200")
    first.close()
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    assert recorder.dropped_reasons == ["cancelled"]
    assert recorder.passes == [(1, 2)]  # one batch of the first request, two model calls; none for the other
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'elgs_dropped_requests_total{model="tiny",reason="cancelled"} 1.0' in metrics
