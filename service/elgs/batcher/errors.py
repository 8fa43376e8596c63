"""The batcher's errors (the API maps them to 503 and 504)."""

from __future__ import annotations

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
