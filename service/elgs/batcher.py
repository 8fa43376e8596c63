"""Asyncio micro-batcher in front of the engine (design.md, section 4).

One :class:`Batcher` per model. Callers ``await batcher.submit(request)`` from the event loop; the
batcher queues the request, closes a batch when it holds ``max_batch_size`` requests, when the next
request would take its pass 1 past ``max_batch_rows`` rows (SmoothGrad's ``n`` copies count, each), or
``max_wait_ms`` after its first request arrived, runs :meth:`elgs.engine.Engine.run` in the model's
:class:`~elgs.compute.ComputeThread` (so the event loop stays free) and resolves one future per request.

Placement (issue 8): every torch op of the model runs in that one thread. A request may carry its
image as an RGB uint8 NumPy array (S, S, 3) (what decoding produces): it becomes a tensor there, with
:func:`elgs.images.array_to_tensor`; a ``finish`` callable given to :meth:`Batcher.submit` runs there
too, on the request's result (the API turns the result's images into uint8 arrays for PNG with it).

Guarantees:
    * result ``i`` is the engine's result for request ``i`` (the engine computes every image on its own);
    * the queue is bounded: a full queue raises :class:`QueueFullError` at once;
    * admission by expected wait: a request whose answer would, by the measured batch time and the
      requests ahead of it, come after its deadline is refused at once (:class:`QueueFullError`), and
      :meth:`Batcher.reserve` lets a caller hold its place before it decodes (docs/design.md, section 4);
    * each request has a deadline (:class:`DeadlineExceededError`); requests whose caller went away
      (the awaiting task was cancelled, e.g. on client disconnect) or whose deadline passed are
      dropped before compute;
    * a failing batch fails only the requests that cause the failure: on an error the samples are
      retried one by one, on CUDA out-of-memory the batch is split in halves;
    * the worker survives any exception raised by a batch or by a metrics hook.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from elgs.compute import ComputeThread
from elgs.engine import Engine, Request, Result, pass_one_rows, resolve_request
from elgs.images import array_to_tensor

logger = logging.getLogger(__name__)

# Errors that say a request's own input is at fault (the next request may well succeed).
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError, IndexError)


class BatcherError(RuntimeError):
    """Base class of the batcher's own errors."""


class QueueFullError(BatcherError):
    """The model cannot take the request now (queue full or answer expected after the deadline);
    retry after ``retry_after_s`` seconds."""

    def __init__(self, model: str, max_queue: int, retry_after_s: int, reason: str | None = None) -> None:
        reason = reason or f"the queue of model {model!r} is full ({max_queue} requests waiting)"
        super().__init__(f"{reason}; retry in {retry_after_s} s")
        self.model = model
        self.retry_after_s = retry_after_s


class DeadlineExceededError(BatcherError, TimeoutError):
    """The request was not answered before its deadline."""


class BatcherClosedError(BatcherError):
    """The batcher is shut down (or not started) and accepts no requests."""


class BatcherHooks:
    """Observation points of a :class:`Batcher`; the default does nothing.

    Subclass and override what you need (the API's Prometheus metrics do). ``model_pass`` runs in
    the compute thread, the others in the event loop. Exceptions raised by hooks are logged and ignored.
    """

    def queue_wait(self, model: str, seconds: float) -> None:
        """A request left the queue for compute after waiting ``seconds``."""

    def batch(self, model: str, size: int) -> None:
        """A batch of ``size`` live requests closed and goes to compute."""

    def queue_depth(self, model: str, depth: int) -> None:
        """The number of queued (not yet computing) requests changed to ``depth``."""

    def model_pass(self, model: str, seconds: float, size: int) -> None:
        """One ``Engine.run`` call of ``size`` requests took ``seconds`` (each retry counts)."""

    def dropped(self, model: str, reason: str) -> None:
        """A queued request was dropped before compute; ``reason`` is ``cancelled``, ``deadline`` or ``shed``
        (refused with 503 once a measured batch time showed it would be answered after its deadline)."""


@dataclass(eq=False)
class Reservation:
    """A place held in a batcher's queue for a request that is still arriving or decoding.

    Counts against ``max_queue`` and the expected wait until :meth:`release` (idempotent), or until
    :meth:`Batcher.submit` in the same context (task or its children) queues the request.
    """

    batcher: Batcher
    deadline: float  # time.monotonic()
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.batcher._reserved -= 1


# The reservation of the request being handled in this context, taken over by ``submit``.
_current_reservation: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar(
    "elgs_reservation", default=None)


@dataclass(eq=False)
class _Item:
    request: Request
    future: asyncio.Future
    enqueued: float  # loop.time()
    deadline: float  # loop.time()
    finish: Callable[[Result], Any] | None = None
    rows: int = 1  # rows in pass 1 (pass_one_rows)


# Pass-1 rows per batch on the CPU. Measured on 2 cores (issue 8), EfficientNet-Lite0's input-gradient pass
# with the allocator tuned (elgs.compute.tune_allocator) costs 42, 34, 33, 32, 34 and 36 ms per row at 1, 2,
# 4, 8, 16 and 32 rows (untuned: 53, 41, 35, 39, -, 57, the page faults growing with the batch). Past a few
# rows a CPU gains nothing from batching and a bigger batch answers later, so a SmoothGrad n=8 request runs
# alone and plain ones batch up to max_batch_size. On CUDA: the rows of max_batch_size requests of
# SmoothGrad n=8 (not measured).
CPU_MAX_BATCH_ROWS = 8
CUDA_ROWS_PER_REQUEST = 8


def default_max_batch_rows(device: torch.device | str, max_batch_size: int) -> int:
    """The default of ``max_batch_rows``: :data:`CPU_MAX_BATCH_ROWS` on the CPU, ``8 * max_batch_size`` on CUDA."""
    return CUDA_ROWS_PER_REQUEST * max_batch_size if torch.device(device).type == "cuda" else CPU_MAX_BATCH_ROWS


@dataclass
class _Packer:
    """Packs requests, in queue order, into batches as the worker does: a batch closes at ``max_size``
    requests or before a request that would take it past ``max_rows`` pass-1 rows."""

    max_size: int
    max_rows: int
    batches: int = 0
    size: int = 0
    rows: int = 0

    def add(self, rows: int) -> int:
        """Place a request of ``rows`` rows; returns its batch number (0 for the first batch)."""
        if self.batches == 0 or self.size == self.max_size or self.rows + rows > self.max_rows:
            self.batches, self.size, self.rows = self.batches + 1, 0, 0
        self.size, self.rows = self.size + 1, self.rows + rows
        return self.batches - 1


@dataclass
class _BatchTrace:
    """Exponential average of the batch compute time, for ``Retry-After``."""

    seconds: float = 1.0
    weight: float = 0.2
    samples: int = 0

    def add(self, seconds: float) -> None:
        self.seconds = seconds if self.samples == 0 else (1 - self.weight) * self.seconds + self.weight * seconds
        self.samples += 1


class Batcher:
    """Queue, batch and run requests for one model.

    Args:
        engine: the engine of the model; ``engine.run`` is only ever called from the compute thread.
        max_batch_size: a batch closes when it holds this many requests.
        max_batch_rows: ... or when the next request would take its pass 1 past this many rows (a request
            adds the copies of its saliency estimator, 1 for most; one request alone may exceed it);
            None: :func:`default_max_batch_rows` for the model's device.
        max_wait_ms: ... or this long after its first request was queued.
        max_queue: most requests waiting (not computing) at once; more raise :class:`QueueFullError`.
        request_timeout_s: default time from ``submit`` to the answer before :class:`DeadlineExceededError`.
        hooks: observers of queue and batch events (metrics).
        compute: the thread that loaded the model, to run it in (the batcher shuts it down on
            :meth:`close`); None starts a new one in :meth:`start`. A model loaded in another thread
            works, but then two threads have run its torch ops: see :mod:`elgs.compute`.
        torch_threads: torch intra-op threads of a compute thread the batcher starts (None:
            ``$ELGS_TORCH_THREADS``, else the available cores).

    Example:
        >>> batcher = Batcher(Engine(model), max_batch_size=4, max_wait_ms=5)
        >>> await batcher.start()
        >>> result = await batcher.submit(Request(image=x, task="defend", method="slgs", lam=3.5))
        >>> await batcher.close()
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 4,
        max_batch_rows: int | None = None,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        request_timeout_s: float = 30.0,
        hooks: Iterable[BatcherHooks] = (),
        compute: ComputeThread | None = None,
        torch_threads: int | None = None,
    ) -> None:
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
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_batch_rows = (default_max_batch_rows(engine.model.device, max_batch_size)
                               if max_batch_rows is None else max_batch_rows)
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.hooks: list[BatcherHooks] = list(hooks)
        self._pending: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._compute_thread = compute
        self._torch_threads = torch_threads
        self._trace = _BatchTrace()
        self._closed = False
        self._reserved = 0  # requests admitted by reserve() and not queued yet
        self._computing = 0  # batches in the compute thread

    @property
    def model_name(self) -> str:
        return self.engine.model.name

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the batch being computed)."""
        return len(self._pending)

    @property
    def reserved(self) -> int:
        """Requests admitted by :meth:`reserve` that are still arriving or decoding."""
        return self._reserved

    @property
    def batch_seconds(self) -> float:
        """The measured (exponentially averaged) time of one batch, the warm-up batch included."""
        return self._trace.seconds

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    # Life cycle ---------------------------------------------------------------------------------

    @property
    def compute_thread(self) -> ComputeThread | None:
        """The thread that runs the model's torch ops (None before :meth:`start`)."""
        return self._compute_thread

    async def start(self) -> None:
        """Start the worker task and its compute thread (idempotent)."""
        if self._closed:
            raise BatcherClosedError(f"the batcher of model {self.model_name!r} is closed")
        if self.running:
            return
        if self._compute_thread is None or self._compute_thread.closed:
            self._compute_thread = ComputeThread(self.model_name, self._torch_threads)
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"elgs-batcher-{self.model_name}")

    async def warm_up(self, requests: Sequence[Request]) -> list[Result]:
        """Run ``requests`` in the compute thread, outside the queue and the metrics, in the batches the
        worker would form of them (:meth:`pack`), twice: the second run's batch times are the first ones
        admission uses. So the warm-up builds the shapes serving will use, and no bigger."""
        if self._compute_thread is None or not self.running:
            raise BatcherClosedError(f"the batcher of model {self.model_name!r} is not started")
        results: list[Result] = []
        for batch in self.pack(requests):
            await self._compute_thread.run(lambda batch=batch: self.engine.run(_with_tensors(batch)))
            # Timed once warm (the first run pays one-off costs): admission's first batch time.
            started = time.perf_counter()
            results += await self._compute_thread.run(lambda batch=batch: self.engine.run(_with_tensors(batch)))
            self._trace.add(time.perf_counter() - started)
        return results

    def pack(self, requests: Sequence[Request]) -> list[list[Request]]:
        """``requests`` (resolved here) in the batches the worker would form of them if they were queued
        at once: in order, at most ``max_batch_size`` requests and ``max_batch_rows`` pass-1 rows each.

        Raises:
            UnknownMethodError, InvalidParameterError: a request is invalid.
        """
        packer, batches = self._packer(), []
        for request in requests:
            request = resolve_request(request, self.engine.defaults)
            if packer.add(pass_one_rows(request)) == len(batches):
                batches.append([])
            batches[-1].append(request)
        return batches

    async def close(self) -> None:
        """Stop the worker; queued requests fail with :class:`BatcherClosedError`.

        Waits for the batch being computed, if any, to finish in its thread.
        """
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            # asyncio.wait, not `await worker`: a cancellation of close() itself must not be swallowed.
            await asyncio.wait({self._worker})
            self._worker = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosedError(f"model {self.model_name!r} is shutting down"))
        self._notify("queue_depth", 0)
        if self._compute_thread is not None and not self._compute_thread.closed:
            await asyncio.to_thread(self._compute_thread.shutdown)

    # Submission ---------------------------------------------------------------------------------

    def expected_wait_s(self, ahead: int | None = None) -> float:
        """Seconds until a request admitted now gets its answer.

        The batch in compute, then the batches of the ``ahead`` requests before it (default: the
        queued and the reserved ones) and its own, each taking the measured batch time. Batches are
        packed as the worker packs them (:meth:`_batch_length`), from the queued requests' pass-1 rows;
        a request not queued yet counts the queued ones' mean rows (1 on an empty queue).
        """
        ahead = len(self._pending) + self._reserved if ahead is None else ahead
        rows = [item.rows for item in self._pending][:ahead]
        mean = max(1, round(sum(rows) / len(rows))) if rows else 1
        packer = self._packer()
        for row in rows + [mean] * (ahead + 1 - len(rows)):
            packer.add(row)
        return (self._computing + packer.batches) * self._trace.seconds

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait before a request with a full ``request_timeout_s`` is
        admitted, if nothing else arrives: the queue drains below ``max_queue`` and the expected wait
        falls to the timeout (at least 1)."""
        ahead = len(self._pending) + self._reserved
        over_length = (self.expected_wait_s(ahead - self.max_queue) - self._computing * self._trace.seconds
                       if ahead >= self.max_queue else 0.0)
        over_wait = self.expected_wait_s(ahead) - self.request_timeout_s
        return max(1, math.ceil(max(over_length, over_wait)))

    def check_capacity(self, deadline: float | None = None) -> None:
        """Raise now what :meth:`submit` would raise for lack of room, so callers can skip work first.

        Args:
            deadline: the request's ``time.monotonic()`` deadline; when given, a request whose expected
                wait (:meth:`expected_wait_s`) exceeds the time left is refused too.

        Raises:
            BatcherClosedError: not started or closed.
            QueueFullError: ``max_queue`` requests are waiting or reserved, or the answer would come too late.
        """
        if self._closed or not self.running:
            raise BatcherClosedError(f"model {self.model_name!r} is not accepting requests (shutting down)")
        ahead = len(self._pending) + self._reserved
        if ahead >= self.max_queue:
            raise QueueFullError(self.model_name, self.max_queue, self.retry_after_s())
        if deadline is not None and self._trace.samples:  # no batch measured yet: the length rule only
            wait, left = self.expected_wait_s(ahead), deadline - time.monotonic()
            if wait > left:
                raise QueueFullError(self.model_name, self.max_queue, self.retry_after_s(), reason=(
                    f"model {self.model_name!r} is busy: an answer is expected in {wait:.3g} s "
                    f"({ahead} requests ahead), after this request's deadline in {max(left, 0):.3g} s"))

    def reserve(self, deadline: float | None = None) -> Reservation:
        """Admit a request before its body arrives: check capacity, then hold its place.

        The reservation is also made the current one of this context, so :meth:`submit` called from
        here (or from a task started here) takes it over instead of checking capacity again.

        Args:
            deadline: ``time.monotonic()`` by which the answer is due (default: now + ``request_timeout_s``).

        Raises:
            BatcherClosedError, QueueFullError: as :meth:`check_capacity`.
        """
        deadline = time.monotonic() + self.request_timeout_s if deadline is None else deadline
        self.check_capacity(deadline)
        self._reserved += 1
        reservation = Reservation(batcher=self, deadline=deadline)
        _current_reservation.set(reservation)
        return reservation

    async def submit(self, request: Request, *, deadline: float | None = None,
                     finish: Callable[[Result], Any] | None = None) -> Any:
        """Queue ``request`` and wait for its result (or ``finish(result)``).

        Args:
            request: what to compute; validated by :func:`elgs.engine.resolve_request` before it is queued. Its
                ``image`` may be an RGB uint8 NumPy array (S, S, 3), converted in the compute thread.
            deadline: absolute ``time.monotonic()`` by which the answer is due
                (default: now + ``request_timeout_s``).
            finish: called on the result in the compute thread; its return value is the answer
                (an exception it raises fails this request alone).

        Raises:
            UnknownMethodError, InvalidParameterError: the request is invalid (nothing is queued).
            QueueFullError: the queue is full.
            DeadlineExceededError: no answer before the deadline.
            BatcherClosedError: the batcher is not running.
            Exception: whatever the engine raised for this request alone.
        """
        request = resolve_request(request, self.engine.defaults)  # reads no pixel: no torch op here
        reservation = _current_reservation.get()
        if reservation is not None and reservation.batcher is self and not reservation.released:
            reservation.release()  # admitted already: its place passes to the queue
            if self._closed or not self.running:
                raise BatcherClosedError(f"model {self.model_name!r} is not accepting requests (shutting down)")
        else:
            self.check_capacity(deadline)
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = self.request_timeout_s if deadline is None else deadline - time.monotonic()
        item = _Item(request=request, future=loop.create_future(), enqueued=now, deadline=now + timeout,
                     finish=finish, rows=pass_one_rows(request))
        self._pending.append(item)
        self._arrived.set()
        self._notify("queue_depth", len(self._pending))
        try:
            return await asyncio.wait_for(item.future, timeout=max(timeout, 0.0))
        except TimeoutError:
            self._discard(item, "deadline")
            raise DeadlineExceededError(
                f"no answer within {timeout:.3g} s ({len(self._pending)} requests still queued for model "
                f"{self.model_name!r}); retry later or raise ELGS_REQUEST_TIMEOUT_S"
            ) from None
        except asyncio.CancelledError:
            self._discard(item, "cancelled")
            raise

    def _discard(self, item: _Item, reason: str) -> None:
        """Take a request whose caller stopped waiting out of the queue, if it is still there."""
        try:
            self._pending.remove(item)
        except ValueError:
            return  # already in a batch: its result will be ignored
        self._notify("dropped", reason)
        self._notify("queue_depth", len(self._pending))

    # Worker -------------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BatcherClosedError(f"model {self.model_name!r} is shutting down"))
                raise
            except Exception as error:  # the worker must outlive any batch
                logger.exception("batch of model %r failed", self.model_name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)

    async def _next_batch(self) -> list[_Item]:
        """Wait for a non-empty batch of live requests, closed by size or by ``max_wait_ms``."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            close_at = self._pending[0].enqueued + self.max_wait_s
            while self._pending and self._room_for_more():
                remaining = close_at - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            taken = [self._pending.popleft() for _ in range(self._batch_length())]
            self._notify("queue_depth", len(self._pending))
            now = loop.time()
            # Never compute what would be answered after its deadline (the caller has a 504 by then).
            finish = now + (self._trace.seconds if self._trace.samples else 0.0)
            batch = []
            for item in taken:
                if item.future.done():
                    continue
                if finish >= item.deadline:
                    item.future.set_exception(DeadlineExceededError(
                        f"the deadline passed while queued for model {self.model_name!r}"))
                    self._notify("dropped", "deadline")
                    continue
                self._notify("queue_wait", now - item.enqueued)
                batch.append(item)
            if batch:
                return batch

    def _batch_length(self) -> int:
        """How many queued requests the next batch takes: in order, up to ``max_batch_size`` requests and
        ``max_batch_rows`` pass-1 rows (at least one request)."""
        packer, taken = self._packer(), 0
        for item in self._pending:
            if packer.add(item.rows) > 0:
                break
            taken += 1
        return taken

    def _packer(self) -> _Packer:
        return _Packer(self.max_batch_size, self.max_batch_rows)

    def _room_for_more(self) -> bool:
        """Whether the queued requests fit one batch that could still take another request."""
        packer = self._packer()
        fit = all(packer.add(item.rows) == 0 for item in self._pending)
        return fit and packer.size < packer.max_size and packer.rows < packer.max_rows

    async def _run(self, batch: list[_Item]) -> None:
        self._notify("batch", len(batch))
        started = time.perf_counter()
        self._computing += 1
        try:
            outcomes = await self._compute_thread.run(self._compute,
                                                      [(item.request, item.finish) for item in batch])
        finally:
            self._computing -= 1
        self._trace.add(time.perf_counter() - started)
        self._shed_late()
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.future.done():  # cancelled or timed out during compute
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    def _shed_late(self) -> None:
        """Refuse (503) the queued requests that, by the batch time just measured, would be answered
        after their deadline: admitted on an estimate that turned out short (load rose), they learn
        now rather than at their 504. The queue is served in order, so position gives the wait."""
        if not self._pending:
            return
        now = asyncio.get_running_loop().time()
        keep: list[_Item] = []
        packer = self._packer()
        for item in self._pending:
            finish = now + (packer.add(item.rows) + 1) * self._trace.seconds
            if finish <= item.deadline or item.future.done():
                keep.append(item)
                continue
            packer = self._packer()  # place the kept ones again: this one leaves the queue
            for kept in keep:
                packer.add(kept.rows)
            retry_after = max(1, math.ceil(finish - item.deadline))
            item.future.set_exception(QueueFullError(self.model_name, self.max_queue, retry_after, reason=(
                f"model {self.model_name!r} is slower than when this request was admitted: its answer is now "
                f"expected {finish - item.enqueued:.3g} s after it arrived, after its deadline")))
            self._notify("dropped", "shed")
        if len(keep) != len(self._pending):
            self._pending = collections.deque(keep)
            self._notify("queue_depth", len(self._pending))

    def _compute(self, work: list[tuple[Request, Callable[[Result], Any] | None]]) -> list[Any]:
        """Run a batch in the compute thread; one outcome (answer or exception) per request, never raises."""
        started = time.perf_counter()
        try:
            results = self.engine.run(_with_tensors([request for request, _ in work]))
        except torch.cuda.OutOfMemoryError as error:
            if len(work) == 1:
                return [error]
            logger.warning("CUDA out of memory on a batch of %d for %r; splitting it", len(work), self.model_name)
            torch.cuda.empty_cache()
            half = len(work) // 2
            return self._compute(work[:half]) + self._compute(work[half:])
        except Exception as error:
            if len(work) == 1:
                return [error]
            logger.warning("batch of %d for %r failed (%s); retrying one by one", len(work), self.model_name, error)
            return self._one_by_one(work)
        self._notify("model_pass", time.perf_counter() - started, len(work))
        return [_finished(result, finish) for result, (_, finish) in zip(results, work, strict=True)]

    def _one_by_one(self, work: list[tuple[Request, Callable[[Result], Any] | None]]) -> list[Any]:
        """Retry each request alone; stop at the first failure that is not about the request's own input
        (the model or the device is broken: every retry would fail the same way) and fail the rest with it."""
        outcomes: list[Any] = []
        for position, one in enumerate(work):
            outcome = self._compute([one])[0]
            outcomes.append(outcome)
            if isinstance(outcome, BaseException) and not isinstance(outcome, INPUT_ERRORS):
                outcomes.extend([outcome] * (len(work) - position - 1))
                break
        return outcomes

    def _notify(self, event: str, *args) -> None:
        for hooks in self.hooks:
            try:
                getattr(hooks, event)(self.model_name, *args)
            except Exception:
                logger.exception("batcher hook %s.%s failed", type(hooks).__name__, event)


def _with_tensors(requests: list[Request]) -> list[Request]:
    """Requests whose NumPy images became (3, S, S) float tensors (runs in the compute thread)."""
    return [replace(r, image=array_to_tensor(r.image)) if isinstance(r.image, np.ndarray) else r for r in requests]


def _finished(result: Result, finish: Callable[[Result], Any] | None) -> Any:
    if finish is None:
        return result
    try:
        return finish(result)
    except Exception as error:
        return error
