"""Where should a model's torch ops run? One ``/defend/slgs`` request on EfficientNet-Lite0, timed
under each placement, each in its own fresh process (thread pools are set up once per process).

    elgs bench placement [--repeats 15] [--model efficientnet_lite0]

Placements:
    main          load and run in the main thread (what a plain script does)
    split         load in the main thread, run in a ThreadPoolExecutor(1) (the service before issue 8)
    split+decode  as split, plus array->tensor and tensor->uint8 on a second helper thread per request
    worker        load and run in the same single worker thread, nothing torch in the main thread
    worker+loaded load in the main thread, run in a worker whose first act is torch.set_num_threads
    process       the engine in a worker process (spawn); uint8 arrays in, uint8 arrays out by pickling

Prints one line per placement: median wall ms per request (the process placement includes its
IPC), CPU ms per request (this process and its children), and the OS threads the process holds at
the end (each thread that ran torch ops owns an OpenMP team of ``threads - 1`` more), a figure a
busy machine does not blur.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from elgs.bench import PLACEMENTS


def _photo_array(size: int):
    import numpy as np
    from PIL import Image

    from elgs.images import sample_photo

    return np.asarray(sample_photo("chelsea").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def _load(model_name: str, weights: str = "pretrained", input_size: int | None = None):
    from elgs.engine import Engine
    from elgs.models import load_model

    return Engine(load_model(model_name, weights=weights, device="cpu", input_size=input_size))


def _request(engine, array):
    from elgs.engine import Request
    from elgs.images import array_to_tensor

    return Request(image=array_to_tensor(array), task="defend", method="slgs")


def _run_to_arrays(engine, array):
    from elgs.images import tensor_to_array

    result = engine.run([_request(engine, array)])[0]
    return tensor_to_array(result.image), tensor_to_array(result.mask), result.timing_ms


_PROCESS_ENGINE = None


def _process_init(model_name: str, weights: str, input_size: int | None) -> None:
    global _PROCESS_ENGINE
    _PROCESS_ENGINE = _load(model_name, weights, input_size)


def _process_call(array):
    return _run_to_arrays(_PROCESS_ENGINE, array)


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_CPU_MS: list[float] = []


def _time(call, repeats: int) -> list[float]:
    call(), call()  # warm-up: the first calls build the kernels' caches
    times = []
    cpu_started = _cpu_seconds()
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    _CPU_MS.append((_cpu_seconds() - cpu_started) * 1000 / repeats)
    return times


def _os_threads() -> int:
    import os

    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1


def measure(placement: str, model_name: str, repeats: int, weights: str = "pretrained",
            input_size: int | None = None) -> dict:
    """Median ms per request under ``placement`` (call this in a fresh process: :func:`run_placements`)."""
    import torch

    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    load = lambda: _load(model_name, weights, input_size)  # noqa: E731
    if placement == "process":
        import multiprocessing

        from elgs.models import get_model_spec

        array = _photo_array(input_size or get_model_spec(model_name).input_size)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_process_init,
                                 initargs=(model_name, weights, input_size)) as pool:
            pool.submit(_process_call, array).result()  # loads the model in the worker first
            worker_cpu = pool.submit(_cpu_seconds).result()
            times = _time(lambda: pool.submit(_process_call, array).result(), repeats)
            worker_cpu = pool.submit(_cpu_seconds).result() - worker_cpu  # its warm-up calls included
        return {"placement": placement, "median_ms": statistics.median(times), "os_threads": _os_threads(),
                "cpu_ms": _CPU_MS[-1] + worker_cpu * 1000 / (repeats + 2)}
    worker = ThreadPoolExecutor(1)
    helper = ThreadPoolExecutor(1)
    if placement in ("worker", "worker+loaded"):
        if placement == "worker":
            engine = worker.submit(load).result()
        else:
            engine = load()
            worker.submit(torch.set_num_threads, torch.get_num_threads()).result()
        array = _photo_array(engine.model.input_size)
        times = _time(lambda: worker.submit(_run_to_arrays, engine, array).result(), repeats)
    else:
        engine = load()
        array = _photo_array(engine.model.input_size)
        if placement == "main":
            times = _time(lambda: _run_to_arrays(engine, array), repeats)
        elif placement == "split":
            times = _time(lambda: worker.submit(_run_to_arrays, engine, array).result(), repeats)
        else:  # split+decode: conversions on a helper thread, as the service did before issue 8
            from elgs.images import array_to_tensor, tensor_to_array

            def call():
                from elgs.engine import Request

                image = helper.submit(array_to_tensor, array).result()
                result = worker.submit(engine.run, [Request(image=image, task="defend", method="slgs")]).result()[0]
                helper.submit(lambda: (tensor_to_array(result.image), tensor_to_array(result.mask))).result()

            times = _time(call, repeats)
    return {"placement": placement, "median_ms": statistics.median(times), "os_threads": _os_threads(),
            "cpu_ms": _CPU_MS[-1]}


def print_measurement(arguments_json: str) -> None:
    """The fresh process of :func:`run_placements`: :func:`measure` with the JSON keyword arguments, one JSON line."""
    print(json.dumps(measure(**json.loads(arguments_json))), flush=True)


def run_placements(placements: list[str], *, model: str = "efficientnet_lite0", repeats: int = 15,
                   weights: str = "pretrained", input_size: int | None = None) -> list[dict]:
    """Each placement measured in its own fresh process; prints a line per placement, returns the rows."""
    rows = []
    for placement in placements:
        arguments = {"placement": placement, "model_name": model, "repeats": repeats, "weights": weights,
                     "input_size": input_size}
        code = "import sys; from elgs.bench.placement import print_measurement; print_measurement(sys.argv[1])"
        completed = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True,
                                   text=True, check=False)
        if completed.returncode != 0:
            print(f"{placement:<14} failed: {completed.stderr.strip()[-500:]}")
            continue
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{placement:<14} {row['median_ms']:8.1f} ms per request, {row['cpu_ms']:7.1f} CPU ms per request, "
              f"{row['os_threads']:3d} OS threads", flush=True)
    return rows
