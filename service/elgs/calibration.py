"""Calibrate the attack-score thresholds of a model on clean images (``elgs calibrate``).

For every method and lambda (and, for SLGS/WLGS, every saliency estimator asked for) the clean
images go through the engine's two passes and the attack score (L1 distance of the two softmax
vectors) is recorded. The threshold is the smallest score that at most a fraction ``fpr`` of the
clean images exceed (:func:`threshold_at_fpr`). Pass 1 runs once per image and estimator and is
shared by every method and lambda; each setting costs one pass 2. The results are what
:class:`elgs.engine.Engine` computes for the same requests (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from elgs.defenses import DEFAULT_THRESHOLD, DefenseInput, get_defense, parse_saliency, saliency_pass
from elgs.engine import attack_scores
from elgs.models import LoadedModel
from elgs.thresholds import AttackThresholds, ThresholdEntry

DEFAULT_METHODS = ("lgs", "slgs", "wlgs", "jpeg", "median", "gaussian")
DEFAULT_LAMBDAS = (2.3, 2.7, 3.5)


@dataclass(frozen=True)
class Setting:
    """One calibrated combination: ``method`` at ``lam`` (None without one) with ``saliency`` (canonical spec or None)."""

    method: str
    lam: float | None
    saliency: str | None


def threshold_at_fpr(scores: torch.Tensor, fpr: float) -> float:
    """The smallest observed score ``t`` with at most ``fpr`` of ``scores`` strictly above it.

    Args:
        scores: clean-image scores of shape (N,), N >= 1.
        fpr: false-positive rate in [0, 1).

    Returns:
        the threshold (the ``ceil((1 - fpr) * N)``-th smallest score).

    Example:
        >>> threshold_at_fpr(torch.tensor([0.1, 0.4, 0.2, 0.3]), 0.25)
        0.30000001192092896
    """
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"scores must have shape (N,) with N >= 1, got {tuple(scores.shape)}")
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    rank = math.ceil(round((1 - fpr) * scores.numel(), 9))
    return float(scores.sort().values[max(rank, 1) - 1])


def settings_for(model: LoadedModel, methods: Sequence[str], lambdas: Sequence[float],
                 saliencies: Sequence[str] = ()) -> list[Setting]:
    """Every combination to calibrate; SLGS/WLGS get the model's default estimator plus ``saliencies``.

    Raises:
        KeyError: an unknown method; ValueError: a bad saliency spec.
    """
    default = parse_saliency(model.spec.default_saliency)
    specs = [default.spec] + [parse_saliency(s, base=default).spec for s in saliencies]
    specs = list(dict.fromkeys(specs))
    lambdas = sorted(set(lambdas) | {model.spec.default_lambda})
    settings = []
    for method in methods:
        defense = get_defense(method)
        for lam in lambdas if defense.uses_lambda else [None]:
            for spec in specs if defense.needs_saliency else [None]:
                settings.append(Setting(method, lam, spec))
    return settings


def clean_scores(model: LoadedModel, chunks: Iterable[torch.Tensor], settings: Sequence[Setting],
                 threshold: float = DEFAULT_THRESHOLD) -> dict[Setting, torch.Tensor]:
    """Attack scores of clean images for each setting.

    Args:
        model: the model.
        chunks: batches of pixel-space images (b, 3, S, S) in [0, 1].
        settings: what to score.
        threshold: the gradient-map block threshold.

    Returns:
        ``{setting: scores (N,)}``.
    """
    scores: dict[Setting, list[torch.Tensor]] = {s: [] for s in settings}
    specs = list(dict.fromkeys(s.saliency for s in settings))
    for images in chunks:
        x = images.to(device=model.device, dtype=torch.float32)
        batch = x.shape[0]
        for spec in specs:
            config = parse_saliency(spec) if spec is not None else None
            first = saliency_pass(model.module, x, model.normalize, [config] * batch)
            for setting in (s for s in settings if s.saliency == spec):
                defense = get_defense(setting.method)
                output = defense.apply(DefenseInput(
                    x=x, mean=model.mean, std=model.std, lam=torch.full((batch,), setting.lam or 0.0, device=x.device),
                    threshold=torch.full((batch,), threshold, device=x.device), saliency=first.saliency,
                    saliency_quantile=torch.full((batch,), config.quantile, device=x.device) if config else None,
                ))
                with torch.inference_mode():
                    defended = model.module(model.normalize(output.image.to(torch.float32)))
                scores[setting].append(attack_scores(first.logits, defended).cpu())
    return {s: torch.cat(v) if v else torch.empty(0) for s, v in scores.items()}


def calibrate(model: LoadedModel, chunks: Iterable[torch.Tensor], *, fpr: float = 0.05,
              methods: Sequence[str] = DEFAULT_METHODS, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
              saliencies: Sequence[str] = (), data: str = "") -> AttackThresholds:
    """Thresholds of ``model`` at false-positive rate ``fpr`` from clean images.

    Returns:
        :class:`~elgs.thresholds.AttackThresholds` ready for :func:`elgs.thresholds.write_calibration`.
    """
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    settings = settings_for(model, methods, lambdas, saliencies)
    scores = clean_scores(model, chunks, settings)
    images = next(iter(scores.values())).numel() if scores else 0
    if images == 0:
        raise ValueError("no images to calibrate on")
    entries = []
    for setting, values in scores.items():
        threshold = threshold_at_fpr(values, fpr)
        entries.append(ThresholdEntry(method=setting.method, lam=setting.lam, saliency=setting.saliency,
                                      threshold=threshold,
                                      clean_flagged=round(float((values > threshold).float().mean()), 6)))
    return AttackThresholds(model=model.name, input_size=model.input_size, fpr=fpr, images=images, data=data,
                            entries=tuple(entries), default_saliency=parse_saliency(model.spec.default_saliency).spec)
