"""The batcher's errors (503 and 504; :class:`elgs.errors.ServiceError`, so they cross Ray whole)."""

from __future__ import annotations

from elgs.errors import ServiceError

# Errors that say a request's own input is at fault (the next request may well succeed).
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, TypeError, IndexError)


class BatcherError(ServiceError, RuntimeError):
    """Base class of the batcher's own errors."""


class QueueFullError(BatcherError):
    """The model cannot take the request now (queue full or answer expected after the deadline);
    retry after ``retry_after_s`` seconds."""

    status = 503

    def __init__(self, model: str, max_queue: int, retry_after_s: int, reason: str | None = None) -> None:
        reason = reason or f"the queue of model {model!r} is full ({max_queue} requests waiting)"
        super().__init__(f"{reason}; retry in {retry_after_s} s")
        self.model = model
        self.retry_after_s = retry_after_s
        self.init_args = (model, max_queue, retry_after_s, reason)


class DeadlineExceededError(BatcherError, TimeoutError):
    """The request was not answered before its deadline."""

    status = 504


class BatcherClosedError(BatcherError):
    """The batcher is shut down (or not started) and accepts no requests; another replica, or this one in a
    moment, may take it."""

    status = 503
    retry_after_s = 1
