"""Observation points of a batcher (the API's Prometheus metrics implement them)."""

from __future__ import annotations

import logging

logger = logging.getLogger("elgs.batcher")


class BatcherHooks:
    """Observation points of a :class:`~elgs.batcher.Batcher`; the default does nothing.

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


class HookCaller:
    """Calls one event on every hook of a list, for one model; a hook that raises is logged and ignored.

    Args:
        model: the model name passed to every hook.
        hooks: the list to call; read at each event, so hooks appended later are called too.
    """

    def __init__(self, model: str, hooks: list[BatcherHooks]) -> None:
        self.model = model
        self.hooks = hooks

    def __call__(self, event: str, *args) -> None:
        for hooks in self.hooks:
            try:
                getattr(hooks, event)(self.model, *args)
            except Exception:
                logger.exception("batcher hook %s.%s failed", type(hooks).__name__, event)
