"""Service load benchmark (design.md, section 8): HTTP throughput and latency against the hardware's floor.

An asyncio load generator keeps ``concurrency`` requests in flight against ``POST /defend/{method}``
for a fixed time per level and records each request's latency. By default it starts the servers
itself on 127.0.0.1 (``elgs serve`` in a subprocess), once with the server's own batching
(``max_batch_size`` default) and once with ``ELGS_MAX_BATCH_SIZE=1``.

The ceiling is the hardware's, not our code's: the **floor** is a plain script doing the request's
work (DESIGN 8): decode the uploaded PNGs (Pillow), forward + input-gradient backward over the
estimator's rows for the methods that need a saliency map (a plain forward for the others), a forward
of pass 2's rows (the defended image, and for the gradient defences the removal view), PNG encoding of
the two result images (Pillow); no defence, no engine. It runs at the server's batch size and at batch
1, in the main thread of a fresh process with torch's default threading, before and after the HTTP
levels (:func:`model_floor`). The table gives every level's req/s over its server's floor, and latency at
concurrency 1 against the batch-1 floor. The engine alone (:func:`engine_throughput`, with the
defences) is an optional second line (``--engine``).

What "the same images" means here: scikit-image photographs resized to the model's input size and
uploaded as PNG; the floor decodes the same PNG bytes, the engine line runs on them already decoded,
so HTTP/floor is the price of the service layer (upload, queueing, defences, base64, JSON) and of
sharing the CPUs with the load generator.

Run ``python benchmarks/load.py`` or ``elgs bench service`` (same options, :mod:`elgs.cli.bench`); needs
the ``bench`` extra (httpx, matplotlib): ``pip install 'elgs[bench]'``.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from elgs.bench import CONCURRENCY_LEVELS

if TYPE_CHECKING:
    from elgs.models import LoadedModel

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "cat")
RATIO_CONCURRENCY = 8


@dataclass
class LevelResult:
    """One concurrency level against one server: requests that succeeded, per-second and latency figures."""

    mode: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch_size: float
    error_statuses: dict[str, int] = field(default_factory=dict)
    floor_ratio: float | None = None  # throughput / the floor at this server's batch size
    server_cpu_ms: float | None = None  # the server process's CPU time per answered request (Linux)
    client_cpu_ms: float | None = None  # the load generator's CPU time per answered request


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation; NaN when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def sample_uploads(size: int, count: int = len(PHOTOS)) -> list[bytes]:
    """``count`` scikit-image photographs resized to ``size x size`` and encoded as PNG."""
    from PIL import Image

    from elgs.images import sample_photo

    uploads = []
    for index in range(count):
        photo = sample_photo(PHOTOS[index % len(PHOTOS)]).resize((size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        uploads.append(buffer.getvalue())
    return uploads


async def run_level(url: str, uploads: Sequence[bytes], *, concurrency: int, duration_s: float,
                    method: str = "slgs", mode: str = "http", api_key: str | None = None,
                    model: str | None = None, warmup_requests: int | None = None,
                    server_pid: int | None = None, saliency: str | None = None) -> LevelResult:
    """Keep ``concurrency`` requests in flight for ``duration_s`` seconds and summarise them.

    Each worker first sends ``warmup_requests`` (default one) unrecorded requests, so connection
    set-up is not measured; then all workers start the measured window together. With
    ``server_pid`` (a local server), the server's CPU time per request is recorded too: a figure a
    busy machine blurs far less than wall-clock throughput.
    """
    if concurrency < 1 or duration_s <= 0 or not uploads:
        raise ValueError(f"need concurrency >= 1, duration_s > 0 and uploads, got {concurrency}, {duration_s}, "
                         f"{len(uploads)} uploads")
    headers = _auth_headers(api_key)
    params = {"model": model} if model else {}
    if saliency:
        params["saliency"] = saliency
    endpoint = f"{url.rstrip('/')}/defend/{method}"
    latencies: list[float] = []
    batch_sizes: list[int] = []
    error_statuses: dict[str, int] = {}
    warmup_requests = 1 if warmup_requests is None else warmup_requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0), headers=headers) as client:
        async def send(index: int) -> tuple[float, httpx.Response | None, str | None]:
            upload = uploads[index % len(uploads)]
            started = time.perf_counter()
            try:
                response = await client.post(endpoint, params=params,
                                             files={"image": (f"{index}.png", upload, "image/png")})
            except httpx.HTTPError as error:
                return time.perf_counter() - started, None, type(error).__name__
            return time.perf_counter() - started, response, None

        for round_index in range(warmup_requests):
            await asyncio.gather(*(send(round_index * concurrency + w) for w in range(concurrency)))

        async def worker(worker_index: int, deadline: float) -> None:
            sent = 0
            while time.perf_counter() < deadline:
                latency, response, error = await send(worker_index + sent * concurrency)
                sent += 1
                if response is not None and response.status_code == 200:
                    latencies.append(latency)
                    batch_sizes.append(int(response.json().get("batch_size") or 1))
                else:
                    key = error or str(response.status_code)
                    error_statuses[key] = error_statuses.get(key, 0) + 1

        server_cpu, client_cpu = process_cpu_seconds(server_pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(w, started + duration_s) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
        server_end = process_cpu_seconds(server_pid)
        server_cpu = server_end - server_cpu if server_cpu is not None and server_end is not None else None

    milliseconds = [latency * 1000 for latency in latencies]
    return LevelResult(
        mode=mode, concurrency=concurrency, requests=len(latencies), errors=sum(error_statuses.values()),
        duration_s=elapsed, throughput=len(latencies) / elapsed,
        p50_ms=percentile(milliseconds, 50), p95_ms=percentile(milliseconds, 95), p99_ms=percentile(milliseconds, 99),
        mean_batch_size=sum(batch_sizes) / len(batch_sizes) if batch_sizes else math.nan,
        error_statuses=error_statuses,
        server_cpu_ms=server_cpu / len(latencies) * 1000 if server_cpu is not None and latencies else None,
        client_cpu_ms=client_cpu / len(latencies) * 1000 if latencies else None,
    )


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``); None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_throughput(model: str | LoadedModel, uploads: Sequence[bytes], *, batch_size: int, duration_s: float,
                      method: str = "slgs", weights: str = "pretrained", device: str | None = None,
                      input_size: int | None = None) -> dict:
    """Images per second of :class:`~elgs.engine.Engine` alone on ``uploads``, in batches of ``batch_size``.

    ``model`` is a zoo name (loaded with ``weights``, ``device``, ``input_size``) or a loaded model.
    Images are decoded and converted once, outside the timing; two warm-up batches are not timed (the
    first batch of a new shape builds the CPU kernels' caches).
    """
    import torch

    from elgs.engine import Engine, Request
    from elgs.images import image_to_tensor, open_image
    from elgs.models import load_model

    if isinstance(model, str):
        model = load_model(model, weights=weights, device=device, input_size=input_size)
    engine = Engine(model)
    images = [image_to_tensor(open_image(upload), model.input_size) for upload in uploads]
    requests = [Request(image=images[i % len(images)], task="defend", method=method) for i in range(batch_size)]
    engine.run(requests), engine.run(requests)
    processed, batches = 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < duration_s:
        engine.run(requests)
        processed += batch_size
        batches += 1
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    elapsed = time.perf_counter() - started
    return {"batch_size": batch_size, "images": processed, "duration_s": elapsed, "throughput": processed / elapsed,
            "batch_ms": elapsed / batches * 1000, "device": str(model.device), "weights": model.weights,
            "threads": torch.get_num_threads()}


def model_floor(model: str | LoadedModel, uploads: Sequence[bytes], *, batch_sizes: Sequence[int],
                duration_s: float, method: str = "slgs", weights: str = "pretrained", device: str | None = None,
                input_size: int | None = None, saliency: str | None = None) -> list[dict]:
    """Images per second of a plain script doing a request's work at each of ``batch_sizes``: the floor.

    Per batch: decode the batch's PNG uploads (Pillow), forward + input-gradient backward when ``method``
    needs a saliency map, else a plain forward (pass 1), a forward of pass 2's rows (each image, and again
    as the removal view for the gradient defences: those with a block threshold), and PNG encoding of two
    images per request (the defended image and the mask, Pillow at zlib level 1 as the service); no
    defence, no engine. The gradient pass carries as many copies of each image as the saliency estimator
    (``saliency``, default the model's own: SmoothGrad with n copies runs n rows per image in pass 1).
    Call it in the main thread of a fresh process (:func:`model_floor_in_subprocess`) for the hardware's
    figure. Two warm-up batches per size are not timed.
    """
    import torch

    from elgs.defenses import get_defense, parse_saliency, saliency_from_loss, topk_loss
    from elgs.models import load_model

    if isinstance(model, str):
        model = load_model(model, weights=weights, device=device, input_size=input_size)
    import numpy as np
    from PIL import Image

    defense = get_defense(method)
    needs_saliency = defense.needs_saliency
    copies = parse_saliency(saliency or model.spec.default_saliency).n if needs_saliency else 1
    pass_two_rows = 2 if defense.uses_threshold else 1  # the gradient defences also classify the removal view

    def decode(upload: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(upload)) as image:
            array = np.asarray(image.convert("RGB").resize((model.input_size, model.input_size)))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)

    def encode(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def request_work(batch: list[bytes]) -> None:
        x = torch.stack([decode(upload) for upload in batch]).to(model.device)
        passes(x)
        pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for image in pixels:  # the defended image and the mask of each request
            encode(image), encode(image[..., 0])

    def passes(x: torch.Tensor) -> None:
        if needs_saliency:
            with torch.enable_grad():
                x_input = x.repeat(copies, 1, 1, 1).requires_grad_(True)
                saliency_from_loss(topk_loss(model.module(model.normalize(x_input))), x_input)
        else:
            with torch.inference_mode():
                model.module(model.normalize(x))
        with torch.inference_mode():
            model.module(model.normalize(x.repeat(pass_two_rows, 1, 1, 1)))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    rows = []
    for batch_size in batch_sizes:
        batch = [uploads[i % len(uploads)] for i in range(batch_size)]
        request_work(batch), request_work(batch)
        batches = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        while time.perf_counter() - started < duration_s:
            request_work(batch)
            batches += 1
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        rows.append({"batch_size": batch_size, "images": batches * batch_size, "duration_s": elapsed,
                     "throughput": batches * batch_size / elapsed, "batch_ms": elapsed / batches * 1000,
                     "cpu_ms_per_image": cpu / (batches * batch_size) * 1000,
                     "passes": ("decode, " + ("forward" if not needs_saliency else "forward+input-gradient"
                                if copies == 1 else f"forward+input-gradient ({copies} rows per image)")
                                + f", forward ({pass_two_rows} rows per image), 2 PNG encodes"),
                     "device": str(model.device), "threads": torch.get_num_threads()})
    return rows


def model_floor_in_subprocess(model: str, *, image_size: int, batch_sizes: Sequence[int], duration_s: float,
                              method: str = "slgs", weights: str = "pretrained", device: str | None = None,
                              input_size: int | None = None, env: dict[str, str] | None = None,
                              saliency: str | None = None) -> list[dict]:
    """:func:`model_floor` in the main thread of a fresh Python process (``env``: its environment)."""
    arguments = {"model": model, "image_size": image_size, "batch_sizes": list(batch_sizes),
                 "duration_s": duration_s, "method": method, "weights": weights, "device": device,
                 "input_size": input_size, "saliency": saliency}
    code = "import sys; from elgs.bench.service import print_floor; print_floor(sys.argv[1])"
    completed = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], env=env, capture_output=True,
                               text=True, timeout=duration_s * len(batch_sizes) + 600)
    if completed.returncode != 0:
        raise RuntimeError(f"floor measurement failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_floor(arguments_json: str) -> None:
    """The fresh process of :func:`model_floor_in_subprocess`: tune the allocator as ``ELGS_MALLOC_TUNING``
    says, run :func:`model_floor` with the JSON arguments (``image_size`` and ``model`` plus its keyword
    arguments) and print its rows as one JSON line."""
    from elgs.compute import tune_allocator
    from elgs.settings import read_settings

    tune_allocator(read_settings().malloc_tuning)  # this fresh process's entry point: as ELGS_MALLOC_TUNING says
    arguments = json.loads(arguments_json)
    uploads = sample_uploads(arguments.pop("image_size"))
    print(json.dumps(model_floor(arguments.pop("model"), uploads, **arguments)), flush=True)


def combine_floors(before: Sequence[dict], after: Sequence[dict]) -> dict[int, dict]:
    """Per batch size: the mean of the floor measured before and after the HTTP levels (both kept)."""
    combined = {}
    for first, second in zip(before, after, strict=True):
        throughput = (first["throughput"] + second["throughput"]) / 2
        combined[first["batch_size"]] = {"batch_size": first["batch_size"], "throughput": throughput,
                                         "batch_ms": first["batch_size"] / throughput * 1000,
                                         "before": first["throughput"], "after": second["throughput"]}
        if "cpu_ms_per_image" in first and "cpu_ms_per_image" in second:
            combined[first["batch_size"]]["cpu_ms_per_image"] = (first["cpu_ms_per_image"] +
                                                                 second["cpu_ms_per_image"]) / 2
    return combined


def floor_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes the floor is measured at: 1, the powers of two below ``max_batch_size``, and it."""
    return sorted({1, max_batch_size, *(2 ** k for k in range(max_batch_size.bit_length()) if 2 ** k < max_batch_size)})


def best_floor(floor: dict[int, dict], max_batch_size: int) -> dict:
    """The fastest floor row (images per second) at a batch size a server of ``max_batch_size`` can form:
    the hardware's best, not the floor at the largest batch (on a CPU a SmoothGrad batch of 4 images, 32
    rows in pass 1, is slower per image than one of 2)."""
    return max((row for size, row in floor.items() if size <= max_batch_size), key=lambda row: row["throughput"])


def floor_summary(levels: Sequence[LevelResult], servers: dict[str, int], floor: dict[int, dict]) -> dict:
    """Fill each level's ``floor_ratio``; per mode, the headline ratios at concurrency 8 and 1.

    Each mode is compared with :func:`best_floor` at its server's ``max_batch_size``.

    Returns:
        ``{mode: {"batch_size", "floor_batch_size", "floor", "ratio_at_8", "ratio_at_1",
        "latency_at_1_over_floor"}}``; a ratio is None where that concurrency was not measured.
        ``ratio_at_1`` compares with the batch-1 floor, ``latency_at_1_over_floor`` is p50 latency at
        concurrency 1 over the time of one batch-1 floor iteration.
    """
    summary = {}
    for mode, batch_size in servers.items():
        rows = {level.concurrency: level for level in levels if level.mode == mode}
        best = best_floor(floor, batch_size)
        for level in rows.values():
            level.floor_ratio = level.throughput / best["throughput"]
        single = rows.get(1)
        summary[mode] = {
            "batch_size": batch_size, "floor_batch_size": best["batch_size"], "floor": best["throughput"],
            "ratio_at_8": rows[RATIO_CONCURRENCY].floor_ratio if RATIO_CONCURRENCY in rows else None,
            "ratio_at_1": single.throughput / floor[1]["throughput"] if single else None,
            "latency_at_1_over_floor": single.p50_ms / floor[1]["batch_ms"] if single else None,
        }
    return summary


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def served_batch_size(url: str, model: str, api_key: str | None = None) -> int:
    """The ``max_batch_size`` the server at ``url`` uses for ``model`` (from ``GET /models``)."""
    response = httpx.get(f"{url.rstrip('/')}/models", headers=_auth_headers(api_key), timeout=10.0)
    response.raise_for_status()
    for entry in response.json()["models"]:
        if entry["name"] == model:
            return int(entry["max_batch_size"])
    raise RuntimeError(f"the server at {url} has not loaded {model!r}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout_s: float = 180.0) -> None:
    """Poll ``/health/ready`` until it answers 200.

    Raises:
        RuntimeError: the server process exited or did not become ready within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f} s")


@contextmanager
def serve(model: str, *, weights: str = "pretrained", max_batch_sizes: Sequence[int | None] = (None,),
          extra_env: dict[str, str] | None = None, log_dir: str | os.PathLike | None = None,
          pids: dict[str, int] | None = None):
    """Run one ``elgs serve --models MODEL`` per entry of ``max_batch_sizes`` (None: the server's default)
    on 127.0.0.1 at free ports, in subprocesses started together; yields their URLs once all are ready
    (and fills ``pids``, URL -> process id, when given).

    Only one of them is measured at a time; an idle server takes no CPU.
    """
    processes: list[subprocess.Popen] = []
    urls: list[str] = []
    logs = []
    try:
        for index, max_batch_size in enumerate(max_batch_sizes):
            port = free_port()
            env = {**os.environ, "ELGS_WEIGHTS": weights, **(extra_env or {})}
            if max_batch_size is not None:
                env["ELGS_MAX_BATCH_SIZE"] = str(max_batch_size)
            log = open(Path(log_dir) / f"server_{index}.log", "w") if log_dir else subprocess.DEVNULL  # noqa: SIM115
            logs.append(log)
            command = [sys.executable, "-m", "elgs", "serve", "--models", model, "--host", "127.0.0.1",
                       "--port", str(port)]
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
            if pids is not None:
                pids[urls[-1]] = processes[-1].pid
        for url, process in zip(urls, processes):
            wait_ready(url, process)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            if log is not subprocess.DEVNULL:
                log.close()


def format_table(levels: Sequence[LevelResult], engine: dict[str, dict] | None = None,
                 floor: dict[int, dict] | None = None, summary: dict[str, dict] | None = None) -> str:
    """A text table of ``levels`` (with req/s over the floor when measured), then the floor and the
    headline ratios per mode, then per mode the engine-alone ceiling and its HTTP/engine rounds."""
    lines = [f"{'mode':<14} {'conc':>4} {'req/s':>8} {'/floor':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
             f"{'batch':>6} {'errors':>6} {'cpu ms':>7}"]
    for level in levels:
        ratio = f"{level.floor_ratio:>7.3f}" if level.floor_ratio is not None else f"{'-':>7}"
        cpu = f"{level.server_cpu_ms:>7.1f}" if level.server_cpu_ms is not None else f"{'-':>7}"
        lines.append(f"{level.mode:<14} {level.concurrency:>4} {level.throughput:>8.2f} {ratio} {level.p50_ms:>8.1f} "
                     f"{level.p95_ms:>8.1f} {level.p99_ms:>8.1f} {level.mean_batch_size:>6.2f} {level.errors:>6} {cpu}")
    if floor:
        lines.append("floor (a plain script doing the request's work: decode, passes, PNG encode; main thread of a "
                     "fresh process, mean of before/after the HTTP levels): " +
                     "; ".join(f"batch {b}: {row['throughput']:.2f} img/s ({row['before']:.2f}/{row['after']:.2f}), "
                               f"{row['batch_ms']:.1f} ms per batch" +
                               (f", {row['cpu_ms_per_image']:.1f} CPU ms per image" if "cpu_ms_per_image" in row else "")
                               for b, row in sorted(floor.items())))
        lines.append("cpu ms: the server's CPU time per request; against the floor's CPU ms per image it shows the "
                     "service's own work even on a busy machine")
    for mode, row in (summary or {}).items():
        parts = []
        if row["ratio_at_8"] is not None:
            parts.append(f"concurrency {RATIO_CONCURRENCY}: {row['ratio_at_8']:.3f} of the best floor up to batch "
                         f"{row['batch_size']} (batch {row.get('floor_batch_size', row['batch_size'])})")
        if row["ratio_at_1"] is not None:
            parts.append(f"concurrency 1: {row['ratio_at_1']:.3f} of the batch-1 floor, p50 latency "
                         f"{row['latency_at_1_over_floor']:.2f}x its time")
        if parts:
            lines.append(f"{mode}: " + "; ".join(parts))
    for mode, ceiling in (engine or {}).items():
        rounds = ", ".join(f"{r['http']:.2f}/{r['engine']:.2f}" for r in ceiling["rounds"])
        lines.append(f"{mode}: engine alone, batch {ceiling['batch_size']}: {ceiling['throughput']:.2f} img/s; "
                     f"HTTP/engine at concurrency {ceiling['concurrency']}: {ceiling['ratio']:.3f} "
                     f"(median of {len(ceiling['rounds'])} interleaved rounds, req/s HTTP/engine: {rounds})")
    return "\n".join(lines)


def interleaved_ratio(url: str, uploads: Sequence[bytes], measure_engine: Callable[[], dict], *, duration_s: float,
                      rounds: int = 3, concurrency: int = RATIO_CONCURRENCY, method: str = "slgs",
                      api_key: str | None = None) -> dict:
    """The engine's ceiling and HTTP/engine throughput at ``concurrency``, measured in alternating windows.

    A shared machine's speed drifts over minutes, so each round calls ``measure_engine`` (the engine
    alone, the server idle; it returns :func:`engine_throughput`'s dict) and then loads the server
    at ``concurrency`` for ``duration_s``; the ratio is the median of the rounds'.
    """
    rows = []
    for _ in range(rounds):
        ceiling = measure_engine()
        level = asyncio.run(run_level(url, uploads, concurrency=concurrency, duration_s=duration_s, method=method,
                                      api_key=api_key))
        rows.append({"engine": ceiling["throughput"], "http": level.throughput,
                     "ratio": level.throughput / ceiling["throughput"], "batch_ms": ceiling["batch_ms"]})
    return {"batch_size": ceiling["batch_size"], "concurrency": concurrency,
            "throughput": statistics.median(r["engine"] for r in rows),
            "http_throughput": statistics.median(r["http"] for r in rows),
            "ratio": statistics.median(r["ratio"] for r in rows), "rounds": rows}


def engine_throughput_in_subprocess(model: str, *, image_size: int, batch_size: int, duration_s: float,
                                    method: str = "slgs", weights: str = "pretrained", device: str | None = None,
                                    input_size: int | None = None, env: dict[str, str] | None = None) -> dict:
    """:func:`engine_throughput` in a fresh Python process with the servers' environment.

    Thread-pool settings such as ``OMP_WAIT_POLICY`` are read when torch loads, so measuring the engine
    in its own process is the only way it runs under exactly the conditions the servers run under.
    """
    arguments = {"model": model, "image_size": image_size, "batch_size": batch_size, "duration_s": duration_s,
                 "method": method, "weights": weights, "device": device, "input_size": input_size}
    code = "import sys; from elgs.bench.service import print_engine_throughput; print_engine_throughput(sys.argv[1])"
    completed = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], env=env, capture_output=True,
                               text=True, timeout=duration_s + 600)
    if completed.returncode != 0:
        raise RuntimeError(f"engine measurement failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_engine_throughput(arguments_json: str) -> None:
    """The fresh process of :func:`engine_throughput_in_subprocess`: run :func:`engine_throughput` with the
    JSON arguments (``image_size`` and ``model`` plus its keyword arguments), print its dict as one JSON line."""
    arguments = json.loads(arguments_json)
    uploads = sample_uploads(arguments.pop("image_size"))
    print(json.dumps(engine_throughput(arguments.pop("model"), uploads, **arguments)), flush=True)


def plot(levels: Sequence[LevelResult], engine: dict[str, dict] | None, path: str | os.PathLike,
         title: str, floor: dict[int, dict] | None = None, servers: dict[str, int] | None = None) -> None:
    """Throughput and p50/p99 latency against concurrency, one line per mode, floors dashed, engine dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput_axes, latency_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    modes = list(dict.fromkeys(level.mode for level in levels))
    for index, mode in enumerate(modes):
        rows = [level for level in levels if level.mode == mode]
        colour = f"C{index}"
        concurrency = [row.concurrency for row in rows]
        throughput_axes.plot(concurrency, [row.throughput for row in rows], "o-", color=colour, label=f"HTTP, {mode}")
        if floor and servers and mode in servers:
            best = best_floor(floor, servers[mode])
            throughput_axes.axhline(best["throughput"], color=colour, linestyle="--",
                                    label=f"floor: plain script, batch {best['batch_size']}")
        if engine and mode in engine:
            throughput_axes.axhline(engine[mode]["throughput"], color=colour, linestyle=":",
                                    label=f"engine alone, batch {engine[mode]['batch_size']}")
        latency_axes.plot(concurrency, [row.p50_ms for row in rows], "o-", color=colour, label=f"p50, {mode}")
        latency_axes.plot(concurrency, [row.p99_ms for row in rows], "s:", color=colour, label=f"p99, {mode}")
    for axes, ylabel in ((throughput_axes, "defended images / s"), (latency_axes, "latency (ms)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted({level.concurrency for level in levels}))
        axes.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes.set_xlabel("concurrent requests")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    latency_axes.set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_service_benchmark(*, model: str = "efficientnet_lite0", weights: str = "pretrained", method: str = "slgs",
                          concurrency: Sequence[int] = CONCURRENCY_LEVELS, duration_s: float = 8.0,
                          url: str | None = None, api_key: str | None = None, batched_max_batch_size: int | None = None,
                          engine: bool = False, out_dir: str | os.PathLike = "benchmarks/results",
                          device: str | None = None, input_size: int | None = None, ratio_rounds: int = 3,
                          omp_wait_policy: str | None = None, floor: bool = True,
                          saliency: str | None = None, compare: Sequence[str] = ()) -> dict:
    """Benchmark the service; print the table, write ``service_load.json`` and ``service_load.png`` in ``out_dir``.

    Args:
        model, weights: what the servers load (``elgs serve --models MODEL``, ``ELGS_WEIGHTS``).
        method: the defence requested (``/defend/{method}``).
        saliency: ``?saliency=`` of the requests (None: the model's default estimator); the floor's
            gradient pass carries the same number of copies per image.
        concurrency: levels of concurrent requests.
        duration_s: measured seconds per level.
        url: benchmark this running server instead of starting two (mode ``external``); the engine
            ceiling then runs on this machine.
        api_key: sent as ``Authorization: Bearer``.
        batched_max_batch_size: ``ELGS_MAX_BATCH_SIZE`` of the batching-on server; None keeps the
            server's default (CPU 4, GPU 32).
        floor: measure the plain script's floor (:func:`model_floor`) at the batched server's batch size and at
            batch 1, in a fresh process, before and after the levels; under this environment's threading
            and under ``omp_wait_policy``, keeping the faster of the two.
        engine: also measure the engine alone, in a fresh process with the servers' environment, at
            each server's ``max_batch_size``, in ``ratio_rounds`` windows alternating with windows of
            HTTP load at concurrency 8 (:func:`interleaved_ratio`).
        omp_wait_policy: ``OMP_WAIT_POLICY`` for the servers and the engine (not the floor); None (the
            default) inherits this environment's, so the servers run as a user's would. On a quiet
            2-core machine the default spinning threads were 1.7x faster at batch 1 than PASSIVE
            (floor 17.9 against 9.3 img/s); on a machine busy with other work PASSIVE avoids a collapse
            of spinning threads (measured 0.2 instead of 10 images/s), so pass it there.
        out_dir: where JSON and PNG go (created).
        device: ``ELGS_DEVICE`` for the servers and the engine (default: CUDA when present).
        input_size: ``ELGS_INPUT_SIZE`` for the servers and the engine (default: the model's).
        compare: other methods measured at the same levels against the same servers, right after ``method``
            (e.g. ``auto`` against ``slgs``: the cascade's speed-up on clean traffic); the table ends with
            each one's req/s over ``method``'s per level.

    Returns:
        The JSON document written.
    """
    uploads_size = input_size or _input_size(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra_env, process_env = _server_environment(weights, device, input_size, omp_wait_policy)
    run = _ServiceRun(model=model, weights=weights, method=method, concurrency=concurrency, duration_s=duration_s,
                      api_key=api_key, device=device, input_size=input_size, saliency=saliency,
                      uploads_size=uploads_size, uploads=sample_uploads(uploads_size), process_env=process_env,
                      floor_envs=floor_environments(process_env) if floor else {},
                      engine=engine, ratio_rounds=ratio_rounds, compare=tuple(compare))
    if url:
        batch_size = served_batch_size(url, model, api_key)
        run.measure_floor("before", batch_size)
        run.measure(url, "external")
        run.measure_floor("after", batch_size)
    else:
        modes = {"batching on": batched_max_batch_size, "batching off": 1}
        print(f"starting two elgs serve --models {model}: max_batch_size "
              f"{batched_max_batch_size or 'default'} (batching on) and 1 (batching off)", flush=True)
        with serve(model, weights=weights, max_batch_sizes=list(modes.values()), extra_env=extra_env,
                   log_dir=out_dir, pids=run.server_pids) as server_urls:
            batch_size = served_batch_size(server_urls[0], model, api_key)
            run.measure_floor("before", batch_size)  # the servers are idle meanwhile
            for mode, server_url in zip(modes, server_urls):
                run.measure(server_url, mode)
            run.measure_floor("after", batch_size)
    document, floor_rows, summary = run.document()
    (out_dir / "service_load.json").write_text(json.dumps(document, indent=2))
    plot(run.levels, run.ceilings, out_dir / "service_load.png",
         f"{model} ({weights}), /defend/{method}, {os.cpu_count()} CPUs", floor=floor_rows, servers=run.servers)
    print(format_table(run.levels, run.ceilings, floor_rows, summary))
    if run.compared:
        print(format_comparison(method, run.levels, run.compared))
    print(f"wrote {out_dir / 'service_load.json'} and {out_dir / 'service_load.png'}")
    return document


def _server_environment(weights: str, device: str | None, input_size: int | None,
                        omp_wait_policy: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The ``ELGS_*`` (and ``OMP_WAIT_POLICY``) settings of the servers and the engine, and the whole
    environment of their processes."""
    extra_env = {"ELGS_DEVICE": device} if device else {}
    if input_size:
        extra_env["ELGS_INPUT_SIZE"] = str(input_size)
    if omp_wait_policy:
        extra_env["OMP_WAIT_POLICY"] = omp_wait_policy
    return extra_env, {**os.environ, "ELGS_WEIGHTS": weights, **extra_env}


def floor_environments(process_env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The environments the floor is measured under, by label; :func:`run_service_benchmark` keeps the
    fastest per batch size.

    This environment's own threading and the servers' ``OMP_WAIT_POLICY``: the hardware's best,
    whichever setting gets it (on a busy machine torch's default spinning threads collapse, measured
    0.07 instead of 7 img/s; on a quiet one they may win). And each with glibc's malloc tuned as the
    servers tune it (:func:`elgs.compute.tune_allocator`): a plain script page-faults its activations
    in on every pass, so the service's own allocator setting cannot flatter its ratio.
    """
    inherited = {key: value for key, value in process_env.items() if key != "OMP_WAIT_POLICY"}
    if "OMP_WAIT_POLICY" in os.environ:
        inherited["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    envs = {"inherited": inherited}
    if process_env.get("OMP_WAIT_POLICY") != inherited.get("OMP_WAIT_POLICY"):
        envs[f"OMP_WAIT_POLICY={process_env['OMP_WAIT_POLICY']}"] = process_env
    inherited["ELGS_MALLOC_TUNING"] = "0"
    envs["malloc tuned"] = {**inherited, "ELGS_MALLOC_TUNING": "1"}
    return envs


@dataclass
class _ServiceRun:
    """One service benchmark's settings and what it measured so far (floors, levels, engine ceilings)."""

    model: str
    weights: str
    method: str
    concurrency: Sequence[int]
    duration_s: float
    api_key: str | None
    device: str | None
    input_size: int | None
    saliency: str | None
    uploads_size: int
    uploads: list[bytes]
    process_env: dict[str, str]
    floor_envs: dict[str, dict[str, str]]  # empty: no floor
    engine: bool
    ratio_rounds: int
    compare: tuple[str, ...] = ()
    levels: list[LevelResult] = field(default_factory=list)
    compared: dict[str, list[LevelResult]] = field(default_factory=dict)  # method -> its levels
    servers: dict[str, int] = field(default_factory=dict)  # mode -> the server's max_batch_size
    ceilings: dict[str, dict] = field(default_factory=dict)
    floors: dict[str, list[dict]] = field(default_factory=dict)
    floor_runs: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    server_pids: dict[str, int] = field(default_factory=dict)

    def measure_floor(self, when: str, batch_size: int) -> None:
        """The floor at the batch sizes up to ``batch_size`` under each environment; the fastest kept."""
        if not self.floor_envs:
            return
        sizes = floor_batch_sizes(batch_size)[::-1]
        runs = self.floor_runs[when] = {
            label: model_floor_in_subprocess(self.model, image_size=self.uploads_size, batch_sizes=sizes,
                                             duration_s=self.duration_s, method=self.method, weights=self.weights,
                                             device=self.device, input_size=self.input_size, env=env,
                                             saliency=self.saliency)
            for label, env in self.floor_envs.items()}
        self.floors[when] = [{**max(rows, key=lambda row: row["throughput"]),
                              "threading": max(zip(rows, runs), key=lambda pair: pair[0]["throughput"])[1]}
                             for rows in zip(*runs.values())]
        print(f"  floor {when}: " + "; ".join(
            f"{label}: " + ", ".join(f"batch {row['batch_size']} {row['throughput']:.2f} img/s" for row in rows)
            for label, rows in runs.items()), flush=True)

    def measure(self, server_url: str, mode: str) -> None:
        """Every concurrency level against one server, then (``engine``) its engine-alone ceiling."""
        self.servers[mode] = served_batch_size(server_url, self.model, self.api_key)
        for level in self.concurrency:
            result = asyncio.run(run_level(server_url, self.uploads, concurrency=level, duration_s=self.duration_s,
                                           method=self.method, mode=mode, api_key=self.api_key,
                                           server_pid=self.server_pids.get(server_url), saliency=self.saliency))
            self.levels.append(result)
            print(f"  {mode:<14} concurrency {level:>3}: {result.throughput:7.2f} req/s, "
                  f"p50 {result.p50_ms:7.1f} ms, p99 {result.p99_ms:7.1f} ms, errors {result.errors}", flush=True)
            for other in self.compare:  # right after, so both see the same machine
                compared = asyncio.run(run_level(server_url, self.uploads, concurrency=level,
                                                 duration_s=self.duration_s, method=other, mode=mode,
                                                 api_key=self.api_key, server_pid=self.server_pids.get(server_url),
                                                 saliency=self.saliency))
                self.compared.setdefault(other, []).append(compared)
                print(f"  {mode:<14} concurrency {level:>3}: {compared.throughput:7.2f} req/s /defend/{other}, "
                      f"{compared.throughput / max(result.throughput, 1e-9):.2f}x", flush=True)
        if not self.engine:
            return

        def measure_engine() -> dict:
            return engine_throughput_in_subprocess(
                self.model, image_size=self.uploads_size, batch_size=self.servers[mode], duration_s=self.duration_s,
                method=self.method, weights=self.weights, device=self.device, input_size=self.input_size,
                env=self.process_env)

        ceiling = self.ceilings[mode] = interleaved_ratio(server_url, self.uploads, measure_engine,
                                                          duration_s=self.duration_s, rounds=self.ratio_rounds,
                                                          method=self.method, api_key=self.api_key)
        print(f"  {mode:<14} engine alone {ceiling['throughput']:.2f} img/s, HTTP/engine at concurrency "
              f"{RATIO_CONCURRENCY}: {ceiling['ratio']:.3f}", flush=True)

    def document(self) -> tuple[dict, dict[int, dict], dict]:
        """The JSON document, the combined floor rows and the per-mode floor summary."""
        floor_rows = combine_floors(self.floors["before"], self.floors["after"]) if self.floors else {}
        summary = floor_summary(self.levels, self.servers, floor_rows) if floor_rows else {}
        document = {
            "model": self.model, "weights": self.weights, "method": self.method, "saliency": self.saliency,
            "image_size": self.uploads_size, "duration_s": self.duration_s, "cpu_count": os.cpu_count(),
            "available_cores": _available_cores(), "servers": self.servers,
            "omp_wait_policy": self.process_env.get("OMP_WAIT_POLICY"), "load_average": os.getloadavg(),
            "floor": {"before": self.floors.get("before"), "after": self.floors.get("after"), "runs": self.floor_runs,
                      "combined": {str(b): row for b, row in floor_rows.items()}} if self.floors else {},
            "floor_ratios": summary,
            "engine": self.ceilings, "levels": [asdict(level) for level in self.levels],
            "http_engine_ratio_at_8": {mode: ceiling["ratio"] for mode, ceiling in self.ceilings.items()},
            "compared": {method: [asdict(level) for level in levels] for method, levels in self.compared.items()},
        }
        return document, floor_rows, summary


def format_comparison(method: str, levels: Sequence[LevelResult], compared: dict[str, list[LevelResult]]) -> str:
    """Per server and concurrency, each compared method's req/s and its ratio to ``method``'s."""
    lines = [f"compared with /defend/{method} (req/s, ratio), same servers, measured right after each level:"]
    for other, others in compared.items():
        for base, level in zip(levels, others):
            lines.append(f"  {level.mode:<14} c={level.concurrency:<3} {method} {base.throughput:7.2f}  {other} "
                         f"{level.throughput:7.2f}  {other}/{method} {level.throughput / max(base.throughput, 1e-9):5.2f}x")
    return "\n".join(lines)


def _available_cores() -> int:
    from elgs.compute import available_cores

    return available_cores()


def _input_size(model: str) -> int:
    from elgs.models import get_model_spec

    return get_model_spec(model).input_size
