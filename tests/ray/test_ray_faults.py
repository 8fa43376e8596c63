"""Ray Serve under load and faults (issue 18), one model replica on a local Ray instance.

A flood gets 200s and fast 503s (never a 504 after the whole deadline); killing the only model replica
costs no request more than a few seconds: a 503 with ``Retry-After`` while none runs, and readiness says
so. A short deadline (10 s) keeps the module under two minutes. Killing one of two replicas is in
test_ray_serve.py.
"""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import socket
import statistics
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'elgs[ray]')")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from elgs.api import Settings  # noqa: E402
from elgs.api.ray import APP_NAME, RayOptions, build_application  # noqa: E402
from tests.api.helpers import photo_png  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "efficientnet_lite0"
TIMEOUT_S = 10.0
SERVICE_DIR = str(Path(__file__).resolve().parents[2] / "service")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url():
    """One model replica (0.5 CPU) and one ingress (0.25 CPU); a 10 s deadline."""
    port = _free_port()
    pythonpath = os.pathsep.join(filter(None, [SERVICE_DIR, str(Path(SERVICE_DIR).parent),
                                               os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="elgs-faults",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "ELGS_TORCH_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(models=[MODEL], weights="pretrained", device="cpu", max_batch_size=4, max_wait_ms=5.0,
                            max_queue=256, request_timeout_s=TIMEOUT_S, api_key=None, torch_threads=1, warmup=True)
        options = RayOptions(replicas=1, model_num_cpus=0.5, ingress_num_cpus=0.25)
        serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


async def _at_once(url: str, count: int, method: str, path: str, **kwargs) -> list[tuple[httpx.Response, float]]:
    """``count`` requests sent together; (response, seconds it took) each."""
    async with httpx.AsyncClient(base_url=url, timeout=4 * TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=count)) as client:
        async def one() -> tuple[httpx.Response, float]:
            started = time.monotonic()
            response = await client.request(method, path, **kwargs)
            return response, time.monotonic() - started

        return await asyncio.gather(*[one() for _ in range(count)])


def test_a_flood_gets_answers_and_fast_refusals_never_a_timeout(ray_url):
    """200 at once: 200s and 503s only; a 503 costs about what the proxy's round trip costs, not the deadline."""
    probes = asyncio.run(_at_once(ray_url, 200, "GET", "/health/live"))
    files = {"image": ("cat.png", photo_png("chelsea", 64), "image/png")}
    flood = asyncio.run(_at_once(ray_url, 200, "POST", "/defend/slgs", params={"saliency": "gradient"}, files=files))
    statuses = [response.status_code for response, _ in flood]
    refused = [(response, seconds) for response, seconds in flood if response.status_code == 503]
    probe_median = statistics.median(seconds for _, seconds in probes)
    refused_median = statistics.median(seconds for _, seconds in refused) if refused else 0.0
    answered = [seconds for response, seconds in flood if response.status_code == 200]
    print(f"\nflood of 200: {statuses.count(200)} x 200 (slowest {max(answered, default=0):.1f} s), "
          f"{len(refused)} x 503 (median {refused_median:.2f} s); 200 probes at once: median {probe_median:.2f} s")
    assert set(statuses) <= {200, 503}, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(200) >= 1
    for response, _ in refused:
        assert int(response.headers["Retry-After"]) >= 1 and response.json()["detail"]
    # Before issue 18 none was refused: 98 of 200 waited in Ray's queue for the whole deadline (504). A refusal
    # costs about the round trip through Ray's proxy (the probes, sent alone; the refusals share the machine
    # with the decoding and the model): on a 2-core machine shared with other work, 2.6 s and 3.6 s median.
    assert refused_median <= min(2 * probe_median + 1.0, TIMEOUT_S / 2)
    assert max(answered) < TIMEOUT_S + 1


def test_killing_the_only_replica_costs_a_request_seconds_not_its_deadline(ray_url):
    """40 requests, the replica SIGKILLed after the first answer: each request ends within a few seconds of
    the kill (answered, or 503 with Retry-After), readiness turns 503, and new requests get a fast 503."""
    files = {"image": ("cat.png", photo_png("coffee", 64), "image/png")}

    async def scenario():
        async with httpx.AsyncClient(base_url=ray_url, timeout=4 * TIMEOUT_S) as client:
            first = await client.post("/classify", files=files)
            victim = int(first.headers["X-Elgs-Replica"].rsplit(":", 1)[1])
            tasks = [asyncio.ensure_future(client.post("/classify", files=files)) for _ in range(40)]
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            ended = []
            for task in asyncio.as_completed(tasks):
                ended.append((await task, time.monotonic() - killed))
            while (ready := await client.get("/health/ready")).status_code == 200:
                assert time.monotonic() - killed < 10, "readiness never reported the lost replica"
                await asyncio.sleep(0.1)
            not_ready_after = time.monotonic() - killed
            started = time.monotonic()
            during = await client.post("/classify", files=files)
            return ended, ready, not_ready_after, during, time.monotonic() - started

    ended, ready, not_ready_after, during, during_s = asyncio.run(scenario())
    statuses = [response.status_code for response, _ in ended]
    print(f"\nkill: {statuses.count(200)} x 200, {statuses.count(503)} x 503, last ended "
          f"{max(s for _, s in ended):.1f} s after the kill; readiness 503 {not_ready_after:.1f} s after; "
          f"a request then: {during.status_code} in {during_s:.2f} s, Retry-After {during.headers.get('Retry-After')}")
    assert set(statuses) <= {200, 503}, {s: statuses.count(s) for s in set(statuses)}
    assert max(seconds for _, seconds in ended) < 5
    for response, _ in ended:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
    assert ready.status_code == 503 and ready.headers["X-Elgs-Replicas"] == f"{MODEL}=0/1"
    assert during.status_code == 503 and during_s < 2
    assert "no replica of model" in during.json()["detail"] and int(during.headers["Retry-After"]) >= 5


def test_no_task_exception_was_left_unretrieved(ray_url):
    """The ingress cancels the calls of late and abandoned requests; none may log an unretrieved exception."""
    logs = ray._private.worker._global_node.get_logs_dir_path()
    for path in glob.glob(os.path.join(logs, "*")):
        if os.path.isfile(path):
            with open(path, errors="replace") as log:
                assert "exception was never retrieved" not in log.read(), path
