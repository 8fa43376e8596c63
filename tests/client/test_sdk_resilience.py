"""Retries, timeouts, the API key and configuration from the environment, against the real app."""

from __future__ import annotations

import asyncio
import email.utils
import io
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from elgs_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    Client,
    GatewayTimeoutError,
    ServiceUnavailableError,
)
from elgs_client._base import parse_retry_after
from tests.client.servers import TEST_BASE_URL, async_client_for


async def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_queue_full_503_is_retried_after_retry_after(make_service, photo_png):
    """Fill the real queue (one request computing, one waiting, max_queue=1): the SDK's request gets
    503 with Retry-After, waits that long, and succeeds once the queue has drained."""
    service = make_service(max_queue=1, max_batch_size=1, max_wait_ms=0)
    batcher_of = lambda: service.app.state.service.runtimes["tiny"].batcher  # noqa: E731
    answers: list[tuple[int, str | None]] = []

    async def on_response(response: httpx.Response) -> None:
        if response.request.headers.get("X-Caller") == "sdk":
            answers.append((response.status_code, response.headers.get("Retry-After")))
        if response.status_code == 503:
            service.control.gate.set()  # the queue drains while the client waits out Retry-After

    async with async_client_for(service.app, event_hooks={"response": [on_response]}, max_retries=2,
                                backoff=0.01, headers={"X-Caller": "sdk"}) as client:
        http = client._http
        service.control.gate.clear()
        service.control.entered.clear()
        computing = asyncio.create_task(http.post("/classify", files={"image": ("a.png", photo_png, "image/png")}))
        assert await asyncio.to_thread(service.control.entered.wait, 30)
        queued = asyncio.create_task(http.post("/classify", files={"image": ("b.png", photo_png, "image/png")}))
        await wait_until(lambda: batcher_of().depth == 1)
        started = time.monotonic()
        result = await client.classify(photo_png)
        waited = time.monotonic() - started
        assert (await computing).status_code == 200 and (await queued).status_code == 200
    assert [status for status, _ in answers] == [503, 200]
    retry_after = float(answers[0][1])
    assert retry_after >= 1 and waited >= retry_after
    assert result.model == "tiny" and len(result.predictions) == 5


async def test_queue_full_without_retries_raises_with_retry_after(make_service, photo_png):
    service = make_service(max_queue=1, max_batch_size=1, max_wait_ms=0)
    async with async_client_for(service.app) as client:
        service.control.gate.clear()
        computing = asyncio.create_task(client.classify(photo_png))
        assert await asyncio.to_thread(service.control.entered.wait, 30)
        queued = asyncio.create_task(client.classify(photo_png))
        await wait_until(lambda: service.app.state.service.runtimes["tiny"].batcher.depth == 1)
        with pytest.raises(ServiceUnavailableError) as caught:
            await client.classify(photo_png)
        service.control.gate.set()
        await computing, await queued
    assert caught.value.status_code == 503 and caught.value.retry_after >= 1
    assert "queue" in caught.value.detail


def test_server_timeout_504_is_retried_then_raised_typed(make_service, photo_png):
    service = make_service(request_timeout_s=0.15)
    service.control.delay_s = 0.3
    attempts = []
    with TestClient(service.app, base_url=TEST_BASE_URL) as http:
        http.event_hooks["response"] = [lambda response: attempts.append(response.status_code)]
        client = Client(TEST_BASE_URL, http_client=http, max_retries=1, backoff=0.01)
        with pytest.raises(GatewayTimeoutError) as caught:
            client.defend(photo_png, method="slgs")
        service.control.delay_s = 0.0
    assert attempts == [504, 504]
    assert caught.value.status_code == 504 and "no answer within" in caught.value.detail


class FlakyTransport(httpx.BaseTransport):
    """Fails the first requests (a connection error, then a 503 with Retry-After), then delegates."""

    def __init__(self, inner: httpx.BaseTransport, failures: list) -> None:
        self.inner = inner
        self.failures = list(failures)
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        return self.inner.handle_request(request)


def test_sync_retries_connection_errors_and_503_then_succeeds(service, photo_png, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr("elgs_client._client.time.sleep", sleeps.append)
    with TestClient(service.app, base_url=TEST_BASE_URL) as app_client:
        flaky = FlakyTransport(app_client._transport, [
            httpx.ConnectError("connection refused"),
            httpx.Response(503, json={"detail": "queue full"}, headers={"Retry-After": "7"}),
            httpx.Response(504, json={"detail": "timeout"}),
        ])
        with httpx.Client(transport=flaky) as http:
            client = Client(TEST_BASE_URL, http_client=http, max_retries=3, backoff=0.5)
            result = client.defend(io.BytesIO(photo_png), method="lgs", lam=1.0)
    assert result.method == "lgs" and result.lam == 1.0
    assert len(flaky.requests) == 4
    # The upload is the same on every attempt (a file object is read once).
    assert all(photo_png in request.read() for request in flaky.requests)
    assert 0.5 <= sleeps[0] <= 0.625 and sleeps[1] == 7 and 2 <= sleeps[2] <= 2.5


def test_retries_give_up_with_the_last_error(photo_png, monkeypatch):
    monkeypatch.setattr("elgs_client._client.time.sleep", lambda seconds: None)
    refused = FlakyTransport(httpx.MockTransport(lambda r: httpx.Response(200)), [httpx.ConnectError("refused")] * 5)
    client = Client("http://127.0.0.1:9", http_client=httpx.Client(transport=refused), max_retries=2)
    with pytest.raises(APIConnectionError, match="refused") as caught:
        client.classify(photo_png)
    assert len(refused.requests) == 3 and not isinstance(caught.value, APITimeoutError)
    # A read timeout is not retried: the server may still be computing the first attempt.
    slow = FlakyTransport(httpx.MockTransport(lambda r: httpx.Response(200)), [httpx.ReadTimeout("slow")] * 5)
    client = Client("http://127.0.0.1:9", http_client=httpx.Client(transport=slow), max_retries=2)
    with pytest.raises(APITimeoutError):
        client.classify(photo_png)
    assert len(slow.requests) == 1
    # A 503 answered by the server after the last retry is raised typed, with its Retry-After.
    busy = FlakyTransport(httpx.MockTransport(lambda r: httpx.Response(200)),
                          [httpx.Response(503, json={"detail": "busy"}, headers={"Retry-After": "2"})] * 5)
    client = Client("http://127.0.0.1:9", http_client=httpx.Client(transport=busy), max_retries=1)
    with pytest.raises(ServiceUnavailableError) as caught:
        client.classify(photo_png)
    assert (caught.value.retry_after, caught.value.detail, len(busy.requests)) == (2.0, "busy", 2)


def test_unreachable_server_raises_connection_error(photo_png):
    from tests.client.servers import free_port_socket

    with free_port_socket() as sock:  # bound but never listening: connections are refused
        url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        with Client(url, max_retries=1, backoff=0.01, timeout=2.0) as client:
            with pytest.raises(APIConnectionError, match="127.0.0.1"):
                client.health()


def test_api_key_is_sent_and_checked(make_service, photo_png, monkeypatch):
    service = make_service(api_key="s3cret")
    with TestClient(service.app, base_url=TEST_BASE_URL) as http:
        seen = []
        http.event_hooks["request"] = [lambda request: seen.append(request.headers.get("authorization"))]
        monkeypatch.delenv("ELGS_API_KEY", raising=False)
        anonymous = Client(TEST_BASE_URL, http_client=http, max_retries=0)
        assert anonymous.health().ready  # health stays open
        with pytest.raises(AuthenticationError) as missing:
            anonymous.classify(photo_png)
        assert missing.value.status_code == 401 and "missing API key" in missing.value.detail
        with pytest.raises(AuthenticationError, match="wrong API key"):
            Client(TEST_BASE_URL, "nope", http_client=http, max_retries=0).models()
        assert Client(TEST_BASE_URL, "s3cret", http_client=http).classify(photo_png).model == "tiny"
        monkeypatch.setenv("ELGS_API_KEY", "s3cret")
        from_env = Client(TEST_BASE_URL, http_client=http)
        assert [m.name for m in from_env.models()] == ["tiny"]
    assert seen[-2:] == ["Bearer s3cret", "Bearer s3cret"] and seen[0] is None and seen[2] == "Bearer nope"
    assert "s3cret" not in repr(from_env)


async def test_async_api_key(make_service, photo_png):
    service = make_service(api_key="k")
    async with async_client_for(service.app) as anonymous:
        with pytest.raises(AuthenticationError):
            await anonymous.defenses()
        keyed = AsyncClient(TEST_BASE_URL, "k", http_client=anonymous._http)
        assert (await keyed.defend(photo_png, method="none")).method == "none"


def test_base_url_and_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELGS_URL", "http://elgs.example:9000/")
    monkeypatch.setenv("ELGS_API_KEY", "from-env")
    client = Client()
    assert client.base_url == "http://elgs.example:9000" and client.headers["Authorization"] == "Bearer from-env"
    explicit = AsyncClient("http://other:1", api_key="arg")
    assert explicit.base_url == "http://other:1" and explicit.api_key == "arg"
    monkeypatch.delenv("ELGS_URL")
    monkeypatch.delenv("ELGS_API_KEY")
    default = Client()
    assert default.base_url == "http://localhost:8000" and "Authorization" not in default.headers
    with pytest.raises(ValueError, match="max_retries"):
        Client(max_retries=-1)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_retry_after_is_capped(photo_png, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr("elgs_client._client.time.sleep", sleeps.append)
    answers = iter([httpx.Response(503, headers={"Retry-After": "3600"}, json={"detail": "busy"}),
                    httpx.Response(200, json={"model": "m", "weights": "random", "predictions": []})])
    client = Client("http://x", http_client=httpx.Client(transport=httpx.MockTransport(lambda r: next(answers))),
                    max_backoff=5)
    assert client.classify(photo_png).model == "m" and sleeps == [5]
