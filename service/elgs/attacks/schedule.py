"""The paper's learning-rate schedule for patch training, scaled to any number of epochs.

Cheng & Wang (and LaVAN) train 200 epochs with SGD + momentum: lr 1 for 160 epochs, 0.1 for 20, 0.01
for 20. With ``E`` epochs the milestones become ``0.8 E`` and ``0.9 E`` rounded half up, moved so that
each of the three stages keeps at least one epoch when ``E >= 3``.
"""

from __future__ import annotations

import math

import torch

PAPER_EPOCHS = 200
PAPER_MILESTONES = (160, 180)
PAPER_LR = 1.0
DECAY = 0.1


def scaled_milestones(epochs: int) -> tuple[int, int]:
    """Epochs at which the lr drops tenfold, the paper's 160/180 of 200 scaled to ``epochs``.

    Example:
        >>> scaled_milestones(200), scaled_milestones(10), scaled_milestones(5), scaled_milestones(2)
        ((160, 180), (8, 9), (3, 4), (2, 2))
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if epochs < 3:  # too short for three stages: lr 1 throughout
        return epochs, epochs
    first = min(math.floor(epochs * PAPER_MILESTONES[0] / PAPER_EPOCHS + 0.5), epochs - 2)
    second = min(math.floor(epochs * PAPER_MILESTONES[1] / PAPER_EPOCHS + 0.5), epochs - 1)
    return first, max(first + 1, second)


def paper_lr(epoch: int, epochs: int, base_lr: float = PAPER_LR) -> float:
    """Learning rate of (0-based) ``epoch`` out of ``epochs``: ``base_lr * 0.1 ** (milestones passed)``."""
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in [0, {epochs}), got {epoch}")
    passed = sum(epoch >= milestone for milestone in scaled_milestones(epochs))
    return base_lr * DECAY**passed


def paper_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch scheduler (call ``step()`` once per epoch) following :func:`paper_lr` from the optimizer's lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: paper_lr(min(epoch, epochs - 1), epochs, 1.0))
