"""The Ray ingress's admission (issue 18) without Ray: DeploymentGate's queue, estimate, shedding and replica loss."""

from __future__ import annotations

import asyncio
import time

import pytest

from elgs.api.ray_gate import DEADLINE_MARGIN, REPLACEMENT_OVERHEAD_S, DeploymentGate, NoReplicaError
from elgs.batcher import QueueFullError


def _gate(**overrides) -> DeploymentGate:
    values = {"max_ongoing_requests": 2, "max_queue": 4, "seconds_per_request": 1.0, "request_timeout_s": 10.0,
              "startup_s": 20.0}
    values.update(overrides)
    return DeploymentGate("m", **values)


def _in(seconds: float) -> float:
    return time.monotonic() + seconds


async def _settle() -> None:
    """Let the woken tasks run (a future's result reaches its task one loop turn later)."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_admits_while_the_expected_answer_is_within_the_deadline_and_says_when_to_come_back():
    gate = _gate(max_queue=100)
    for _ in range(7):  # the 8th request ahead: answer expected in 8 s = the margin of a 10 s deadline
        gate.admit(_in(10))
    assert gate.expected_wait_s() == pytest.approx(8.0)
    with pytest.raises(QueueFullError, match="answer is expected in 8 s .7 requests ahead.") as refused:
        gate.admit(_in(9.9))
    assert refused.value.retry_after_s == 1  # 8 s - 0.8 x 10 s, rounded up to the 1 s floor
    for _ in range(5):
        gate.admit(_in(100))
    with pytest.raises(QueueFullError) as refused:
        gate.admit(_in(10))
    assert refused.value.retry_after_s == 13 - DEADLINE_MARGIN * 10  # 13 s expected, 8 s allowed
    gate.set_replicas(2)  # twice the replicas: half the wait
    assert gate.expected_wait_s() == pytest.approx(6.5)
    gate.admit(_in(10))


def test_a_full_queue_is_refused_whatever_the_deadline():
    gate = _gate(seconds_per_request=0.001, max_queue=3)
    tickets = [gate.admit(_in(60)) for _ in range(2 + 3)]  # 2 places at Ray + 3 waiting
    with pytest.raises(QueueFullError, match="queue of model 'm' is full"):
        gate.admit(_in(60))
    tickets[0].release()
    tickets[0].release()  # idempotent
    gate.admit(_in(60))


async def test_at_most_the_replicas_capacity_is_at_ray_and_the_rest_waits_in_order():
    gate = _gate(seconds_per_request=0.01)
    tickets = [gate.admit(_in(60)) for _ in range(4)]
    await gate.acquire(tickets[0])
    await gate.acquire(tickets[1])
    waiting = [asyncio.ensure_future(gate.acquire(t)) for t in tickets[2:]]
    await _settle()
    assert gate.sent == 2 and len(gate.waiting) == 2 and not any(w.done() for w in waiting)
    gate.answered(tickets[0])
    await _settle()
    assert waiting[0].done() and not waiting[1].done() and gate.sent == 2
    tickets[1].release()
    await asyncio.gather(*waiting)
    assert [t.state for t in tickets] == ["released", "released", "sent", "sent"]


async def test_a_waiting_request_is_shed_once_the_estimate_puts_its_answer_after_its_deadline():
    gate = _gate(seconds_per_request=0.01)
    first, second = gate.admit(_in(60)), gate.admit(_in(60))
    await gate.acquire(first)
    await gate.acquire(second)
    next_up, late = gate.admit(_in(3)), gate.admit(_in(3))
    waiting = [asyncio.ensure_future(gate.acquire(t)) for t in (next_up, late)]
    await _settle()
    assert not any(w.done() for w in waiting)
    first.sent_at -= 10  # its answer took 10 s with 1 request at Ray: about 2 s a request from now on
    gate.answered(first)
    await waiting[0]  # the free place goes to the next in line (its replica checks its deadline again)
    with pytest.raises(QueueFullError, match="after this request's deadline"):  # 3 ahead x 2 s > 3 s left
        await waiting[1]
    assert gate.seconds_per_request == pytest.approx(0.01 + 0.2 * (10 - 0.01), rel=1e-3)
    assert gate.ahead == 2 and late.released and next_up.state == "sent"


async def test_losing_the_last_replica_refuses_at_once_with_the_time_a_replacement_takes():
    gate = _gate(seconds_per_request=0.01, max_ongoing_requests=1)
    at_ray, queued = gate.admit(_in(60)), gate.admit(_in(60))
    await gate.acquire(at_ray)
    lost = gate.lost()
    waiting = asyncio.ensure_future(gate.acquire(queued))
    await _settle()
    gate.set_replicas(0)
    assert lost.done()
    with pytest.raises(NoReplicaError, match="no replica of model 'm' is running") as refused:
        await waiting
    assert refused.value.retry_after_s == 20 + REPLACEMENT_OVERHEAD_S
    with pytest.raises(NoReplicaError):
        gate.admit(_in(60))
    gate.lost_at -= 15  # a replacement answers 15 s after the loss: the next outage's estimate
    gate.set_replicas(1)
    assert gate.replacement_s == pytest.approx(15, abs=0.5)
    assert not gate.lost().done()
    gate.admit(_in(60))


async def test_a_request_still_waiting_at_its_deadline_gets_503_and_gives_its_place_back():
    gate = _gate(seconds_per_request=0.001, max_ongoing_requests=1)
    stuck = gate.admit(_in(60))
    await gate.acquire(stuck)  # its replica never answers
    waiting = gate.admit(_in(0.2))
    with pytest.raises(QueueFullError, match="took the request before its deadline"):
        await gate.acquire(waiting)
    assert waiting.released and gate.ahead == 1 and not gate.waiting
