import asyncio
import time

import pytest
import torch

from elgs.batcher import Batcher, BatcherClosedError, BatcherHooks, DeadlineExceededError, QueueFullError
from elgs.engine import Engine, Request, UnknownMethodError
from tests.api.helpers import BatchRecorder, gated_tiny_model
from tests.conftest import make_tiny_model

KINDS = [("classify", "none"), ("defend", "lgs"), ("defend", "slgs"), ("defend", "wlgs"), ("defend", "none")]


def _requests(photos, count):
    images = list(photos.values())
    return [Request(image=images[i % len(images)], task=KINDS[i % 5][0], method=KINDS[i % 5][1]) for i in range(count)]


def _same(result, alone):
    """Equal to the request run alone: same classes in the same order, scores and images to float32 noise."""
    for got, want in ((result.predictions, alone.predictions),
                      (result.defended_predictions or [], alone.defended_predictions or [])):
        assert [p.index for p in got] == [p.index for p in want]
        assert [p.score for p in got] == pytest.approx([p.score for p in want], rel=1e-4, abs=1e-6)
    if alone.image is not None:
        assert (result.image - alone.image).abs().max() <= 1 / 255
        assert (result.mask - alone.mask).abs().max() <= 1 / 255


class _Poisoned(torch.nn.Module):
    """Raises on any batch holding an image with a value over 20 (normalised); the 'bad sample'."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.amax() > 20:
            raise ValueError("poisoned sample")
        return self.inner(x)


class _OutOfMemoryOver4(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


async def test_batches_close_at_max_batch_size_and_results_do_not_cross(tiny_model, photos):
    recorder = BatchRecorder(tiny_model.module)
    batcher = Batcher(Engine(tiny_model), max_batch_size=4, max_wait_ms=2000, hooks=[recorder])
    await batcher.start()
    requests = _requests(photos, 8)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(r) for r in requests)), 10)
    await batcher.close()
    assert [size for size, _ in recorder.passes] == [4, 4]  # closed by size, long before 2 s
    assert all(calls <= 2 for _, calls in recorder.passes)
    engine = Engine(make_tiny_model())
    for request, result in zip(requests, results):
        assert result.batch_size == 4
        _same(result, engine.run([request])[0])


async def test_batch_closes_after_max_wait(tiny_model, photos):
    batcher = Batcher(Engine(tiny_model), max_batch_size=64, max_wait_ms=20)
    await batcher.start()
    result = await asyncio.wait_for(batcher.submit(_requests(photos, 1)[0]), 5)
    await batcher.close()
    assert result.batch_size == 1


async def test_invalid_request_raises_before_queueing(tiny_model, photos):
    batcher = Batcher(Engine(tiny_model))
    await batcher.start()
    with pytest.raises(UnknownMethodError, match="unknown defence 'nope'"):
        await batcher.submit(Request(image=photos["chelsea"], method="nope"))
    assert batcher.depth == 0 and tiny_model.module.calls == 0
    await batcher.close()


async def test_full_queue_rejects_at_once(photos):
    model, gate = gated_tiny_model()
    batcher = Batcher(Engine(model), max_batch_size=1, max_wait_ms=0, max_queue=2)
    await batcher.start()
    gate.opened.clear()
    request = _requests(photos, 1)[0]
    running = [asyncio.ensure_future(batcher.submit(request))]
    assert await asyncio.to_thread(gate.entered.wait, 30)  # the first request is computing
    running += [asyncio.ensure_future(batcher.submit(request)) for _ in range(2)]
    await asyncio.sleep(0)
    assert batcher.depth == 2
    with pytest.raises(QueueFullError, match="full") as error:
        await batcher.submit(request)
    assert error.value.retry_after_s >= 1
    gate.opened.set()
    results = await asyncio.wait_for(asyncio.gather(*running), 10)
    assert len(results) == 3
    await batcher.close()


async def test_deadline_gives_timeout_and_expired_request_is_not_computed(photos):
    model, gate = gated_tiny_model()
    recorder = BatchRecorder(model.module.inner)
    batcher = Batcher(Engine(model), max_batch_size=1, max_wait_ms=0, request_timeout_s=0.2, hooks=[recorder])
    await batcher.start()
    gate.opened.clear()
    request = _requests(photos, 1)[0]
    first = asyncio.ensure_future(batcher.submit(request, deadline=None))
    assert await asyncio.to_thread(gate.entered.wait, 30)
    with pytest.raises(DeadlineExceededError, match="no answer within"):
        await batcher.submit(request)  # queued behind the blocked batch until its deadline
    assert batcher.depth == 0 and recorder.dropped_reasons == ["deadline"]
    gate.opened.set()
    with pytest.raises(DeadlineExceededError):
        await first  # it was computing when its own deadline passed
    # A probe queued behind everything else: once it is answered, anything left in the queue has run.
    await asyncio.wait_for(batcher.submit(request, deadline=time.monotonic() + 30), 30)
    assert [size for size, _ in recorder.passes] == [1, 1]  # the first request and the probe, not the expired one
    await batcher.close()


async def test_cancelled_request_is_dropped_before_compute(photos):
    model, gate = gated_tiny_model()
    recorder = BatchRecorder(model.module.inner)
    batcher = Batcher(Engine(model), max_batch_size=4, max_wait_ms=0, hooks=[recorder])
    await batcher.start()
    gate.opened.clear()
    requests = _requests(photos, 3)
    first = asyncio.ensure_future(batcher.submit(requests[0]))
    assert await asyncio.to_thread(gate.entered.wait, 30)
    leaving = asyncio.ensure_future(batcher.submit(requests[1]))
    staying = asyncio.ensure_future(batcher.submit(requests[2]))
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.sleep(0.01)
    assert batcher.depth == 1 and recorder.dropped_reasons == ["cancelled"]
    gate.opened.set()
    await asyncio.wait_for(asyncio.gather(first, staying), 10)
    assert [size for size, _ in recorder.passes] == [1, 1]  # the cancelled request never ran
    await batcher.close()


async def test_failing_sample_fails_alone_and_worker_survives(tiny_model, photos):
    tiny_model.module = _Poisoned(tiny_model.module).eval()
    batcher = Batcher(Engine(tiny_model), max_batch_size=4, max_wait_ms=1000)
    await batcher.start()
    good = _requests(photos, 3)
    poisoned = Request(image=torch.full_like(good[0].image, 7.0), task="classify")
    outcomes = await asyncio.wait_for(asyncio.gather(
        *(batcher.submit(r) for r in [good[0], poisoned, good[1], good[2]]), return_exceptions=True), 10)
    assert isinstance(outcomes[1], ValueError) and "poisoned" in str(outcomes[1])
    assert all(not isinstance(o, BaseException) and o.batch_size == 1 for i, o in enumerate(outcomes) if i != 1)
    # the worker is still alive and batches again
    after = await asyncio.wait_for(asyncio.gather(*(batcher.submit(r) for r in _requests(photos, 4))), 10)
    assert [r.batch_size for r in after] == [4, 4, 4, 4]
    await batcher.close()


async def test_out_of_memory_splits_the_batch_in_halves(tiny_model, photos):
    tiny_model.module = _OutOfMemoryOver4(tiny_model.module).eval()
    batcher = Batcher(Engine(tiny_model), max_batch_size=4, max_wait_ms=1000)
    await batcher.start()
    # Four LGS requests: pass 1 has 4 rows, pass 2 has 8 (each defended image and its removal check) and runs
    # out of memory; each half then fits (2 rows, then 4).
    requests = [Request(image=image, method="lgs") for image in list(photos.values())[:4]]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(r) for r in requests)), 10)
    assert [r.batch_size for r in results] == [2, 2, 2, 2]
    engine = Engine(make_tiny_model())
    for request, result in zip(requests, results):
        _same(result, engine.run([request])[0])
    await batcher.close()


async def test_broken_hook_does_not_stop_the_worker(tiny_model, photos):
    class Broken(BatcherHooks):
        def batch(self, model, size):
            raise RuntimeError("hook bug")

        def model_pass(self, model, seconds, size):
            raise RuntimeError("hook bug")

    batcher = Batcher(Engine(tiny_model), max_wait_ms=0, hooks=[Broken()])
    await batcher.start()
    for request in _requests(photos, 2):
        assert (await asyncio.wait_for(batcher.submit(request), 5)).predictions
    await batcher.close()


async def test_close_fails_queued_requests_and_refuses_new_ones(photos):
    model, gate = gated_tiny_model()
    batcher = Batcher(Engine(model), max_batch_size=1, max_wait_ms=0)
    await batcher.start()
    gate.opened.clear()
    request = _requests(photos, 1)[0]
    computing = asyncio.ensure_future(batcher.submit(request))
    assert await asyncio.to_thread(gate.entered.wait, 30)
    queued = asyncio.ensure_future(batcher.submit(request))
    await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0.01)
    gate.opened.set()
    await asyncio.wait_for(closing, 10)
    for task in (computing, queued):
        with pytest.raises(BatcherClosedError):
            await task
    with pytest.raises(BatcherClosedError):
        await batcher.submit(request)


def test_constructor_rejects_bad_settings(tiny_model):
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        Batcher(Engine(tiny_model), max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(Engine(tiny_model), max_queue=0)


async def test_batches_close_at_max_batch_rows_counting_smoothgrad_copies(tiny_model, photos):
    """SmoothGrad n=8 adds 8 rows to pass 1: with 16 rows a batch, they go two by two; plain requests four."""
    recorder = BatchRecorder(tiny_model.module)
    # No wait for company: the eight requests are queued in one pass of the event loop, before the worker
    # looks, so batches form by rows and size alone (a window would only delay the last one, which cannot fill).
    batcher = Batcher(Engine(tiny_model), max_batch_size=4, max_batch_rows=16, max_wait_ms=0, hooks=[recorder])
    await batcher.start()
    image = next(iter(photos.values()))
    smooth = [Request(image=image, method="slgs", saliency="smoothgrad:n=8,sigma=0.2") for _ in range(4)]
    plain = [Request(image=image, method="slgs", saliency="gradient") for _ in range(4)]
    # Queue order: 8, 8, 8, 1 | 1, 1, 8, 1: batches [8, 8], [8, 1, 1, 1], [8, 1].
    order = [smooth[0], smooth[1], smooth[2], plain[0], plain[1], plain[2], smooth[3], plain[3]]
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(r) for r in order)), 20)
    await batcher.close()
    assert [size for size, _ in recorder.passes] == [2, 4, 2]
    assert [r.batch_size for r in results] == [2, 2, 4, 4, 4, 4, 2, 2]
    engine = Engine(make_tiny_model())
    for request, result in zip(order, results):
        _same(result, engine.run([request])[0])


async def test_one_request_over_max_batch_rows_runs_alone(tiny_model, photos):
    batcher = Batcher(Engine(tiny_model), max_batch_size=4, max_batch_rows=4, max_wait_ms=50)
    await batcher.start()
    image = next(iter(photos.values()))
    requests = [Request(image=image, method="slgs", saliency="smoothgrad:n=8")] * 2
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(r) for r in requests)), 20)
    await batcher.close()
    assert [r.batch_size for r in results] == [1, 1]


def test_max_batch_rows_default_follows_the_device(tiny_model):
    from elgs.batcher import CPU_MAX_BATCH_ROWS, default_max_batch_rows

    assert Batcher(Engine(tiny_model), max_batch_size=4).max_batch_rows == CPU_MAX_BATCH_ROWS == 8
    assert default_max_batch_rows("cuda", 32) == 256 and default_max_batch_rows("cpu", 32) == 8
    with pytest.raises(ValueError, match="max_batch_rows must be >= 1, got 0"):
        Batcher(Engine(tiny_model), max_batch_rows=0)


def test_pack_forms_the_batches_the_worker_would(tiny_model, photos):
    image = next(iter(photos.values()))
    batcher = Batcher(Engine(tiny_model), max_batch_size=3, max_batch_rows=8)
    smooth, plain = Request(image=image, method="slgs", saliency="smoothgrad:n=8"), Request(image=image, task="classify")
    sizes = [len(batch) for batch in batcher.pack([smooth, plain, plain, plain, plain, smooth, smooth])]
    assert sizes == [1, 3, 1, 1, 1]  # [8] [1 1 1] [1] [8] [8]
    assert all(r.lam is not None for batch in batcher.pack([smooth]) for r in batch)  # resolved
