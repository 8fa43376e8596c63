"""The task that serves a :class:`~elgs.batcher.queue.RequestQueue`: takes each batch it closes, runs it
with a :class:`~elgs.batcher.executor.BatchExecutor` in the model's compute thread, measures the batch
time, sheds what that time makes late, and settles the requests' futures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from elgs.batcher.admission import BatchTimeEstimate
from elgs.batcher.errors import BatcherClosedError
from elgs.batcher.executor import BatchExecutor
from elgs.batcher.queue import QueuedRequest, RequestQueue
from elgs.compute import ComputeThread

logger = logging.getLogger("elgs.batcher")


class QueueWorker:
    """Serves ``queue`` until cancelled; survives any exception raised by a batch or by a hook.

    Args:
        queue: where batches come from.
        executor: what computes them (in ``compute``, given to :meth:`run`).
        batch_time: updated with each batch's time, as read from ``clock``.
    """

    def __init__(self, queue: RequestQueue, executor: BatchExecutor, batch_time: BatchTimeEstimate,
                 clock: Callable[[], float]) -> None:
        self.queue = queue
        self.executor = executor
        self.batch_time = batch_time
        self.clock = clock

    @property
    def model_name(self) -> str:
        return self.executor.model_name

    async def run(self, compute: ComputeThread) -> None:
        """Take and compute batches forever; on cancellation the batch in hand fails with
        :class:`~elgs.batcher.errors.BatcherClosedError`."""
        while True:
            batch = await self.queue.next_batch(self.batch_time)
            try:
                await self._compute(batch, compute)
            except asyncio.CancelledError:
                _fail(batch, BatcherClosedError(f"model {self.model_name!r} is shutting down"))
                raise
            except Exception as error:  # the worker must outlive any batch
                logger.exception("batch of model %r failed", self.model_name)
                _fail(batch, error)

    async def _compute(self, batch: list[QueuedRequest], compute: ComputeThread) -> None:
        self.queue.notify("batch", len(batch))
        started = self.clock()
        self.queue.computing += 1
        try:
            outcomes = await compute.run(self.executor.run, [(item.request, item.finish) for item in batch])
        finally:
            self.queue.computing -= 1
        self.batch_time.add(self.clock() - started)
        self.queue.shed_late(self.batch_time)
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.future.done():  # cancelled or timed out during compute
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)


def _fail(batch: list[QueuedRequest], error: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)
