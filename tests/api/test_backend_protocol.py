"""One suite, two backends (issue 16): the local app and the Ray ingress answer the same HTTP contract.

``local`` is ``create_app`` with the tiny model in this process. ``ray`` is the Ray ingress app
(:func:`elgs.api.ray.create_ray_app`: RayServiceState, RemoteRuntime, RemoteBatcher and its admission gate) in
front of a real :class:`~elgs.api.ray.ModelReplica` of the same model, reached through a stand-in deployment
handle in this process instead of a Ray instance (tests/ray/test_ray_serve.py runs the real one, slow).
Both implement :class:`elgs.api.state.ServiceBackend`.
"""

from __future__ import annotations

import base64
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from elgs.api import create_app
from elgs.api.metrics import ServiceMetrics
from elgs.api.state import BatcherBackend, ModelBackend, RuntimeBackend, ServiceBackend, ServiceState
from tests.api.helpers import photo_png, tiny_settings
from tests.conftest import make_tiny_model


class _Response:
    """What ``handle.method.remote(...)`` returns: awaitable once, cancellable (the awaiting task is cancelled)."""

    def __init__(self, handle: InProcessHandle, method: str, args: tuple) -> None:
        self.handle, self.method, self.args = handle, method, args

    def __await__(self):
        return self._call().__await__()

    async def _call(self) -> Any:
        replica = await self.handle.replica_started()
        result = getattr(replica, self.method)(*self.args)
        return await result if inspect.isawaitable(result) else result

    def cancel(self) -> None:
        pass


class InProcessHandle:
    """A ``DeploymentHandle`` stand-in calling a ModelReplica in this process and event loop."""

    def __init__(self, settings, model) -> None:
        self.settings, self.model = settings, model
        self.replica = None
        self.info = SimpleNamespace(remote=lambda *args: _Response(self, "info", args))
        self.submit = SimpleNamespace(remote=lambda *args: _Response(self, "submit", args))

    async def replica_started(self):
        from elgs.api.ray import ModelReplica

        class InProcessReplica(ModelReplica):
            def __del__(self) -> None:  # Ray awaits ModelReplica's async __del__; here the fixture closes it
                pass

        if self.replica is None:
            service = ServiceState.build(self.settings, [self.model], ServiceMetrics())
            self.replica = await InProcessReplica.around(service, self.model.name)
        return self.replica


def _ray_status(model: str):
    deployment = SimpleNamespace(replica_states={"RUNNING": 1})
    return SimpleNamespace(applications={"elgs": SimpleNamespace(deployments={f"model-{model}": deployment})})


@pytest.fixture(scope="module", params=["local", "ray"])
def backend(request):
    """(name, TestClient) of each backend, serving the same tiny model with the same settings."""
    settings = tiny_settings(warmup=False)
    if request.param == "local":
        with TestClient(create_app(settings, models=[make_tiny_model()])) as client:
            yield request.param, client
        return
    pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'elgs[ray]')")
    import elgs.api.ray as ray_app

    patch = pytest.MonkeyPatch()
    patch.setattr(ray_app.serve, "status", lambda: _ray_status("tiny"))  # no Ray instance to ask
    handle = InProcessHandle(settings, make_tiny_model())
    try:
        with TestClient(ray_app.create_ray_app(settings, {"tiny": handle}, app_name="elgs")) as client:
            yield request.param, client
            client.portal.call(handle.replica.service.close)
    finally:
        patch.undo()


def _post(client: TestClient, path: str, image: bytes | None = None, **params) -> Any:
    image = photo_png(size=48) if image is None else image
    return client.post(path, params=params, files={"image": ("a.png", image, "image/png")})


def test_the_service_implements_the_backend_protocol(backend):
    name, client = backend
    service = client.app.state.service
    runtime = service.runtime(None)
    assert isinstance(service, ServiceBackend) and isinstance(runtime, RuntimeBackend)
    assert isinstance(runtime.model, ModelBackend) and isinstance(runtime.batcher, BatcherBackend)
    assert service.default_model == "tiny" and service.ready
    assert type(service).__name__ == {"local": "ServiceState", "ray": "RayServiceState"}[name]


def test_classify_defend_and_saliency_answer(backend):
    name, client = backend
    classify = _post(client, "/classify")
    assert classify.status_code == 200, classify.text
    assert classify.json()["model"] == "tiny" and len(classify.json()["predictions"]) == 5
    assert ("X-Elgs-Replica" in classify.headers) == (name == "ray")
    defend = _post(client, "/defend/slgs", **{"lambda": 2.5})
    assert defend.status_code == 200, defend.text
    body = defend.json()
    assert body["method"] == "slgs" and body["lambda"] == 2.5 and 0 <= body["attack_score"] <= 2
    assert base64.b64decode(body["image"]).startswith(b"\x89PNG")
    png = _post(client, "/defend/lgs", response="mask")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    saliency = _post(client, "/saliency")
    assert saliency.status_code == 200 and base64.b64decode(saliency.json()["region"]).startswith(b"\x89PNG")


@pytest.mark.parametrize(("path", "params", "image", "status", "detail"), [
    ("/defend/" + "b" * 300, {}, None, 404, "'" + "b" * 40 + "...' (300 characters)"),
    ("/classify", {"model": "vgg99"}, None, 404, "model 'vgg99' is not loaded on this server; loaded: tiny"),
    ("/defend/lgs", {"lambda": 99}, None, 422, "query parameter 'lambda'"),
    ("/defend/slgs", {"saliency": "gradient:rectify=true,rectify=false"}, None, 422, "'rectify' is given twice"),
    ("/classify", {}, b"", 400, "the uploaded file 'image' is empty"),
    ("/classify", {}, b"hello, not a picture", 415, "not in an image format this server reads"),
    ("/classify", {}, photo_png(size=48)[:100], 400, "the image could not be decoded: the file ends early"),
], ids=["long-method", "unknown-model", "lambda", "duplicate-parameter", "empty", "not-an-image", "truncated"])
def test_bad_requests_get_the_same_status_and_words(backend, path, params, image, status, detail):
    _, client = backend
    response = _post(client, path, image, **params)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]


def test_catalogue_and_health(backend):
    _, client = backend
    assert [m["name"] for m in client.get("/models").json()["models"]] == ["tiny"]
    assert "slgs" in {d["name"] for d in client.get("/defenses").json()["defenses"]}
    assert client.get("/health/ready").json() == {"status": "ready", "models": ["tiny"]}
