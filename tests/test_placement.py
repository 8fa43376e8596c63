"""Where the service's torch ops run (issue 8): only in each model's compute thread.

A profiler hook installed in every thread records which threads call into torch (C functions of
torch and tensor methods, and Python functions of torch's modules). If decoding, encoding or any
other helper ran a torch op off the compute thread again, the 2x slowdown of issue 8 would come
back; these tests would name the thread and the call.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import types
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from elgs.api import Settings, create_app
from elgs.api.inference import encode_base64_pngs
from elgs.batcher import Batcher
from elgs.compute import COMPUTE_THREAD_PREFIX, ComputeThread, set_torch_threads, torch_threads
from elgs.engine import Engine, Request
from elgs.images import tensor_to_array
from tests.conftest import make_tiny_model


def _torch_call(frame, event: str, arg) -> str | None:
    if event == "c_call":
        owner = getattr(arg, "__self__", None)
        module = getattr(arg, "__module__", None) or ""
        if isinstance(owner, torch.Tensor) or module.startswith("torch") or (
                isinstance(owner, types.ModuleType) and owner.__name__.startswith("torch")):
            return getattr(arg, "__qualname__", repr(arg))
    elif event == "call":
        module = frame.f_globals.get("__name__", "")
        # torch.package patches the standard library's inspect.getfile (FastAPI calls it): not a torch op.
        if (module == "torch" or module.startswith("torch.")) and not module.startswith("torch.package"):
            return f"{module}.{frame.f_code.co_name}"
    return None


@contextmanager
def torch_calls_by_thread():
    """Yield a dict thread name -> set of torch calls, filled by every thread (this one and new ones)."""
    calls: dict[str, set[str]] = defaultdict(set)

    def profile(frame, event, arg):
        name = _torch_call(frame, event, arg)
        if name is not None:
            calls[threading.current_thread().name].add(name)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


def _png(size: int = 40, seed: int = 0) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _off_compute(calls: dict[str, set[str]]) -> dict[str, set[str]]:
    return {thread: names for thread, names in calls.items() if not thread.startswith(COMPUTE_THREAD_PREFIX)}


def test_the_recorder_sees_torch_ops_on_helper_threads():
    # The control: the pre-issue-8 encode path (a float tensor converted on a helper thread) is caught.
    image = torch.rand(3, 8, 8)
    with torch_calls_by_thread() as calls:
        asyncio.run(encode_base64_pngs(image))
    assert _off_compute(calls), "the recorder missed torch ops on a helper thread"


def test_service_runs_every_torch_op_in_the_compute_thread():
    model = make_tiny_model()
    app = create_app(Settings(models=[model.name], warmup=True), models=[model])
    with torch_calls_by_thread() as calls:
        with TestClient(app) as client:
            assert client.get("/health/ready").status_code in (200, 503)
            files = {"image": ("x.png", _png(), "image/png")}
            for path, params in (("/defend/slgs", {}), ("/defend/lgs", {"response": "image"}),
                                 ("/defend/wlgs", {"response": "mask"}), ("/classify", {}), ("/saliency", {})):
                response = client.post(path, params=params, files=files)
                assert response.status_code == 200, (path, response.text)
    compute_threads = [thread for thread in calls if thread.startswith(f"{COMPUTE_THREAD_PREFIX}-tiny")]
    assert compute_threads and any("forward" in name for name in calls[compute_threads[0]])
    assert _off_compute(calls) == {}


def test_batcher_converts_arrays_and_finishes_in_the_compute_thread(tiny_model):
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    async def scenario():
        batcher = Batcher(Engine(tiny_model), max_batch_size=2, max_wait_ms=1)
        await batcher.start()
        try:
            # What crosses back to the event loop is plain Python and NumPy (a tensor's repr is a torch op).
            finished_in = await batcher.submit(
                Request(image=array, task="defend", method="slgs"),
                finish=lambda result: (threading.current_thread().name, [p.index for p in result.defended_predictions],
                                       tensor_to_array(result.image)))
            with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(31, 32, 3\)"):
                await batcher.submit(Request(image=array[1:], task="classify"))
            return finished_in
        finally:
            await batcher.close()

    with torch_calls_by_thread() as calls:
        thread, classes, image = asyncio.run(scenario())
    assert thread.startswith(f"{COMPUTE_THREAD_PREFIX}-tiny")
    assert _off_compute(calls) == {}
    expected = Engine(tiny_model).run([Request(image=torch.from_numpy(array).permute(2, 0, 1).float() / 255,
                                               task="defend", method="slgs")])[0]
    assert classes == [p.index for p in expected.defended_predictions]
    np.testing.assert_array_equal(image, tensor_to_array(expected.image))


def test_a_model_loaded_in_a_compute_thread_is_run_there():
    compute = ComputeThread("tiny", threads=1)
    try:
        model = compute.call(make_tiny_model)

        async def scenario():
            batcher = Batcher(Engine(model), compute=compute)
            await batcher.start()
            assert batcher.compute_thread is compute
            await batcher.close()

        asyncio.run(scenario())
        assert compute.closed
    finally:
        compute.shutdown()


def test_torch_threads_setting(monkeypatch):
    from elgs.compute import available_cores

    monkeypatch.setenv("ELGS_TORCH_THREADS", "1")  # read by the CLI and the app, never here
    assert torch_threads() == available_cores() >= 1 and torch_threads(3) == 3
    with pytest.raises(ValueError, match="0"):
        torch_threads(0)
    compute = ComputeThread("threads", threads=1)
    try:
        assert compute.call(torch.get_num_threads) == 1
    finally:
        compute.shutdown()
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


_FAULTS = """
import resource, sys, threading
import torch
from elgs.compute import ComputeThread, tune_allocator
from elgs.settings import read_settings
tune_allocator(read_settings().malloc_tuning)  # as the CLI and the app do, first thing
compute = ComputeThread("faults", threads=1)

def faults():
    for _ in range(5):  # warm up (the heap grows to its working size)
        torch.empty(16 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(20):  # 64 MiB each, freed at once: a model pass's activations
        torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

print(compute.call(faults))
compute.shutdown()
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc tuning is for glibc")
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in_again():
    import os
    import subprocess
    import sys

    def faults(tuning: str) -> int:
        env = {**os.environ, "ELGS_MALLOC_TUNING": tuning}
        done = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    # Untuned, every 64 MiB allocation is a fresh mmap: 20 x 16384 pages faulted in. Tuned, the heap grows
    # to a few such blocks over the first allocations (seen: up to 4 after the warm-up), then reuses them.
    assert faults("0") >= 20 * 16_000
    assert faults("1") <= 8 * 16_400


_LATE = """
import sys, threading
helper = threading.Thread(target=lambda: [bytearray(100_000) for _ in range(50)])  # allocates first
helper.start()
helper.join()  # gone, but its arena stays
import logging
logging.basicConfig()
from elgs.compute import tune_allocator
print(tune_allocator(True))
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc tuning is for glibc")
def test_elgs_tunes_the_allocator_before_any_other_thread_and_warns_when_too_late():
    import subprocess
    import sys

    late = subprocess.run([sys.executable, "-c", _LATE], capture_output=True, text=True, timeout=60)
    assert late.returncode == 0 and "malloc tuned after other threads allocated (2 arenas)" in late.stderr
    # The CLI tunes first thing, while it is the only thread: no warning.
    quiet = subprocess.run([sys.executable, "-m", "elgs", "defenses"], capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and "malloc tuned after" not in quiet.stderr
