"""The service's one error hierarchy: statuses, Retry-After, and pickling without __init__ (Ray)."""

import pickle

import pytest

from elgs.api.ray_gate import NoReplicaError
from elgs.api.state import ModelNotLoadedError
from elgs.batcher import BatcherClosedError, DeadlineExceededError, QueueFullError
from elgs.engine import InvalidParameterError, UnknownMethodError
from elgs.errors import ServiceError


@pytest.mark.parametrize(("error", "status", "retry_after"), [
    (QueueFullError("m", 4, 7, reason="full"), 503, 7),
    (NoReplicaError("m", 0, 20, reason="no replica runs"), 503, 20),
    (BatcherClosedError("closing"), 503, 1),
    (DeadlineExceededError("late"), 504, None),
    (UnknownMethodError("unknown defence 'x'"), 404, None),
    (InvalidParameterError("lambda must be a number in [0, 10], got 11"), 422, None),
    (ModelNotLoadedError("model 'x' is not loaded"), 404, None),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value))
def test_each_error_says_its_status_and_pickles_whole(error, status, retry_after):
    assert isinstance(error, ServiceError) and (error.status, error.retry_after_s) == (status, retry_after)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and again.args == error.args and again.__dict__ == error.__dict__


def test_the_app_answers_each_with_its_status_and_retry_after():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from elgs.api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{kind}")
    async def raise_it(kind: str):
        raise {"full": QueueFullError("m", 4, 7, reason="queue full"), "late": DeadlineExceededError("too late"),
               "method": UnknownMethodError("unknown defence 'x'")}[kind]

    client = TestClient(app)
    full = client.get("/raise/full")
    assert (full.status_code, full.headers["Retry-After"], full.json()) == (503, "7", {"detail": "queue full; retry in 7 s"})
    late = client.get("/raise/late")
    assert late.status_code == 504 and "Retry-After" not in late.headers and late.json()["detail"] == "too late"
    method = client.get("/raise/method")
    assert (method.status_code, method.json()["detail"]) == (404, "unknown defence 'x'")
