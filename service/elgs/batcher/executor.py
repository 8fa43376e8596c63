"""Runs one batch through the engine, in the model's compute thread, so that a failure stays with the
requests that cause it: on CUDA out-of-memory the batch is split in halves, on another error the requests
are retried one by one (docs/design.md, section 4)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from elgs.batcher.errors import INPUT_ERRORS
from elgs.batcher.hooks import HookCaller
from elgs.engine import Engine, Request, Result
from elgs.images import array_to_tensor

logger = logging.getLogger("elgs.batcher")

# One request of a batch: what to compute and what to call on its result (None: the result is the answer).
Work = tuple[Request, Callable[[Result], Any] | None]


class BatchExecutor:
    """Computes batches with ``engine``; call :meth:`run` from the compute thread only.

    Args:
        engine: the model's engine.
        notify: the batcher's hooks (``model_pass``, called here, in the compute thread).
    """

    def __init__(self, engine: Engine, notify: HookCaller) -> None:
        self.engine = engine
        self.notify = notify

    @property
    def model_name(self) -> str:
        return self.engine.model.name

    def run(self, work: list[Work]) -> list[Any]:
        """One outcome per request, in order: its answer or the exception that fails it alone. Never raises."""
        started = time.perf_counter()
        try:
            # One round: a cascade's flagged request comes back with Result.escalate and is queued again.
            results = self.engine.run_round(with_tensors([request for request, _ in work]))
        except torch.cuda.OutOfMemoryError as error:
            if len(work) == 1:
                return [error]
            logger.warning("CUDA out of memory on a batch of %d for %r; splitting it", len(work), self.model_name)
            torch.cuda.empty_cache()
            half = len(work) // 2
            return self.run(work[:half]) + self.run(work[half:])
        except Exception as error:
            if len(work) == 1:
                return [error]
            logger.warning("batch of %d for %r failed (%s); retrying one by one", len(work), self.model_name, error)
            return self._one_by_one(work)
        self.notify("model_pass", time.perf_counter() - started, len(work))
        return [_finished(result, finish) for result, (_, finish) in zip(results, work, strict=True)]

    def _one_by_one(self, work: list[Work]) -> list[Any]:
        """Retry each request alone; stop at the first failure that is not about the request's own input
        (the model or the device is broken: every retry would fail the same way) and fail the rest with it."""
        outcomes: list[Any] = []
        for position, one in enumerate(work):
            outcome = self.run([one])[0]
            outcomes.append(outcome)
            if isinstance(outcome, BaseException) and not isinstance(outcome, INPUT_ERRORS):
                outcomes.extend([outcome] * (len(work) - position - 1))
                break
        return outcomes


def with_tensors(requests: list[Request]) -> list[Request]:
    """Requests whose NumPy images became (3, S, S) float tensors (runs in the compute thread)."""
    return [replace(r, image=array_to_tensor(r.image)) if isinstance(r.image, np.ndarray) else r for r in requests]


def _finished(result: Result, finish: Callable[[Result], Any] | None) -> Any:
    if finish is None:
        return result
    try:
        return finish(result)
    except Exception as error:
        return error
