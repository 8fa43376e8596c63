"""Detector metrics for the attack score: AUROC, rank-based with ties counted one half."""

from __future__ import annotations

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` (N,), tied values sharing the mean of their ranks.

    Args:
        values: (N,) real numbers.

    Returns:
        (N,) float64 ranks; e.g. ``[0.3, 0.1, 0.3]`` -> ``[2.5, 1.0, 2.5]``.
    """
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
    _, inverse, counts = torch.unique(values.double(), sorted=True, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # how many values are strictly smaller than each distinct value
    return (below.double() + (counts.double() + 1) / 2)[inverse]


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of a score that should be higher on ``positives``.

    The Mann-Whitney form: the probability that a random positive scores above a random negative,
    a tie counting one half. Equal to the trapezoidal area under the empirical ROC curve.

    Args:
        negatives: (N,) scores of the negative class (e.g. clean images).
        positives: (P,) scores of the positive class (e.g. attacked images).

    Returns:
        AUROC in [0, 1]; 0.5 when the score does not separate the classes.

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.35]), torch.tensor([0.8, 0.4]))  # (3 + 2.5) / 6
        0.9166666666666666
    """
    negatives, positives = torch.as_tensor(negatives).flatten(), torch.as_tensor(positives).flatten()
    if len(negatives) == 0 or len(positives) == 0:
        raise ValueError(f"need at least one score of each class, got {len(negatives)} negatives and "
                         f"{len(positives)} positives")
    for name, scores in (("negatives", negatives), ("positives", positives)):
        if not torch.isfinite(scores.double()).all():
            raise ValueError(f"{name} must be finite, got {scores[~torch.isfinite(scores.double())][:3].tolist()}")
    ranks = average_ranks(torch.cat([negatives.double(), positives.double()]))
    count_p, count_n = len(positives), len(negatives)
    rank_sum = ranks[count_n:].sum()
    return float((rank_sum - count_p * (count_p + 1) / 2) / (count_p * count_n))

