"""Admission at the Ray Serve ingress (issue 18): refuse at once what the model replicas cannot answer in time.

Behind a ``DeploymentHandle`` a request waits in Ray's router queue, where nobody checks its deadline: a
flood of 200 got 98 answers of 504 after 30 s. The ingress therefore keeps the queue itself. A
:class:`DeploymentGate` per model deployment lets at most ``running replicas x max_ongoing_requests``
requests be at Ray (what the replicas take at once), queues the rest here in order, and

* refuses a request before its body is read when ``max_queue`` are waiting or its answer is expected after
  its deadline (:class:`~elgs.batcher.QueueFullError`: 503 with ``Retry-After``);
* refuses a waiting request as soon as a new estimate says its answer would come too late (shedding);
* refuses everything at once, with the expected time until a replacement answers as ``Retry-After``, while
  no replica of the model is running.

The expected wait is ``(requests ahead + 1) x seconds per request / running replicas``; the seconds per
request are learned from the answers (an exponential average of ``latency x replicas / requests at Ray
when it was sent``), starting from the replicas' warm-up batch time. Pure asyncio: no Ray import.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass

from elgs.batcher import QueueFullError

# Weight of a new latency sample in the average seconds per request.
COST_WEIGHT = 0.2
# An answer expected within this fraction of the time left is admitted: room for the estimate's error,
# since a request admitted and then late costs its client the whole deadline (504).
DEADLINE_MARGIN = 0.8
# Seconds a replacement replica is expected to take beyond its own start-up (Ray notices the loss and
# schedules it) when no replacement was seen yet.
REPLACEMENT_OVERHEAD_S = 3.0


class NoReplicaError(QueueFullError):
    """No replica of the model is running: 503 with the expected time until a replacement answers."""


@dataclass(eq=False)
class GateTicket:
    """One admitted request: counted by its gate from admission until :meth:`release` (idempotent)."""

    gate: DeploymentGate
    deadline: float  # time.monotonic()
    batcher: object = None  # what admitted it (the admission middleware compares it with the route's)
    state: str = "reserved"  # reserved (arriving, decoding) -> counted -> waiting -> sent -> released
    sent_at: float = 0.0
    ahead_at_send: int = 0
    future: asyncio.Future | None = None  # set while waiting for a place at Ray

    @property
    def released(self) -> bool:
        return self.state == "released"

    def release(self) -> None:
        self.gate._leave(self)


class DeploymentGate:
    """The ingress's queue and admission for one model deployment.

    Args:
        model: the model's name (for messages).
        max_ongoing_requests: requests one replica takes at once (its deployment's setting).
        max_queue: most requests admitted and not yet at Ray.
        seconds_per_request: the first estimate of one request's time on one replica (the warm-up batch time).
        request_timeout_s: the deadline of a request admitted now (for ``Retry-After``).
        startup_s: how long a replica took to start (load and warm-up), for ``Retry-After`` while none runs.
        replicas: replicas running now.
    """

    def __init__(self, model: str, *, max_ongoing_requests: int, max_queue: int, seconds_per_request: float,
                 request_timeout_s: float = 30.0, startup_s: float = 30.0, replicas: int = 1) -> None:
        if max_ongoing_requests < 1 or max_queue < 1:
            raise ValueError(f"max_ongoing_requests and max_queue must be >= 1, got {max_ongoing_requests}, "
                             f"{max_queue}")
        self.model = model
        self.max_ongoing_requests = max_ongoing_requests
        self.max_queue = max_queue
        self.seconds_per_request = max(seconds_per_request, 1e-3)
        self.request_timeout_s = request_timeout_s
        self.replacement_s = startup_s + REPLACEMENT_OVERHEAD_S
        self.replicas = replicas
        self.reserved = 0
        self.sent = 0
        self.waiting: collections.deque[GateTicket] = collections.deque()
        self.lost_at: float | None = None if replicas > 0 else time.monotonic()
        self._lost: asyncio.Future | None = None

    # Admission ----------------------------------------------------------------------------------

    @property
    def ahead(self) -> int:
        """Requests admitted and not answered yet."""
        return self.reserved + len(self.waiting) + self.sent

    @property
    def slots(self) -> int:
        return self.replicas * self.max_ongoing_requests

    def expected_wait_s(self, ahead: int | None = None) -> float:
        """Seconds until a request with ``ahead`` requests before it (default: all admitted) is answered."""
        ahead = self.ahead if ahead is None else ahead
        return (ahead + 1) * self.seconds_per_request / max(self.replicas, 1)

    def check(self, deadline: float) -> None:
        """Raise what a request due at ``deadline`` (``time.monotonic()``) would meet now.

        Raises:
            NoReplicaError: no replica is running.
            QueueFullError: ``max_queue`` requests wait here, or the answer is expected after the deadline.
        """
        if self.replicas <= 0:
            raise self.no_replica_error()
        if self.ahead - self.slots >= self.max_queue:
            raise QueueFullError(self.model, self.max_queue, self._retry_after(self.ahead))
        wait, left = self.expected_wait_s(), deadline - time.monotonic()
        if wait > DEADLINE_MARGIN * left:
            raise self._late_error(wait, left, self.ahead)

    def admit(self, deadline: float) -> GateTicket:
        """:meth:`check`, then count the request until its ticket is released."""
        self.check(deadline)
        self.reserved += 1
        return GateTicket(gate=self, deadline=deadline)

    def no_replica_error(self) -> NoReplicaError:
        since = time.monotonic() - (self.lost_at or time.monotonic())
        retry_after = max(1, math.ceil(self.replacement_s - since))
        return NoReplicaError(self.model, self.max_queue, retry_after, reason=(
            f"no replica of model {self.model!r} is running; a replacement is expected to answer in about "
            f"{retry_after} s"))

    def _late_error(self, wait: float, left: float, ahead: int) -> QueueFullError:
        return QueueFullError(self.model, self.max_queue, self._retry_after(ahead), reason=(
            f"model {self.model!r} is busy: an answer is expected in {wait:.3g} s ({ahead} requests ahead), "
            f"after this request's deadline in {max(left, 0):.3g} s"))

    def _retry_after(self, ahead: int) -> int:
        """Seconds until a request with a full deadline would be admitted if nothing else arrived: the requests
        ahead drain below ``max_queue`` waiting and an answer is expected within the deadline (at least 1)."""
        per_request = self.seconds_per_request / max(self.replicas, 1)
        over_length = (ahead - self.slots - self.max_queue + 1) * per_request
        over_wait = self.expected_wait_s(ahead) - DEADLINE_MARGIN * self.request_timeout_s
        return max(1, math.ceil(max(over_length, over_wait)))

    # Places at Ray ------------------------------------------------------------------------------

    async def acquire(self, ticket: GateTicket) -> None:
        """Wait for a place at Ray for ``ticket`` (admitted by :meth:`admit`), in arrival order.

        Raises:
            QueueFullError: shed, the answer would now come after its deadline.
            NoReplicaError: the last replica went away while it waited.
        """
        if self.replicas <= 0:
            raise self.no_replica_error()
        self._count_out(ticket)
        if self.sent < self.slots and not self.waiting:
            self._send(ticket)
            return
        ticket.state, ticket.future = "waiting", asyncio.get_running_loop().create_future()
        self.waiting.append(ticket)
        self._shed()
        try:
            # shield: a timeout must not cancel a future _wake may just have resolved (the place would leak)
            await asyncio.wait_for(asyncio.shield(ticket.future), max(0.0, ticket.deadline - time.monotonic()))
        except TimeoutError:  # no place freed before the deadline (replicas stuck): never sent, so 503
            self._leave(ticket)
            raise QueueFullError(self.model, self.max_queue, self._retry_after(self.ahead), reason=(
                f"no replica of model {self.model!r} took the request before its deadline")) from None
        except BaseException:
            self._leave(ticket)
            raise

    def answered(self, ticket: GateTicket) -> None:
        """``ticket``'s answer came from a replica: learn the time per request from it, free its place."""
        if ticket.state == "sent" and self.replicas > 0:
            latency = time.monotonic() - ticket.sent_at
            sample = latency * self.replicas / max(ticket.ahead_at_send, 1)
            self.seconds_per_request += COST_WEIGHT * (sample - self.seconds_per_request)
        self._leave(ticket)
        self._shed()

    def resend(self, ticket: GateTicket) -> None:
        """``ticket``'s replica died: it goes to Ray again without waiting (it holds its place)."""
        if ticket.state == "sent":
            ticket.sent_at, ticket.ahead_at_send = time.monotonic(), self.sent

    def lost(self) -> asyncio.Future:
        """A future set when the last replica goes away (requests at Ray then stop waiting for theirs)."""
        if self._lost is None or self._lost.done():
            self._lost = asyncio.get_running_loop().create_future()
            if self.replicas <= 0:
                self._lost.set_result(None)
        return self._lost

    def _count_out(self, ticket: GateTicket) -> None:
        if ticket.state == "reserved":
            self.reserved -= 1
            ticket.state = "counted"

    def _send(self, ticket: GateTicket) -> None:
        self.sent += 1
        ticket.state, ticket.sent_at, ticket.ahead_at_send = "sent", time.monotonic(), self.sent
        ticket.future = None

    def _leave(self, ticket: GateTicket) -> None:
        if ticket.state == "reserved":
            self.reserved -= 1
        elif ticket.state == "sent":
            self.sent -= 1
        elif ticket.state == "waiting":
            self.waiting.remove(ticket)
        ticket.state = "released"
        self._wake()

    def _wake(self) -> None:
        """Give free places at Ray to the first waiting requests."""
        while self.waiting and self.sent < self.slots:
            ticket = self.waiting.popleft()
            future = ticket.future
            self._send(ticket)
            if future is not None and not future.done():
                future.set_result(None)

    def _shed(self) -> None:
        """Refuse the waiting requests whose answer is now expected after their deadline."""
        now, kept = time.monotonic(), 0
        for ticket in list(self.waiting):
            wait = self.expected_wait_s(self.sent + kept)
            if wait > ticket.deadline - now:
                self.waiting.remove(ticket)
                ticket.state = "released"
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_exception(self._late_error(wait, ticket.deadline - now, self.sent + kept))
            else:
                kept += 1

    # Replicas -----------------------------------------------------------------------------------

    def set_replicas(self, running: int) -> None:
        """``running`` replicas of the deployment answer now (from ``serve.status()``)."""
        previous, self.replicas = self.replicas, max(0, running)
        now = time.monotonic()
        if self.replicas == 0 and previous > 0:
            self.lost_at = now
            for ticket in list(self.waiting):
                self.waiting.remove(ticket)
                ticket.state = "released"
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_exception(self.no_replica_error())
            if self._lost is not None and not self._lost.done():
                self._lost.set_result(None)
        elif self.replicas > 0 and previous == 0 and self.lost_at is not None:
            self.replacement_s = now - self.lost_at  # the next outage's Retry-After: this one's length
            self.lost_at = None
        self._wake()
        self._shed()
