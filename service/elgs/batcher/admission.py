"""The batcher's admission policy: how requests pack into batches, the expected wait, who is refused
and for how long (docs/design.md, section 4).

Pure: no queue, no clock and no event loop. Every method is given what it needs (the pass-1 rows of
the queued requests, the reserved places, the batches computing, the measured batch time, ``now``),
so each rule can be checked with numbers written in a test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from elgs.batcher.errors import QueueFullError

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
class Packer:
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
class BatchTimeEstimate:
    """Exponential average of the time one batch takes (seconds), what admission and ``Retry-After`` use.

    ``seconds`` is a guess until the first :meth:`add` (``samples == 0``); admission by expected wait
    starts with the first measured batch (the warm-up's).
    """

    seconds: float = 1.0
    weight: float = 0.2
    samples: int = 0

    def add(self, seconds: float) -> None:
        """Fold in one measured batch time."""
        self.seconds = seconds if self.samples == 0 else (1 - self.weight) * self.seconds + self.weight * seconds
        self.samples += 1

    @property
    def measured(self) -> bool:
        return self.samples > 0


@dataclass(frozen=True)
class Load:
    """What admission sees of one batcher at a moment.

    Args:
        queued_rows: the pass-1 rows of each queued request, in queue order.
        reserved: places held for requests still arriving or decoding.
        computing: batches in the compute thread (0 or 1).
    """

    queued_rows: tuple[int, ...] = ()
    reserved: int = 0
    computing: int = 0

    @property
    def ahead(self) -> int:
        """Requests a new one would wait behind: the queued and the reserved ones."""
        return len(self.queued_rows) + self.reserved


@dataclass(frozen=True)
class AdmissionPolicy:
    """The packing and admission rules of one model's batcher (the settings of the same names)."""

    model: str
    max_batch_size: int
    max_batch_rows: int
    max_queue: int
    request_timeout_s: float

    def packer(self) -> Packer:
        return Packer(self.max_batch_size, self.max_batch_rows)

    def batch_numbers(self, rows: Iterable[int]) -> list[int]:
        """The batch each request (given by its pass-1 rows, in queue order) falls in, counted from 0."""
        packer = self.packer()
        return [packer.add(row) for row in rows]

    def next_batch_length(self, rows: Iterable[int]) -> int:
        """How many of the queued requests the next batch takes (at least one when any is queued)."""
        packer, length = self.packer(), 0
        for row in rows:
            if packer.add(row) > 0:
                break
            length += 1
        return length

    def has_room(self, rows: Sequence[int]) -> bool:
        """Whether the queued requests fit one batch that could still take another request."""
        packer = self.packer()
        fit = all(packer.add(row) == 0 for row in rows)
        return fit and packer.size < packer.max_size and packer.rows < packer.max_rows

    def expected_wait_s(self, load: Load, batch_seconds: float, ahead: int | None = None) -> float:
        """Seconds until a request admitted now gets its answer.

        The batch in compute, then the batches of the ``ahead`` requests before it (default:
        ``load.ahead``) and its own, each taking ``batch_seconds``. Batches are packed as the worker packs
        them, from the queued requests' pass-1 rows; a request not queued yet counts the queued ones'
        mean rows (1 on an empty queue).
        """
        ahead = load.ahead if ahead is None else ahead
        rows = list(load.queued_rows[:ahead])
        mean = max(1, round(sum(rows) / len(rows))) if rows else 1
        packer = self.packer()
        for row in rows + [mean] * (ahead + 1 - len(rows)):
            packer.add(row)
        return (load.computing + packer.batches) * batch_seconds

    def retry_after_s(self, load: Load, batch_seconds: float) -> int:
        """Seconds a refused client should wait before a request with a full ``request_timeout_s`` is
        admitted, if nothing else arrives: the queue drains below ``max_queue`` and the expected wait
        falls to the timeout (at least 1)."""
        ahead = load.ahead
        over_length = (self.expected_wait_s(load, batch_seconds, ahead - self.max_queue)
                       - load.computing * batch_seconds if ahead >= self.max_queue else 0.0)
        over_wait = self.expected_wait_s(load, batch_seconds) - self.request_timeout_s
        return max(1, math.ceil(max(over_length, over_wait)))

    def refusal(self, load: Load, batch_time: BatchTimeEstimate, time_left: float | None) -> QueueFullError | None:
        """Why a request arriving now is refused (the error to raise), or None when it is admitted.

        Args:
            time_left: seconds to the request's deadline; None checks the length rule only, as does a
                ``batch_time`` not measured yet.
        """
        ahead = load.ahead
        if ahead >= self.max_queue:
            return QueueFullError(self.model, self.max_queue, self.retry_after_s(load, batch_time.seconds))
        if time_left is None or not batch_time.measured:
            return None
        wait = self.expected_wait_s(load, batch_time.seconds)
        if wait <= time_left:
            return None
        return QueueFullError(self.model, self.max_queue, self.retry_after_s(load, batch_time.seconds), reason=(
            f"model {self.model!r} is busy: an answer is expected in {wait:.3g} s "
            f"({ahead} requests ahead), after this request's deadline in {max(time_left, 0):.3g} s"))

    def starts_too_late(self, deadline: float, now: float, batch_time: BatchTimeEstimate) -> bool:
        """Whether a batch closing at ``now`` would answer after ``deadline`` (unknown batch time: 0 s)."""
        return now + (batch_time.seconds if batch_time.measured else 0.0) >= deadline

    def late(self, queued: Sequence[tuple[int, float]], now: float, batch_seconds: float) -> dict[int, float]:
        """The queued requests that, served in order from ``now``, would be answered after their deadline.

        Args:
            queued: (pass-1 rows, deadline) of each queued request, in queue order.

        Returns:
            ``{position in queue: expected answer time}`` of the late ones; the others keep their places
            (a late one leaves the queue, so those behind it move up).
        """
        kept: list[int] = []
        late: dict[int, float] = {}
        packer = self.packer()
        for position, (rows, deadline) in enumerate(queued):
            finish = now + (packer.add(rows) + 1) * batch_seconds
            if finish <= deadline:
                kept.append(rows)
                continue
            late[position] = finish
            packer = self.packer()  # place the kept ones again: this one leaves the queue
            for row in kept:
                packer.add(row)
        return late

