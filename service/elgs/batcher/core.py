"""The :class:`Batcher`: one per model, what the API and a Ray replica call (docs/design.md, section 4).

It puts together the admission policy (:mod:`elgs.batcher.admission`), the request queue
(:mod:`elgs.batcher.queue`), the worker task (:mod:`elgs.batcher.worker`) and the executor that runs
a batch in the model's compute thread (:mod:`elgs.batcher.executor`), and owns their life cycle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from elgs.batcher.admission import AdmissionPolicy, BatchTimeEstimate, default_max_batch_rows
from elgs.batcher.errors import BatcherClosedError
from elgs.batcher.executor import BatchExecutor, with_tensors
from elgs.batcher.hooks import BatcherHooks, HookCaller
from elgs.batcher.queue import RequestQueue
from elgs.batcher.worker import QueueWorker
from elgs.compute import ComputeThread
from elgs.engine import Engine, Request, Result, pass_one_rows, resolve_request


@dataclass(eq=False)
class Reservation:
    """A place held in a batcher's queue for a request that is still arriving or decoding.

    Counts against ``max_queue`` and the expected wait until :meth:`release` (idempotent), or until the
    caller hands it to :meth:`Batcher.submit` (``reservation=``), which queues the request in its place.
    """

    batcher: Batcher
    deadline: float  # the batcher's clock (time.monotonic() unless injected)
    released: bool = False

    def holds_place_in(self, batcher: Any) -> bool:
        """Whether this still holds a place in ``batcher``'s queue."""
        return self.batcher is batcher and not self.released

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.batcher.queue.free_place()


class Batcher:
    """Queue, batch and run requests for one model.

    Callers ``await batcher.submit(request)`` from the event loop; the batcher queues the request, closes
    a batch when it holds ``max_batch_size`` requests, when the next request would take its pass 1 past
    ``max_batch_rows`` rows (SmoothGrad's ``n`` copies count, each), or ``max_wait_ms`` after its first
    request arrived, runs :meth:`elgs.engine.Engine.run` in the model's :class:`~elgs.compute.ComputeThread`
    (every torch op of the model runs in that one thread, issue 8) and resolves one future per request.

    Args:
        engine: the engine of the model; ``engine.run_round`` is only ever called from the compute thread.
        max_batch_size: a batch closes when it holds this many requests.
        max_batch_rows: ... or when the next request would take its pass 1 past this many rows (a request
            adds the copies of its saliency estimator, 1 for most; one request alone may exceed it);
            None: :func:`default_max_batch_rows` for the model's device.
        max_wait_ms: ... or this long after its first request was queued.
        max_queue: most requests waiting (not computing) or reserved at once; more raise
            :class:`~elgs.batcher.QueueFullError`.
        request_timeout_s: default time from ``submit`` to the answer before
            :class:`~elgs.batcher.DeadlineExceededError`.
        hooks: observers of queue and batch events (metrics); also the public list :attr:`hooks`.
        compute: the thread that loaded the model, to run it in (the batcher shuts it down on
            :meth:`close`); None starts a new one in :meth:`start`. A model loaded in another thread
            works, but then two threads have run its torch ops: see :mod:`elgs.compute`.
        torch_threads: torch intra-op threads of a compute thread the batcher starts (None:
            ``$ELGS_TORCH_THREADS``, else the available cores).
        clock: monotonic seconds; deadlines given to and returned by the batcher are its readings.
        batch_time: the batch-time estimate admission starts from (default: none measured yet); the
            worker updates it after each batch. Also the public attribute :attr:`batch_time`.

    Example:
        >>> batcher = Batcher(Engine(model), max_batch_size=4, max_wait_ms=5)
        >>> await batcher.start()
        >>> result = await batcher.submit(Request(image=x, task="defend", method="slgs", lam=3.5))
        >>> await batcher.close()
    """

    def __init__(self, engine: Engine, *, max_batch_size: int = 4, max_batch_rows: int | None = None,
                 max_wait_ms: float = 5.0, max_queue: int = 256, request_timeout_s: float = 30.0,
                 hooks: Iterable[BatcherHooks] = (), compute: ComputeThread | None = None,
                 torch_threads: int | None = None, clock: Callable[[], float] = time.monotonic,
                 batch_time: BatchTimeEstimate | None = None) -> None:
        _check_settings(max_batch_size, max_batch_rows, max_wait_ms, max_queue, request_timeout_s)
        self.engine = engine
        self.policy = AdmissionPolicy(
            model=engine.model.name, max_batch_size=max_batch_size, max_queue=max_queue,
            max_batch_rows=(default_max_batch_rows(engine.model.device, max_batch_size)
                            if max_batch_rows is None else max_batch_rows),
            request_timeout_s=request_timeout_s)
        self.hooks: list[BatcherHooks] = list(hooks)
        self.clock = clock
        self.batch_time = BatchTimeEstimate() if batch_time is None else batch_time
        notify = HookCaller(engine.model.name, self.hooks)
        self.queue = RequestQueue(self.policy, notify, clock, max_wait_ms / 1000.0)
        self.worker = QueueWorker(self.queue, BatchExecutor(engine, notify), self.batch_time, clock)
        self._task: asyncio.Task | None = None
        self._compute_thread = compute
        self._torch_threads = torch_threads
        self._closed = False

    # Settings and state ------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.engine.model.name

    @property
    def max_batch_size(self) -> int:
        return self.policy.max_batch_size

    @property
    def max_batch_rows(self) -> int:
        return self.policy.max_batch_rows

    @property
    def max_queue(self) -> int:
        return self.policy.max_queue

    @property
    def request_timeout_s(self) -> float:
        return self.policy.request_timeout_s

    @property
    def max_wait_s(self) -> float:
        """How long a batch with room left waits for company after its first request (settable)."""
        return self.queue.max_wait_s

    @max_wait_s.setter
    def max_wait_s(self, seconds: float) -> None:
        self.queue.max_wait_s = seconds

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the batch being computed)."""
        return len(self.queue)

    @property
    def reserved(self) -> int:
        """Requests admitted by :meth:`reserve` that are still arriving or decoding."""
        return self.queue.reserved

    @property
    def batch_seconds(self) -> float:
        """The measured (exponentially averaged) time of one batch, the warm-up batch included."""
        return self.batch_time.seconds

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def compute_thread(self) -> ComputeThread | None:
        """The thread that runs the model's torch ops (None before :meth:`start`)."""
        return self._compute_thread

    # Life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker task and its compute thread (idempotent)."""
        if self._closed:
            raise BatcherClosedError(f"the batcher of model {self.model_name!r} is closed")
        if self.running:
            return
        if self._compute_thread is None or self._compute_thread.closed:
            self._compute_thread = ComputeThread(self.model_name, self._torch_threads)
        self._task = asyncio.get_running_loop().create_task(self.worker.run(self._compute_thread),
                                                            name=f"elgs-batcher-{self.model_name}")

    async def warm_up(self, requests: Sequence[Request]) -> list[Result]:
        """Run ``requests`` in the compute thread, outside the queue and the metrics, in the batches the
        worker would form of them (:meth:`pack`), twice: the second run's batch times are the first ones
        admission uses. So the warm-up builds the shapes serving will use, and no bigger."""
        if self._compute_thread is None or not self.running:
            raise BatcherClosedError(f"the batcher of model {self.model_name!r} is not started")
        results: list[Result] = []
        for batch in self.pack(requests):
            await self._compute_thread.run(lambda batch=batch: self.engine.run_round(with_tensors(batch)))
            # Timed once warm (the first run pays one-off costs): admission's first batch time.
            started = self.clock()
            results += await self._compute_thread.run(lambda batch=batch: self.engine.run_round(with_tensors(batch)))
            self.batch_time.add(self.clock() - started)
        return results

    def pack(self, requests: Sequence[Request]) -> list[list[Request]]:
        """``requests`` (resolved here) in the batches the worker would form of them if they were queued
        at once: in order, at most ``max_batch_size`` requests and ``max_batch_rows`` pass-1 rows each.

        Raises:
            UnknownMethodError, InvalidParameterError: a request is invalid.
        """
        resolved = [resolve_request(request, self.engine.defaults) for request in requests]
        batches: list[list[Request]] = []
        for request, number in zip(resolved, self.policy.batch_numbers(map(pass_one_rows, resolved)), strict=True):
            if number == len(batches):
                batches.append([])
            batches[-1].append(request)
        return batches

    async def close(self) -> None:
        """Stop the worker; queued requests fail with :class:`BatcherClosedError`.

        Waits for the batch being computed, if any, to finish in its thread.
        """
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait, not `await task`: a cancellation of close() itself must not be swallowed.
            await asyncio.wait({self._task})
            self._task = None
        self.queue.fail_all(lambda: BatcherClosedError(f"model {self.model_name!r} is shutting down"))
        if self._compute_thread is not None and not self._compute_thread.closed:
            await asyncio.to_thread(self._compute_thread.shutdown)

    # Admission ----------------------------------------------------------------------------------

    def expected_wait_s(self, ahead: int | None = None) -> float:
        """Seconds until a request admitted now gets its answer (:meth:`AdmissionPolicy.expected_wait_s`;
        ``ahead`` defaults to the queued and the reserved requests)."""
        return self.policy.expected_wait_s(self.queue.load(), self.batch_time.seconds, ahead)

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait (:meth:`AdmissionPolicy.retry_after_s`, at least 1)."""
        return self.policy.retry_after_s(self.queue.load(), self.batch_time.seconds)

    def check_capacity(self, deadline: float | None = None) -> None:
        """Raise now what :meth:`submit` would raise for lack of room, so callers can skip work first.

        Args:
            deadline: the request's deadline (a :attr:`clock` reading); when given, a request whose
                expected wait (:meth:`expected_wait_s`) exceeds the time left is refused too.

        Raises:
            BatcherClosedError: not started or closed.
            QueueFullError: ``max_queue`` requests are waiting or reserved, or the answer would come too late.
        """
        self._check_accepting()
        time_left = None if deadline is None else deadline - self.clock()
        refusal = self.policy.refusal(self.queue.load(), self.batch_time, time_left)
        if refusal is not None:
            raise refusal

    def reserve(self, deadline: float | None = None) -> Reservation:
        """Admit a request before its body arrives: check capacity, then hold its place.

        Hand the reservation to :meth:`submit` (``reservation=``) to queue the request in that place, or
        :meth:`~Reservation.release` it when the request will not come (both may happen; release is idempotent).

        Args:
            deadline: when the answer is due, a :attr:`clock` reading (default: now + ``request_timeout_s``).

        Raises:
            BatcherClosedError, QueueFullError: as :meth:`check_capacity`.
        """
        deadline = self.clock() + self.request_timeout_s if deadline is None else deadline
        self.check_capacity(deadline)
        self.queue.hold_place()
        return Reservation(batcher=self, deadline=deadline)

    async def submit(self, request: Request, *, deadline: float | None = None,
                     finish: Callable[[Result], Any] | None = None, reservation: Reservation | None = None) -> Any:
        """Queue ``request`` and wait for its result (or ``finish(result)``).

        Args:
            request: what to compute; validated by :func:`elgs.engine.resolve_request` before it is queued. Its
                ``image`` may be an RGB uint8 NumPy array (S, S, 3), converted in the compute thread.
            deadline: when the answer is due, a :attr:`clock` reading (default: the reservation's deadline,
                else now + ``request_timeout_s``).
            finish: called on the result in the compute thread; its return value is the answer
                (an exception it raises fails this request alone).
            reservation: what :meth:`reserve` returned for this request: while it holds its place, the
                request takes that place without a second admission check. Otherwise (None, released, or
                another batcher's) the request is admitted as :meth:`check_capacity` says.

        Raises:
            UnknownMethodError, InvalidParameterError: the request is invalid (nothing is queued).
            QueueFullError: the queue is full, or the answer would come after the deadline.
            DeadlineExceededError: no answer before the deadline.
            BatcherClosedError: the batcher is not running.
            Exception: whatever the engine raised for this request alone.
        """
        request = resolve_request(request, self.engine.defaults)  # reads no pixel: no torch op here
        if reservation is not None and reservation.holds_place_in(self):
            reservation.release()  # admitted already: its place passes to the queue
            self._check_accepting()
            deadline = reservation.deadline if deadline is None else deadline
        else:
            self.check_capacity(deadline)
        deadline = self.clock() + self.request_timeout_s if deadline is None else deadline
        return await self.queue.answer(request, deadline=deadline, finish=finish)

    def _check_accepting(self) -> None:
        if self._closed or not self.running:
            raise BatcherClosedError(f"model {self.model_name!r} is not accepting requests (shutting down)")


def _check_settings(max_batch_size: int, max_batch_rows: int | None, max_wait_ms: float, max_queue: int,
                    request_timeout_s: float) -> None:
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_batch_rows is not None and max_batch_rows < 1:
        raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
    if max_wait_ms < 0:
        raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    if not request_timeout_s > 0:
        raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
