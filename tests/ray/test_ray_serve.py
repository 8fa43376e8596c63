"""The service on Ray Serve (issue 10) against the single-process app, on a local Ray instance.

One module, one Ray instance: an ingress replica and 2 replicas of the offline EfficientNet-Lite0, with
Ray CPU fractions that fit a 2-core machine. Skipped when the ``ray`` extra is not installed.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'elgs[ray]')")

import httpx  # noqa: E402
import ray  # noqa: E402
from PIL import Image  # noqa: E402
from ray import serve  # noqa: E402

from elgs.api import Settings  # noqa: E402
from elgs.api.ray import APP_NAME, RayOptions, build_application  # noqa: E402
from elgs.bench.service import wait_ready  # noqa: E402
from tests.api.helpers import LiveServer, photo_png  # noqa: E402

pytestmark = pytest.mark.slow

API_KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "efficientnet_lite0"
SERVICE_DIR = str(Path(__file__).resolve().parents[2] / "service")


def _settings() -> Settings:
    # Explicit values: the test must not depend on the caller's ELGS_* environment.
    return Settings(models=[MODEL], weights="pretrained", device="cpu", max_batch_size=4, max_wait_ms=5.0,
                    max_queue=256, request_timeout_s=60.0, max_upload_mb=20.0, max_pixels=40_000_000,
                    api_key=API_KEY, torch_threads=1, warmup=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_elgs_serve_ray_serves_and_stops_cleanly_on_ctrl_c():
    """``elgs serve --ray`` starts its own Ray instance, answers, and on SIGINT deletes everything and exits 0.

    First in the module, before the shared Ray instance starts.
    """
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SERVICE_DIR, os.environ.get("PYTHONPATH")])),
           "ELGS_TORCH_THREADS": "1", "ELGS_API_KEY": ""}
    command = [sys.executable, "-m", "elgs", "serve", "--ray", "--replicas", "1", "--num-cpus", "0.5",
               "--num-gpus", "0", "--models", MODEL, "--device", "cpu", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            wait_ready(f"http://127.0.0.1:{port}", process, timeout_s=150)
        except RuntimeError as error:
            pytest.fail(f"{error}\n{process.stdout.read() if process.poll() is not None else ''}")
        response = httpx.post(f"http://127.0.0.1:{port}/classify", timeout=60,
                              files={"image": ("a.png", photo_png("coffee", 96), "image/png")})
        assert response.status_code == 200, response.text
        assert response.headers["X-Elgs-Replica"].startswith(f"{socket.gethostname()}:")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output[-3000:]
    assert "elgs: shutting down" in output
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)


METRICS_PORT = _free_port()


@pytest.fixture(scope="module")
def ray_url():
    """A local Ray instance serving the app: 2 model replicas (0.5 CPU each) and one ingress (0.25 CPU)."""
    port = _free_port()
    pythonpath = os.pathsep.join(filter(None, [SERVICE_DIR, str(Path(SERVICE_DIR).parent),
                                               os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="elgs-test",
             _metrics_export_port=METRICS_PORT,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "ELGS_TORCH_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayOptions(replicas=2, model_num_cpus=0.5, ingress_num_cpus=0.25)
        serve.run(build_application(_settings(), options), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_url():
    """The same settings served by the single-process app (``elgs serve``)."""
    with LiveServer(_settings(), None) as server:
        yield server.url


def _mixed_requests(count: int) -> list[tuple[str, dict, bytes]]:
    """(path, query, image) for classify, defend slgs/lgs/wlgs/none and saliency on several photos."""
    photos = [photo_png(name, size=160) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    calls = [("/classify", {}), ("/defend/slgs", {}), ("/defend/lgs", {"lambda": 2.3}), ("/defend/wlgs", {}),
             ("/defend/none", {}), ("/saliency", {}), ("/defend/slgs", {"lambda": 3.5, "threshold": 0.15})]
    return [(*calls[i % len(calls)], photos[(i // len(calls)) % len(photos)]) for i in range(count)]


def _post(client: httpx.Client, path: str, params: dict, image: bytes, headers: dict | None = None) -> httpx.Response:
    return client.post(path, params=params, files={"image": ("photo.png", image, "image/png")},
                       headers=AUTH if headers is None else headers)


def _send_all(url: str, requests: list[tuple[str, dict, bytes]], workers: int) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda call: _post(client, *call), requests))


def _png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=np.int16)


def _assert_same_answer(ray_body: dict, local_body: dict, what: str) -> None:
    ignored = {"timing_ms", "batch_size"}
    assert set(ray_body) == set(local_body), what
    for key, local_value in local_body.items():
        if key in ignored:
            continue
        ray_value = ray_body[key]
        if key.endswith("predictions") and isinstance(local_value, list):
            assert [p["index"] for p in ray_value] == [p["index"] for p in local_value], f"{what}: {key}"
            assert [p["label"] for p in ray_value] == [p["label"] for p in local_value], f"{what}: {key}"
            np.testing.assert_allclose([p["score"] for p in ray_value], [p["score"] for p in local_value],
                                       rtol=1e-4, err_msg=f"{what}: {key}")
        elif key in ("image", "mask", "region") or (key == "saliency" and what.startswith("/saliency ")):
            # PNGs of float results: another batch composition may move a pixel by one level.
            a, b = _png(ray_value), _png(local_value)
            assert a.shape == b.shape, f"{what}: {key}"
            assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.01, f"{what}: {key}"
        else:  # attack scores, probabilities (also inside stages, removal_top1): another batch composition
            _assert_close(ray_value, local_value, f"{what}: {key}")


def _assert_close(ray_value, local_value, what: str) -> None:
    """Equal, floats to 1e-4 (relative or absolute), through dicts and lists."""
    if isinstance(local_value, dict):
        assert isinstance(ray_value, dict) and set(ray_value) == set(local_value), what
        for key in local_value:
            _assert_close(ray_value[key], local_value[key], f"{what}.{key}")
    elif isinstance(local_value, list):
        assert isinstance(ray_value, list) and len(ray_value) == len(local_value), what
        for index, (ray_item, local_item) in enumerate(zip(ray_value, local_value)):
            _assert_close(ray_item, local_item, f"{what}[{index}]")
    elif isinstance(local_value, float):
        np.testing.assert_allclose(ray_value, local_value, rtol=1e-4, atol=1e-4, err_msg=what)
    else:
        assert ray_value == local_value, what


def test_forty_concurrent_mixed_requests_match_the_single_process_app(ray_url, local_url):
    requests = _mixed_requests(40)
    ray_responses = _send_all(ray_url, requests, workers=40)
    local_responses = _send_all(local_url, requests, workers=8)
    for (path, params, _), ray_response, local_response in zip(requests, ray_responses, local_responses, strict=True):
        what = f"{path} {params}"
        assert local_response.status_code == 200, f"{what}: {local_response.text}"
        assert ray_response.status_code == 200, f"{what}: {ray_response.text}"
        _assert_same_answer(ray_response.json(), local_response.json(), what)
    replicas = {response.headers.get("X-Elgs-Replica") for response in ray_responses}
    assert None not in replicas
    assert len(replicas) >= 2, f"every answer came from {replicas}"


def test_image_response_carries_the_replica_and_the_same_png(ray_url, local_url):
    image = photo_png("coffee", size=160)
    with httpx.Client(timeout=60) as client:
        ray_response = _post(client, f"{ray_url}/defend/slgs", {"response": "mask"}, image)
        local_response = _post(client, f"{local_url}/defend/slgs", {"response": "mask"}, image)
    assert ray_response.status_code == local_response.status_code == 200
    assert ray_response.headers["content-type"] == "image/png"
    host, pid = ray_response.headers["X-Elgs-Replica"].rsplit(":", 1)
    assert host == socket.gethostname() and int(pid) != os.getpid()
    assert ray_response.headers["X-Elgs-Top1"] == local_response.headers["X-Elgs-Top1"]


def _bad_requests() -> list[tuple[str, str, dict, dict]]:
    """(name, path, request kwargs, headers) of requests that must fail the same way on both servers."""
    png = photo_png("chelsea", size=64)
    return [
        ("no key", "/classify", {"files": {"image": ("a.png", png, "image/png")}}, {}),
        ("wrong key", "/classify", {"files": {"image": ("a.png", png, "image/png")}},
         {"Authorization": "Bearer nope"}),
        ("not an image", "/classify", {"files": {"image": ("a.png", b"hello, not a picture", "image/png")}}, AUTH),
        ("truncated", "/classify", {"files": {"image": ("a.png", png[: len(png) // 2], "image/png")}}, AUTH),
        ("empty", "/saliency", {"files": {"image": ("a.png", b"", "image/png")}}, AUTH),
        ("missing field", "/classify", {"data": {"picture": "x"}}, AUTH),
        ("lambda out of range", "/defend/slgs?lambda=99", {"files": {"image": ("a.png", png, "image/png")}}, AUTH),
        ("unknown method", "/defend/blur", {"files": {"image": ("a.png", png, "image/png")}}, AUTH),
        ("unknown model", "/classify?model=vgg99", {"files": {"image": ("a.png", png, "image/png")}}, AUTH),
    ]


def test_bad_inputs_and_the_api_key_answer_the_same(ray_url, local_url):
    with httpx.Client(timeout=60) as client:
        for name, path, kwargs, headers in _bad_requests():
            ray_response = client.post(f"{ray_url}{path}", headers=headers, **kwargs)
            local_response = client.post(f"{local_url}{path}", headers=headers, **kwargs)
            assert 400 <= local_response.status_code < 500, name
            assert ray_response.status_code == local_response.status_code, f"{name}: {ray_response.text}"
            assert ray_response.json() == local_response.json(), name
            assert ray_response.headers.get("WWW-Authenticate") == local_response.headers.get("WWW-Authenticate")
        for path in ("/models", "/defenses"):
            assert client.get(f"{ray_url}{path}").status_code == 401
            ray_body, local_body = (client.get(f"{url}{path}", headers=AUTH).json() for url in (ray_url, local_url))
            assert ray_body == local_body, path
        # Open endpoints stay open; the page is the same file.
        for path in ("/health/live", "/"):
            ray_response, local_response = (client.get(f"{url}{path}") for url in (ray_url, local_url))
            assert ray_response.status_code == local_response.status_code == 200
            assert ray_response.content == local_response.content, path


def test_ready_and_metrics(ray_url):
    with httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + 60  # ready needs one replica; both may still be warming up
        while True:
            ready = client.get(f"{ray_url}/health/ready")
            if ready.headers.get("X-Elgs-Replicas") == f"{MODEL}=2/2" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "models": [MODEL]}
        assert ready.headers["X-Elgs-Replicas"] == f"{MODEL}=2/2"
        metrics = client.get(f"{ray_url}/metrics").text
        assert 'elgs_requests_total{endpoint="/defend/slgs",method="POST",status="200"}' in metrics
        # The batchers' metrics come from the model replicas through Ray's metrics agent (reported every few s).
        names = ("ray_elgs_batch_size_count", "ray_elgs_model_pass_seconds_count", "ray_elgs_queue_wait_seconds_count",
                 "ray_elgs_queue_depth", "ray_serve_num_http_requests_total", "ray_serve_deployment_queued_queries")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ray_metrics = client.get(f"http://127.0.0.1:{METRICS_PORT}/metrics").text
            if all(f"{name}{{" in ray_metrics for name in names):  # each metric is reported on its own schedule
                break
            time.sleep(1)
    for name in names:
        assert f"{name}{{" in ray_metrics, name
    assert 'deployment="model-efficientnet_lite0"' in ray_metrics


def _timed_post(client: httpx.Client, *call) -> tuple[httpx.Response, float]:
    response = _post(client, *call)
    return response, time.monotonic()


def test_killing_a_model_replica_under_load_loses_no_request(ray_url):
    """40 requests at once, one of the 2 model replicas SIGKILLed after the first answers: all 40 are answered
    200 (the ingress sends the dead replica's requests to the other one), readiness counts the replicas down
    and up (issue 18)."""
    requests = [("/classify", {}, photo_png(name, size=128)) if i % 2 else ("/defend/none", {}, photo_png(name, 128))
                for i, name in enumerate(["chelsea", "coffee", "astronaut", "rocket"] * 10)]
    with httpx.Client(base_url=ray_url, timeout=120, limits=httpx.Limits(max_connections=64)) as client, \
            ThreadPoolExecutor(40) as pool:
        seen = [_post(client, "/classify", {}, photo_png("chelsea", 128)) for _ in range(1)]
        futures = [pool.submit(_timed_post, client, *call) for call in requests]
        while sum(f.done() for f in futures) < 2:
            time.sleep(0.02)
        answered = [f.result()[0] for f in futures if f.done()]
        victim = int(answered[-1].headers["X-Elgs-Replica"].rsplit(":", 1)[1])
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        readiness = []
        while not all(f.done() for f in futures):
            ready = client.get("/health/ready")
            readiness.append((ready.status_code, ready.headers.get("X-Elgs-Replicas")))
            time.sleep(0.2)
        responses = [f.result()[0] for f in futures]
        last_answer_s = max(f.result()[1] for f in futures) - killed
        # Ray restarts the killed replica; readiness shows the count go back to 2.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = client.get("/health/ready")
            readiness.append((ready.status_code, ready.headers.get("X-Elgs-Replicas")))
            if readiness[-1] == (200, f"{MODEL}=2/2") and any(r[1] != f"{MODEL}=2/2" for r in readiness):
                break
            time.sleep(0.5)
        after = _send_all(ray_url, [("/classify", {}, photo_png("coffee", 128))] * 12, workers=12)
        retried = [line for line in client.get("/metrics").text.splitlines()
                   if line.startswith("elgs_replica_retries_total")]
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 40, [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert seen[0].status_code == 200
    print(f"\nkilled replica pid {victim}; last of 40 answered {last_answer_s:.1f} s after the kill; "
          f"readiness seen (status, replicas): {_runs(readiness)}; {retried}")
    assert any(replicas != f"{MODEL}=2/2" for _, replicas in readiness), "readiness never saw a replica missing"
    assert readiness[-1] == (200, f"{MODEL}=2/2"), readiness[-1]
    assert all(status == 200 for status, _ in readiness), "one replica kept running: ready must stay 200"
    # Whether the killed replica held requests at that instant depends on Ray's routing (5 were sent again in
    # one run, none in another); the retry itself is checked without Ray in test_ray_ingress.py.
    pids = {int(r.headers["X-Elgs-Replica"].rsplit(":", 1)[1]) for r in after if r.status_code == 200}
    assert victim not in pids


def _runs(items: list) -> list:
    """Consecutive duplicates collapsed: [(value, times), ...]."""
    runs: list = []
    for item in items:
        if runs and runs[-1][0] == item:
            runs[-1][1] += 1
        else:
            runs.append([item, 1])
    return [tuple(run) for run in runs]
