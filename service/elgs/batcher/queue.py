"""The requests waiting for a batch, and the places held for requests still arriving.

A :class:`RequestQueue` knows the load admission counts (queued rows, reserved places, batches
computing) and closes batches by the rules of its :class:`~elgs.batcher.admission.AdmissionPolicy`
and ``max_wait_s``. All times are readings of the batcher's clock (``time.monotonic`` unless injected).
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elgs.batcher.admission import AdmissionPolicy, BatchTimeEstimate, Load
from elgs.batcher.errors import DeadlineExceededError, QueueFullError
from elgs.batcher.hooks import HookCaller
from elgs.engine import Request, Result, pass_one_rows


@dataclass(eq=False)
class QueuedRequest:
    """One request in the queue: resolved, with the future its caller awaits."""

    request: Request
    future: asyncio.Future
    enqueued: float  # clock reading
    deadline: float  # clock reading
    finish: Callable[[Result], Any] | None = None
    rows: int = 1  # rows in pass 1 (elgs.engine.pass_one_rows)


class RequestQueue:
    """FIFO of :class:`QueuedRequest` plus reserved places; closes batches for the worker.

    Args:
        policy: the packing and admission rules.
        notify: the batcher's hooks (``queue_depth``, ``queue_wait``, ``dropped``).
        clock: seconds, monotonic; ``enqueued`` and ``deadline`` of the requests are its readings.
        max_wait_s: a batch that can still take requests closes this long after its first was queued.
    """

    def __init__(self, policy: AdmissionPolicy, notify: HookCaller, clock: Callable[[], float],
                 max_wait_s: float) -> None:
        self.policy = policy
        self.notify = notify
        self.clock = clock
        self.max_wait_s = max_wait_s
        self.pending: collections.deque[QueuedRequest] = collections.deque()
        self.reserved = 0  # places held by reservations, not queued yet
        self.computing = 0  # batches in the compute thread
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self.pending)

    def load(self) -> Load:
        return Load(tuple(item.rows for item in self.pending), self.reserved, self.computing)

    def hold_place(self) -> None:
        self.reserved += 1

    def free_place(self) -> None:
        self.reserved -= 1

    def put(self, item: QueuedRequest) -> None:
        self.pending.append(item)
        self._arrived.set()
        self.notify("queue_depth", len(self.pending))

    async def answer(self, request: Request, *, deadline: float, finish: Callable[[Result], Any] | None) -> Any:
        """Queue ``request`` (resolved, admitted) and wait for its outcome until ``deadline``; a request whose
        caller stops waiting (cancelled, or the deadline passed) leaves the queue.

        Raises:
            DeadlineExceededError: no answer before the deadline.
            Exception: what the worker settled the request with.
        """
        now = self.clock()
        item = QueuedRequest(request=request, future=asyncio.get_running_loop().create_future(), enqueued=now,
                             deadline=deadline, finish=finish, rows=pass_one_rows(request))
        self.put(item)
        try:
            return await asyncio.wait_for(item.future, timeout=max(deadline - now, 0.0))
        except TimeoutError:
            self.discard(item, "deadline")
            raise DeadlineExceededError(
                f"no answer within {deadline - now:.3g} s ({len(self.pending)} requests still queued for model "
                f"{self.policy.model!r}); retry later or raise ELGS_REQUEST_TIMEOUT_S"
            ) from None
        except asyncio.CancelledError:
            self.discard(item, "cancelled")
            raise

    def discard(self, item: QueuedRequest, reason: str) -> None:
        """Take a request whose caller stopped waiting out of the queue, if it is still there."""
        try:
            self.pending.remove(item)
        except ValueError:
            return  # already in a batch: its result will be ignored
        self.notify("dropped", reason)
        self.notify("queue_depth", len(self.pending))

    def fail_all(self, error: Callable[[], BaseException]) -> None:
        """Empty the queue, failing each waiting request with ``error()``."""
        while self.pending:
            item = self.pending.popleft()
            if not item.future.done():
                item.future.set_exception(error())
        self.notify("queue_depth", 0)

    async def next_batch(self, batch_time: BatchTimeEstimate) -> list[QueuedRequest]:
        """Wait for a non-empty batch of live requests, closed by the policy's size and rows or by
        ``max_wait_s``; requests cancelled or that would be answered after their deadline are left out."""
        while True:
            while not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
            await self._wait_for_company()
            taken = [self.pending.popleft() for _ in range(self.policy.next_batch_length(self.rows()))]
            self.notify("queue_depth", len(self.pending))
            batch = self._live(taken, batch_time)
            if batch:
                return batch

    def rows(self) -> list[int]:
        return [item.rows for item in self.pending]

    async def _wait_for_company(self) -> None:
        """Wait while the queued requests fit one batch with room left, until ``max_wait_s`` after the first."""
        close_at = self.pending[0].enqueued + self.max_wait_s
        while self.pending and self.policy.has_room(self.rows()):
            remaining = close_at - self.clock()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _live(self, taken: list[QueuedRequest], batch_time: BatchTimeEstimate) -> list[QueuedRequest]:
        """``taken`` less the requests already settled (cancelled) or that would finish after their deadline
        (the caller has a 504 by then: never compute them)."""
        now = self.clock()
        batch = []
        for item in taken:
            if item.future.done():
                continue
            if self.policy.starts_too_late(item.deadline, now, batch_time):
                item.future.set_exception(DeadlineExceededError(
                    f"the deadline passed while queued for model {self.policy.model!r}"))
                self.notify("dropped", "deadline")
                continue
            self.notify("queue_wait", now - item.enqueued)
            batch.append(item)
        return batch

    def shed_late(self, batch_time: BatchTimeEstimate) -> None:
        """Refuse (503) the queued requests that, by the batch time just measured, would be answered
        after their deadline: admitted on an estimate that turned out short (load rose), they learn
        now rather than at their 504. The queue is served in order, so position gives the wait."""
        if not self.pending:
            return
        now = self.clock()
        # A settled request (its caller gone) is never late: it keeps its place, as in the worker's packing.
        late = self.policy.late([(item.rows, math.inf if item.future.done() else item.deadline)
                                 for item in self.pending], now, batch_time.seconds)
        if not late:
            return
        for position, finish in late.items():
            item = self.pending[position]
            item.future.set_exception(QueueFullError(
                self.policy.model, self.policy.max_queue, max(1, math.ceil(finish - item.deadline)), reason=(
                    f"model {self.policy.model!r} is slower than when this request was admitted: its answer is "
                    f"now expected {finish - item.enqueued:.3g} s after it arrived, after its deadline")))
            self.notify("dropped", "shed")
        self.pending = collections.deque(item for position, item in enumerate(self.pending) if position not in late)
        self.notify("queue_depth", len(self.pending))
