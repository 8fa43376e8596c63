"""The ingress side of the Ray app without a Ray instance: the app of create_ray_app with stand-in
deployment handles (what a model replica would answer, or the errors Ray raises), so the 503/504
mapping, the retries, the headers and readiness are checked in milliseconds."""

from __future__ import annotations

import asyncio
import pickle
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'elgs[ray]')")

from fastapi.testclient import TestClient  # noqa: E402
from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

import elgs.api.ray as ray_app  # noqa: E402
from elgs.api.ray import (  # noqa: E402
    RayServiceState,
    RemoteBatcher,
    create_ray_app,
    error_outcome,
    raise_outcome_error,
)
from elgs.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError  # noqa: E402
from elgs.engine import InvalidParameterError, Prediction, Request, Result, UnknownMethodError  # noqa: E402
from tests.api.helpers import photo_png, tiny_settings  # noqa: E402

MODEL = "tiny"
INFO = {"describe": {"name": MODEL, "summary": "tiny test CNN", "input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                     "default_lambda": 3.5, "default_saliency": "gradient", "weights_source": "random (tests)",
                     "weights": "random", "device": "cpu"},
        "name": MODEL, "weights": "random", "input_size": 32, "device": "cpu", "max_batch_size": 4, "replica": "h:1"}


class Call:
    """What ``handle.method.remote(...)`` returns: awaitable once, cancellable."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        return self._get().__await__()

    async def _get(self) -> Any:
        if self.outcome == "never":
            await asyncio.sleep(3600)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Method:
    outcomes: list[Any]
    calls: list[tuple] = field(default_factory=list)
    made: list[Call] = field(default_factory=list)

    def remote(self, *args) -> Call:
        self.calls.append(args)
        call = Call(self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0])
        self.made.append(call)
        return call


class Handle:
    """A stand-in DeploymentHandle: ``submit`` answers the queued outcomes in turn (the last one repeats)."""

    def __init__(self, *outcomes: Any) -> None:
        self.info = Method([INFO])
        self.submit = Method(list(outcomes))


def answer(label: str = "class_3", replica: str = "host-a:123") -> dict:
    return {"answer": Result(predictions=[Prediction(3, label, 0.75)], batch_size=2), "replica": replica}


def _batcher(handle: Handle, retries: list | None = None) -> RemoteBatcher:
    return RemoteBatcher(handle, MODEL, max_batch_size=4, max_queue=7, request_timeout_s=5,
                         on_retry=None if retries is None else retries.append)


REQUEST = Request(image=None, task="classify")


async def test_a_dead_replica_is_retried_on_another_one():
    retries: list[str] = []
    handle = Handle(ActorDiedError(), ActorDiedError(), answer())
    result = await _batcher(handle, retries).submit(REQUEST)
    assert result.predictions[0].label == "class_3"
    assert len(handle.submit.calls) == 3 and retries == [MODEL, MODEL]


async def test_a_draining_replica_is_retried():
    handle = Handle(error_outcome(BatcherClosedError("model 'tiny' is shutting down")), answer())
    assert (await _batcher(handle).submit(REQUEST)).batch_size == 2


async def test_ray_backpressure_is_a_full_queue():
    with pytest.raises(QueueFullError, match="the queue of model 'tiny' is full") as error:
        await _batcher(Handle(BackPressureError(num_queued_requests=7, max_queued_requests=7))).submit(REQUEST)
    assert error.value.retry_after_s == 1


async def test_no_answer_by_the_deadline_cancels_the_call():
    handle = Handle("never")
    loop_time = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceededError, match="no answer from model 'tiny' within the deadline"):
        await _batcher(handle).submit(REQUEST, deadline=time.monotonic() + 0.2)
    assert asyncio.get_running_loop().time() - loop_time < 2
    assert [call.cancelled for call in handle.submit.made] == [True]
    # The replica got the time left, not the ingress's clock.
    assert 0 < handle.submit.calls[0][1] <= 0.2


async def test_a_client_leaving_cancels_the_call_in_the_replica():
    handle = Handle("never")
    task = asyncio.ensure_future(_batcher(handle).submit(REQUEST))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handle.submit.made[0].cancelled


@pytest.mark.parametrize("error", [
    QueueFullError("tiny", 8, 3), DeadlineExceededError("the deadline passed while queued"),
    BatcherClosedError("model 'tiny' is shutting down"), UnknownMethodError("unknown defence 'blur'"),
    InvalidParameterError("lambda must be a number in [0, 10], got 11.0"),
], ids=lambda error: type(error).__name__)
def test_replica_errors_cross_as_values_and_come_back_the_same(error):
    """A service error crosses Ray whole (elgs.errors.ServiceError pickles without calling __init__ again)."""
    crossed = pickle.loads(pickle.dumps(error_outcome(error)))
    with pytest.raises(type(error)) as raised:
        raise_outcome_error(crossed)
    assert str(raised.value) == str(error) and raised.value.__dict__ == error.__dict__
    assert (raised.value.status, raised.value.retry_after_s) == (error.status, error.retry_after_s)
    if isinstance(error, QueueFullError):
        assert raised.value.retry_after_s == 3 and raised.value.model == "tiny"


def test_other_replica_errors_are_internal():
    with pytest.raises(RuntimeError, match="the model replica failed: ZeroDivisionError: boom"):
        raise_outcome_error(error_outcome(ZeroDivisionError("boom")))


def _status(running: int, starting: int = 0) -> SimpleNamespace:
    states = {"RUNNING": running, "STARTING": starting}
    deployment = SimpleNamespace(replica_states={k: v for k, v in states.items() if v})
    return SimpleNamespace(applications={"elgs": SimpleNamespace(deployments={f"model-{MODEL}": deployment})})


@pytest.fixture
def ray_status(monkeypatch):
    """serve.status() as the ingress polls it; set ``.value`` to change what Ray reports."""
    holder = SimpleNamespace(value=_status(2))
    monkeypatch.setattr(ray_app.serve, "status", lambda: holder.value)
    monkeypatch.setattr(ray_app, "STATUS_POLL_S", 0.01)
    return holder


def _client(handle: Handle, **settings) -> TestClient:
    return TestClient(create_ray_app(tiny_settings(**settings), {MODEL: handle}, app_name="elgs"))


def _classify(client: TestClient, **headers):
    return client.post("/classify", files={"image": ("a.png", photo_png(size=48), "image/png")}, headers=headers)


def test_the_app_answers_through_the_handle_with_the_replica_header(ray_status):
    handle = Handle(answer(replica="node-7:4242"))
    with _client(handle) as client:
        response = _classify(client)
        assert response.status_code == 200, response.text
        assert response.headers["X-Elgs-Replica"] == "node-7:4242"
        assert response.json()["predictions"] == [{"index": 3, "label": "class_3", "score": 0.75}]
        assert client.get("/models").json()["models"][0]["max_batch_size"] == 4
        assert "X-Elgs-Replica" not in client.get("/health/live").headers
    request, timeout_s, finish = handle.submit.calls[0]
    assert request.image.shape == (32, 32, 3) and request.image.dtype.name == "uint8"  # decoded in the ingress
    assert request.task == "classify" and 0 < timeout_s <= 30 and finish is not None


def test_backpressure_and_deadlines_answer_503_and_504(ray_status):
    with _client(Handle(BackPressureError(num_queued_requests=256, max_queued_requests=256))) as client:
        response = _classify(client)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "X-Elgs-Replica" not in response.headers
    with _client(Handle(error_outcome(DeadlineExceededError("the deadline passed while queued for model 'tiny'")))
                 ) as client:
        response = _classify(client)
        assert response.status_code == 504
        assert response.json() == {"detail": "the deadline passed while queued for model 'tiny'"}


def test_the_api_key_is_checked_before_the_handle_is_called(ray_status):
    handle = Handle(answer())
    with _client(handle, api_key="k") as client:
        assert _classify(client).status_code == 401
        assert _classify(client, Authorization="Bearer k").status_code == 200
    assert len(handle.submit.calls) == 1


def test_ready_follows_the_running_replicas(ray_status):
    with _client(Handle(answer())) as client:
        def ready():
            for _ in range(200):
                response = client.get("/health/ready")
                if response.headers["X-Elgs-Replicas"] == expected:
                    return response
                time.sleep(0.01)
            raise AssertionError(f"readiness never showed {expected}: {response.headers}")

        expected = f"{MODEL}=2/2"
        assert ready().status_code == 200
        ray_status.value = _status(running=1, starting=1)
        expected = f"{MODEL}=1/2"
        assert ready().status_code == 200
        ray_status.value = _status(running=0, starting=2)
        expected = f"{MODEL}=0/2"
        response = ready()
        assert response.status_code == 503 and response.json() == {"detail": f"not ready: warming up {MODEL}"}
        ray_status.value = _status(running=2)
        expected = f"{MODEL}=2/2"
        assert ready().status_code == 200


def test_state_update_ignores_other_deployments():
    state = RayServiceState(settings=tiny_settings(), metrics=None)  # type: ignore[arg-type]
    state.runtimes[MODEL] = ray_app.RemoteRuntime(model=None, batcher=None)  # type: ignore[arg-type]
    state.update({"ingress": SimpleNamespace(replica_states={"RUNNING": 0})})
    assert state.ready and state.replicas_header() == f"{MODEL}=1/1"


# Issue 18: admission at the ingress, replica loss, cancelled calls --------------------------------

class CancelRaises(Call):
    """A call that, like a Ray ``DeploymentResponse``, ends in its own error when cancelled while awaited."""

    async def _get(self) -> Any:
        try:
            return await super()._get()
        except asyncio.CancelledError:
            raise RuntimeError("request cancelled") from None


class CancelRaisesMethod(Method):
    def remote(self, *args) -> Call:
        self.calls.append(args)
        call = CancelRaises(self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0])
        self.made.append(call)
        return call


async def test_a_cancelled_call_leaves_no_unretrieved_task_exception():
    import gc

    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    handle = Handle()
    handle.submit = CancelRaisesMethod(["never"])
    try:
        with pytest.raises(DeadlineExceededError):
            await _batcher(handle).submit(REQUEST, deadline=time.monotonic() + 0.3)
        await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert handle.submit.made[0].cancelled
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported


async def test_at_most_the_replicas_capacity_goes_to_ray_and_late_ones_are_refused_at_once():
    handle = Handle("never")
    batcher = _batcher(handle)  # one replica taking 2 x 4 requests, 0.1 s a request at first
    deadline = time.monotonic() + 1.45
    tasks = [asyncio.ensure_future(batcher.submit(REQUEST, deadline=deadline)) for _ in range(30)]
    await asyncio.sleep(0.05)
    assert len(handle.submit.calls) == 8  # the rest wait at the ingress, not in Ray's queue
    refused = [t for t in tasks if t.done()]
    # 0.1 s a request, 0.8 x 1.45 s: 11 admitted (8 at Ray, 3 waiting), 19 refused before anything was sent.
    assert len(refused) == 19 and all("after this request's deadline" in str(t.exception()) for t in refused)
    assert all(t.exception().retry_after_s >= 1 for t in refused)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert batcher.gate.ahead == 0


async def test_losing_the_only_replica_answers_503_at_once_with_the_time_a_replacement_takes():
    handle = Handle(ActorDiedError(), "never")
    lost: list[bool] = []
    batcher = _batcher(handle)
    batcher.on_replica_lost = lambda: lost.append(True)
    started = time.monotonic()
    task = asyncio.ensure_future(batcher.submit(REQUEST))
    while len(handle.submit.calls) < 2:  # died, sent again: Ray's router waits for a replica
        await asyncio.sleep(0.005)
    assert lost == [True] and not task.done()
    batcher.gate.set_replicas(0)  # what the ingress's status poll then reports
    with pytest.raises(QueueFullError, match="no replica of model 'tiny' is running") as refused:
        await task
    assert time.monotonic() - started < 1 and refused.value.retry_after_s >= 1
    assert handle.submit.made[1].cancelled
    with pytest.raises(QueueFullError, match="no replica"):
        batcher.reserve()


def test_the_app_answers_503_with_retry_after_while_no_replica_runs(ray_status):
    with _client(Handle(answer())) as client:
        ray_status.value = _status(running=0, starting=1)
        for _ in range(200):
            if client.get("/health/ready").status_code == 503:
                break
            time.sleep(0.01)
        response = _classify(client)
        assert response.status_code == 503, response.text
        assert "no replica of model 'tiny' is running" in response.json()["detail"]
        assert int(response.headers["Retry-After"]) >= 1
