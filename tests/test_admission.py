"""Batcher admission (issue 11): expected wait against the deadline, reservations, an honest
Retry-After, no compute after the deadline, and the one-by-one retry that stops at a broken model.

The batch time is set through the batcher's public estimate (``batch_time``) rather than measured, so
no assert depends on how fast this machine is; the policy alone is checked with numbers.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from elgs.batcher import AdmissionPolicy, Batcher, BatchTimeEstimate, DeadlineExceededError, Load, QueueFullError
from elgs.engine import Engine, Request

from tests.api.helpers import gated_tiny_model
from tests.conftest import make_tiny_model


def _request(size: int = 32) -> Request:
    return Request(image=torch.rand(3, size, size), task="classify")


class _CountingEngine(Engine):
    """Counts ``run_round`` calls (the batcher's); fails as ``fail(requests)`` says (an exception to raise, or None)."""

    def __init__(self, model, fail):
        super().__init__(model)
        self.calls: list[int] = []
        self.fail = fail

    def run_round(self, requests):
        self.calls.append(len(requests))
        error = self.fail(requests)
        if error is not None:
            raise error
        return super().run_round(requests)


async def _batcher(engine_or_model, **options) -> Batcher:
    engine = engine_or_model if isinstance(engine_or_model, Engine) else Engine(engine_or_model)
    batcher = Batcher(engine, **{"max_batch_size": 1, "max_wait_ms": 0, **options})
    await batcher.start()
    return batcher


async def test_expected_wait_counts_the_computing_batch_the_queue_and_the_reserved():
    model, gate = gated_tiny_model()
    batcher = await _batcher(model, max_batch_size=2, request_timeout_s=100)
    batcher.batch_time.add(2.0)
    try:
        assert batcher.expected_wait_s() == 2.0  # idle: its own batch
        gate.opened.clear()
        computing = asyncio.ensure_future(batcher.submit(_request()))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        assert batcher.expected_wait_s() == 4.0  # the batch in compute, then its own
        queued = [asyncio.ensure_future(batcher.submit(_request())) for _ in range(3)]
        await asyncio.sleep(0)
        reservation = batcher.reserve()
        # 1 computing + ceil((3 queued + 1 reserved + itself) / 2) = 1 + 3 batches
        assert (batcher.depth, batcher.reserved, batcher.expected_wait_s()) == (3, 1, 8.0)
        reservation.release()
        reservation.release()  # idempotent
        assert batcher.reserved == 0
        gate.opened.set()
        await asyncio.wait_for(asyncio.gather(computing, *queued), 10)
    finally:
        gate.opened.set()
        await batcher.close()


async def test_a_request_expected_after_its_deadline_is_refused_with_an_honest_retry_after():
    model, gate = gated_tiny_model()
    batcher = await _batcher(model, request_timeout_s=5)
    batcher.batch_time.add(2.0)
    gate.opened.clear()
    try:
        first = asyncio.ensure_future(batcher.submit(_request()))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        second = asyncio.ensure_future(batcher.submit(_request()))  # expected at 4 s <= 5 s
        await asyncio.sleep(0)
        assert batcher.depth == 1
        with pytest.raises(QueueFullError, match="after this request's deadline") as refused:
            batcher.reserve(time.monotonic() + 5)  # expected at 6 s > 5 s
        # After Retry-After seconds (nothing else arriving) the same request fits: 6 - 1 <= 5.
        assert refused.value.retry_after_s == 1
        assert refused.value.retry_after_s < batcher.request_timeout_s
        with pytest.raises(QueueFullError):
            await batcher.submit(_request(), deadline=time.monotonic() + 5)  # submit applies the same rule
        longer = time.monotonic() + 7
        held = batcher.reserve(longer)  # a longer deadline fits: expected at 6 s <= 7 s
        assert (held.deadline, held.released, batcher.reserved) == (longer, False, 1)
        with pytest.raises(QueueFullError, match="after this request's deadline"):
            batcher.reserve(time.monotonic() + 7)  # the held place counts: the next is expected at 8 s > 7 s
        held.release()
        assert batcher.reserved == 0
        gate.opened.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
    finally:
        gate.opened.set()
        await batcher.close()


async def test_the_length_rule_counts_reservations_and_submit_takes_over_the_reservation_handed_to_it():
    batcher = await _batcher(make_tiny_model(), max_queue=2)
    try:
        other = batcher.reserve()
        held = batcher.reserve()
        with pytest.raises(QueueFullError, match="full"):
            batcher.reserve()
        with pytest.raises(QueueFullError, match="full"):
            await batcher.submit(_request())  # no reservation handed over: admitted anew, and the queue is full
        # Handed its reservation, submit queues the request in the reserved place (no second check).
        result = await asyncio.wait_for(batcher.submit(_request(), reservation=held), 10)
        assert result.predictions and held.released and not other.released and batcher.reserved == 1
        other.release()
        assert batcher.reserved == 0
    finally:
        await batcher.close()


async def test_submit_keeps_the_deadline_of_the_reservation_handed_to_it():
    batcher = await _batcher(make_tiny_model())
    try:
        late = batcher.reserve(time.monotonic() - 1)  # admitted (no batch time measured yet), but already due
        with pytest.raises(DeadlineExceededError, match="no answer within -1"):
            await batcher.submit(_request(), reservation=late)
        assert late.released and batcher.reserved == 0
    finally:
        await batcher.close()


async def test_admission_reads_the_injected_clock():
    now = [1000.0]
    batcher = await _batcher(make_tiny_model(), request_timeout_s=100, clock=lambda: now[0],
                             batch_time=BatchTimeEstimate(seconds=2.0, samples=1))
    try:
        batcher.check_capacity(deadline=1002.0)  # its own batch, 2 s: due in 2 s, fits
        now[0] = 1000.5
        with pytest.raises(QueueFullError, match="after this request's deadline in 1.5 s"):
            batcher.check_capacity(deadline=1002.0)
        reservation = batcher.reserve()
        assert reservation.deadline == 1100.5  # the clock's now + request_timeout_s
        reservation.release()
    finally:
        await batcher.close()


def test_the_policy_counts_batches_of_the_queued_the_reserved_and_the_computing():
    policy = AdmissionPolicy("m", max_batch_size=2, max_batch_rows=8, max_queue=4, request_timeout_s=5)
    measured = BatchTimeEstimate(seconds=2.0, samples=1)
    load = Load(queued_rows=(1, 1, 1), reserved=1, computing=1)
    assert policy.expected_wait_s(load, 2.0) == 8.0  # 1 computing + ceil((4 ahead + itself) / 2) = 4 batches
    assert policy.expected_wait_s(load, 2.0, ahead=1) == 4.0  # 1 computing + [1, itself]
    # Full (4 ahead, max_queue 4): wait until the queue drains to 3 (2 s) and the expected wait falls to 5 s (3 s).
    full = policy.refusal(load, measured, time_left=100.0)
    assert "is full" in str(full) and full.retry_after_s == 3
    light = Load(queued_rows=(1,), computing=1)  # expected in (1 + 1) * 2 = 4 s
    assert policy.refusal(light, measured, time_left=4.0) is None
    late = policy.refusal(light, measured, time_left=3.9)
    assert "expected in 4 s" in str(late) and late.retry_after_s == 1
    assert policy.refusal(light, BatchTimeEstimate(seconds=2.0), time_left=0.1) is None  # unmeasured: length only


def test_the_policy_packs_by_rows_and_finds_the_late_requests():
    policy = AdmissionPolicy("m", max_batch_size=2, max_batch_rows=8, max_queue=10, request_timeout_s=5)
    assert policy.batch_numbers([1, 8, 1, 1, 8]) == [0, 1, 2, 2, 3]
    assert policy.next_batch_length([1, 8, 1]) == 1 and policy.next_batch_length([]) == 0
    assert policy.has_room([1]) and not policy.has_room([1, 1]) and not policy.has_room([8])
    # Served in order from 0 with 2 s batches: [1] ends at 2 (due 3), [8] at 4 (due 100), [1] at 6 (due 4.5).
    assert policy.late([(1, 3.0), (8, 100.0), (1, 4.5)], now=0.0, batch_seconds=2.0) == {2: 6.0}
    # A late request leaves the queue, so those behind it move up a batch.
    assert policy.late([(8, 1.0), (8, 2.0), (8, 4.0)], now=0.0, batch_seconds=2.0) == {0: 2.0}
    measured, unmeasured = BatchTimeEstimate(seconds=2.0, samples=1), BatchTimeEstimate(seconds=2.0)
    assert policy.starts_too_late(deadline=1.5, now=0.0, batch_time=measured)
    assert not policy.starts_too_late(deadline=1.5, now=0.0, batch_time=unmeasured)  # no measure yet: 0 s


async def test_a_request_that_cannot_finish_before_its_deadline_is_not_computed():
    model = make_tiny_model()
    engine = _CountingEngine(model, fail=lambda requests: None)
    batcher = await _batcher(engine, max_batch_size=2, max_wait_ms=500, request_timeout_s=30)
    try:
        # Admitted while no batch time is known; the batch closes 0.5 s later.
        submitted = asyncio.ensure_future(batcher.submit(_request(), deadline=time.monotonic() + 2.0))
        await asyncio.sleep(0)
        assert batcher.depth == 1
        batcher.batch_time.add(5.0)  # meanwhile a batch turned out to take 5 s: it would end after the deadline
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(submitted, 10)
        assert engine.calls == []
    finally:
        await batcher.close()


async def test_the_one_by_one_retry_stops_at_a_failure_that_is_not_the_requests_own():
    engine = _CountingEngine(make_tiny_model(), fail=lambda requests: RuntimeError("the device is gone"))
    batcher = await _batcher(engine, max_batch_size=4, max_wait_ms=2000)
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(
            *(batcher.submit(_request()) for _ in range(4)), return_exceptions=True), 10)
        assert all(isinstance(o, RuntimeError) and "device is gone" in str(o) for o in outcomes)
        assert engine.calls == [4, 1]  # the batch, then one retry: not four
    finally:
        await batcher.close()


async def test_the_one_by_one_retry_goes_on_past_a_bad_input():
    bad = _request()

    def fail(requests):
        return ValueError("this image is bad") if any(r.image is bad.image for r in requests) else None

    engine = _CountingEngine(make_tiny_model(), fail=fail)
    batcher = await _batcher(engine, max_batch_size=4, max_wait_ms=2000)
    try:
        requests = [_request(), bad, _request(), _request()]
        outcomes = await asyncio.wait_for(asyncio.gather(
            *(batcher.submit(r) for r in requests), return_exceptions=True), 10)
        assert isinstance(outcomes[1], ValueError)
        assert all(o.predictions for i, o in enumerate(outcomes) if i != 1)
        assert engine.calls == [4, 1, 1, 1, 1]
    finally:
        await batcher.close()


async def test_queued_requests_that_a_slower_batch_makes_late_are_refused_at_once_not_at_their_deadline():
    model, gate = gated_tiny_model()
    batcher = await _batcher(model, request_timeout_s=30)
    gate.opened.clear()
    try:
        # Admitted while no batch time was known (the length rule only) ...
        computing = asyncio.ensure_future(batcher.submit(_request()))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        queued = [asyncio.ensure_future(batcher.submit(_request(), deadline=time.monotonic() + 20)) for _ in range(2)]
        await asyncio.sleep(0)
        # ... then the batches turn out to take 100 s: neither queued request can make its 20 s deadline.
        batcher.batch_time.add(100.0)
        started = time.monotonic()
        gate.opened.set()
        assert (await asyncio.wait_for(computing, 10)).predictions
        for refused in queued:
            with pytest.raises(QueueFullError, match="slower than when this request was admitted") as error:
                await asyncio.wait_for(refused, 10)
            assert error.value.retry_after_s >= 1
        assert time.monotonic() - started < 10  # told at once, not at the deadline
        assert batcher.depth == 0
    finally:
        gate.opened.set()
        await batcher.close()


async def test_expected_wait_packs_the_queue_by_pass_one_rows():
    """Three queued SmoothGrad n=8 requests with 16 rows a batch: two batches, not one of four."""
    model, gate = gated_tiny_model()
    batcher = await _batcher(model, max_batch_size=4, max_batch_rows=16, max_wait_ms=0, request_timeout_s=100)
    batcher.batch_time.add(1.0)
    smooth = Request(image=torch.rand(3, 32, 32), method="slgs", saliency="smoothgrad:n=8")
    try:
        gate.opened.clear()
        computing = asyncio.ensure_future(batcher.submit(_request()))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        queued = [asyncio.ensure_future(batcher.submit(smooth)) for _ in range(3)]
        await asyncio.sleep(0)
        # 1 computing + [8, 8] [8, +itself at the queue's mean 8] = 1 + 2 batches
        assert batcher.depth == 3 and batcher.expected_wait_s() == 3.0
        assert batcher.expected_wait_s(ahead=1) == 2.0  # [8, itself]
        gate.opened.set()
        await asyncio.wait_for(asyncio.gather(computing, *queued), 30)
    finally:
        gate.opened.set()
        await batcher.close()
