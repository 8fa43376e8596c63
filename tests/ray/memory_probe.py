"""The Ray ingress's memory under 1,000 mixed requests (issue 18), as a script: too slow for CI (4-5 min on 2 cores).

    PYTHONPATH=service:. python -m tests.ray.memory_probe [requests]

Starts a local Ray instance (one EfficientNet-Lite0 replica, one ingress), sends mixed requests 8 at a time
(classify, defend none/lgs/slgs with the gradient estimator, an unknown defence, an unknown model, a bad
lambda) on photos of 96-320 px, and prints the ingress replica's RSS after every 100, then floods 200 at once
twice and prints it again. Issue 18's bar: after 1,000 requests within 100 MB of after the first 100.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import httpx
import ray
from ray import serve

import psutil  # noqa: I001  after ray: Ray's own copy (ray puts its thirdparty_files on sys.path)

from elgs.api import Settings
from elgs.api.ray import APP_NAME, RayOptions, build_application
from tests.api.helpers import photo_png

MODEL = "efficientnet_lite0"
CALLS = [("/classify", {}), ("/defend/none", {}), ("/defend/slgs", {"saliency": "gradient"}), ("/classify", {}),
         ("/defend/lgs", {}), ("/defend/nope", {}), ("/classify", {"model": "x"}), ("/defend/lgs", {"lambda": 99})]


def _ingress_rss_mb() -> float:
    for process in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:{APP_NAME}:ingress" in part for part in process.info["cmdline"] or []):
            return process.memory_info().rss / 2**20
    raise RuntimeError("no ingress replica process")


async def _send(url: str, indices: range, photos: list[bytes], at_once: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=at_once)) as client:
        slots = asyncio.Semaphore(at_once)

        async def one(i: int) -> None:
            path, params = CALLS[i % len(CALLS)] if at_once < 200 else CALLS[2]
            async with slots:
                response = await client.post(path, params=params, files={"image": ("a.png", photos[i % len(photos)],
                                                                                   "image/png")})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*[one(i) for i in indices])
    return statuses


def main(total: int = 1000) -> None:
    service = Path(__file__).resolve().parents[2] / "service"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{service}{os.pathsep}{service.parent}",
                                       "ELGS_TORCH_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(models=[MODEL], weights="pretrained", device="cpu", max_batch_size=4,
                            request_timeout_s=30, torch_threads=1, api_key=None)
        serve.run(build_application(settings, RayOptions(replicas=1, model_num_cpus=0.5, ingress_num_cpus=0.25)),
                  name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        photos = [photo_png(name, size) for name in ("chelsea", "coffee", "astronaut") for size in (96, 160, 320)]
        print(f"ingress RSS at start: {_ingress_rss_mb():.1f} MB", flush=True)
        for start in range(0, total, 100):
            statuses = asyncio.run(_send(url, range(start, start + 100), photos, 8))
            print(f"after {start + 100} requests: {_ingress_rss_mb():.1f} MB {statuses}", flush=True)
        for _ in range(2):
            statuses = asyncio.run(_send(url, range(200), photos, 200))
            print(f"after a flood of 200 /defend/slgs: {_ingress_rss_mb():.1f} MB {statuses}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
