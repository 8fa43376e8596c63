"""Asyncio micro-batcher in front of the engine (docs/design.md, section 4).

One :class:`Batcher` per model, made of four parts, each its own module:

* :mod:`~elgs.batcher.admission`: the pure policy: how requests pack into batches (size and pass-1 rows),
  the expected wait, who is refused and the honest ``Retry-After``; no clock, no queue, no event loop;
* :mod:`~elgs.batcher.queue`: the queued requests and the reserved places (what admission counts);
  closes batches by the policy and ``max_wait_ms``, drops the cancelled and the late, sheds the
  requests a slower batch makes late;
* :mod:`~elgs.batcher.worker`: the task that takes each batch to the model's compute thread, measures
  the batch time and settles the futures;
* :mod:`~elgs.batcher.executor`: runs a batch through the engine in that thread, so a failure stays with
  the requests that cause it (split in halves on CUDA out-of-memory, else retried one by one);

and :mod:`~elgs.batcher.core`, the :class:`Batcher` that joins them and owns their life cycle.

Placement (issue 8): every torch op of the model runs in its one compute thread. A request may carry its
image as an RGB uint8 NumPy array (S, S, 3) (what decoding produces): it becomes a tensor there, with
:func:`elgs.images.array_to_tensor`; a ``finish`` callable given to :meth:`Batcher.submit` runs there
too, on the request's result (the API turns the result's images into uint8 arrays for PNG with it).

Guarantees:
    * result ``i`` is the engine's result for request ``i`` (the engine computes every image on its own);
    * the queue is bounded: a full queue raises :class:`QueueFullError` at once;
    * admission by expected wait: a request whose answer would, by the measured batch time and the
      requests ahead of it, come after its deadline is refused at once (:class:`QueueFullError`), and
      :meth:`Batcher.reserve` lets a caller hold its place before it decodes, then hand that
      :class:`Reservation` to :meth:`Batcher.submit`;
    * each request has a deadline (:class:`DeadlineExceededError`); requests whose caller went away
      (the awaiting task was cancelled, e.g. on client disconnect) or whose deadline passed are
      dropped before compute;
    * a failing batch fails only the requests that cause the failure: on an error the samples are
      retried one by one, on CUDA out-of-memory the batch is split in halves;
    * the worker survives any exception raised by a batch or by a metrics hook.
"""

from elgs.batcher.admission import (
    CPU_MAX_BATCH_ROWS,
    CUDA_ROWS_PER_REQUEST,
    AdmissionPolicy,
    BatchTimeEstimate,
    Load,
    Packer,
    default_max_batch_rows,
)
from elgs.batcher.core import Batcher, Reservation
from elgs.batcher.errors import (
    INPUT_ERRORS,
    BatcherClosedError,
    BatcherError,
    DeadlineExceededError,
    QueueFullError,
)
from elgs.batcher.hooks import BatcherHooks

__all__ = [
    "CPU_MAX_BATCH_ROWS", "CUDA_ROWS_PER_REQUEST", "INPUT_ERRORS", "AdmissionPolicy", "BatchTimeEstimate",
    "Batcher", "BatcherClosedError", "BatcherError", "BatcherHooks", "DeadlineExceededError", "Load", "Packer",
    "QueueFullError", "Reservation", "default_max_batch_rows",
]
