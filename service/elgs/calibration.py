"""Calibrate the attack-score thresholds of a model on clean images (``elgs calibrate``).

For every method and lambda (and, for SLGS/WLGS, every saliency estimator asked for) the clean
images go through the engine's own two passes and the attack score (L1 distance of the two softmax
vectors) is recorded. The threshold is the smallest score that at most a fraction ``fpr`` of the
clean images exceed (:func:`threshold_at_fpr`). Pass 1 runs once per image and estimator and is
shared by every method and lambda; each setting costs one pass 2. The code is the engine's
(:func:`elgs.engine.first_pass`, :func:`~elgs.engine.defend`, :func:`~elgs.engine.second_pass`), so the
scores are what the service computes for the same requests (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from elgs.defenses import DEFAULT_THRESHOLD, get_defense, parse_saliency
from elgs.engine import (
    NO_REMOVAL,
    ModelDefaults,
    Request,
    attack_scores,
    defend,
    first_pass,
    resolve_request,
    second_pass,
    verdicts,
)
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
    expanded = []
    for method in methods:  # a cascade is judged by its screen's and its strong defence's thresholds
        defense = get_defense(method)
        expanded += [defense.screen, defense.escalates_to] if defense.escalates_to else [method]
    for method in dict.fromkeys(expanded):
        defense = get_defense(method)
        for lam in lambdas if defense.uses_lambda else [None]:
            for spec in specs if defense.needs_saliency else [None]:
                settings.append(Setting(method, lam, spec))
    return settings


@dataclass
class CleanViews:
    """Per setting, what the engine's verdict needs of each clean image (N images, in order).

    Attributes:
        scores: attack scores (N,).
        original: pass-1 top-1 classes (N,).
        defended: pass-2 top-1 classes (N,).
        removal: top-1 classes with the suspect removed (N,), :data:`elgs.engine.NO_REMOVAL` without a check.
        kinds: the kind of each image (e.g. ``crops``, ``photos``), N strings.
    """

    scores: torch.Tensor
    original: torch.Tensor
    defended: torch.Tensor
    removal: torch.Tensor
    kinds: list[str]

    def verdict_scores(self) -> torch.Tensor:
        """Each image's score where the verdict could call it attacked at some threshold (changed top-1, removal
        check failed), else 0: the verdict is attacked exactly where this is above the threshold."""
        could = verdicts(self.original, self.defended, self.scores, -1.0, self.removal)[1]
        return torch.where(could, self.scores, torch.zeros_like(self.scores))

    def attacked(self, threshold: float) -> torch.Tensor:
        """The engine's verdict at ``threshold`` for each image (:func:`elgs.engine.verdicts`), (N,) bool."""
        return verdicts(self.original, self.defended, self.scores, threshold, self.removal)[1]

    def flagged_by_kind(self, threshold: float) -> dict[str, float]:
        """The share of each kind's images the verdict calls attacked at ``threshold``."""
        attacked = self.attacked(threshold)
        return {kind: round(float(attacked[[k == kind for k in self.kinds]].float().mean()), 6)
                for kind in dict.fromkeys(self.kinds)}


Chunk = torch.Tensor | tuple[torch.Tensor, Sequence[str]]


def _setting_request(image: torch.Tensor, setting: Setting, threshold: float) -> Request:
    return Request(image=image, task="defend", method=setting.method, lam=setting.lam, threshold=threshold,
                   saliency=setting.saliency)


def clean_views(model: LoadedModel, chunks: Iterable[Chunk], settings: Sequence[Setting],
                threshold: float = DEFAULT_THRESHOLD) -> dict[Setting, CleanViews]:
    """What the engine's two passes give clean images for each setting.

    The passes are the engine's own (:func:`elgs.engine.first_pass`, :func:`~elgs.engine.defend`,
    :func:`~elgs.engine.second_pass`): pass 1 runs once per chunk and estimator, each setting adds a pass 2.

    Args:
        model: the model.
        chunks: batches of pixel-space images (b, 3, S, S) in [0, 1], each alone (kind ``images``) or with
            the kind of each image, e.g. ``(images, ["crops"] * b)``.
        settings: what to score.
        threshold: the gradient-map block threshold.
    """
    defaults = ModelDefaults.of_model(model)
    collected: dict[Setting, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {s: [] for s in settings}
    kinds: list[str] = []
    specs = list(dict.fromkeys(s.saliency for s in settings))
    for chunk in chunks:
        images, chunk_kinds = chunk if isinstance(chunk, tuple) else (chunk, ["images"] * chunk.shape[0])
        kinds.extend(chunk_kinds)
        x = model.to_input(images.to(dtype=torch.float32))
        for spec in specs:
            group = [s for s in settings if s.saliency == spec]
            first = first_pass(model, x, [resolve_request(_setting_request(image, group[0], threshold), defaults)
                                          for image in images])
            original_top1 = first.logits.argmax(dim=1)
            for setting in group:
                requests = [resolve_request(_setting_request(image, setting, threshold), defaults) for image in images]
                defended = defend(model, x, requests, first.saliency)
                logits, removal_logits = second_pass(model, defended)
                removal = torch.full_like(original_top1, NO_REMOVAL)
                if defended.removal_rows:
                    removal[torch.tensor(defended.removal_rows, device=x.device)] = removal_logits.argmax(dim=1)
                collected[setting].append((attack_scores(first.logits, logits).cpu(), original_top1.cpu(),
                                           logits.argmax(dim=1).cpu(), removal.cpu()))
    empty = torch.empty(0, dtype=torch.long)
    return {s: CleanViews(*(torch.cat([v[i] for v in values]) for i in range(4)), kinds=list(kinds))
            if values else CleanViews(torch.empty(0), empty, empty, empty, [])
            for s, values in collected.items()}


def clean_scores(model: LoadedModel, chunks: Iterable[Chunk], settings: Sequence[Setting],
                 threshold: float = DEFAULT_THRESHOLD) -> dict[Setting, torch.Tensor]:
    """Attack scores of clean images for each setting, ``{setting: scores (N,)}`` (:func:`clean_views`)."""
    return {s: views.scores for s, views in clean_views(model, chunks, settings, threshold).items()}


def calibrate(model: LoadedModel, chunks: Iterable[Chunk], *, fpr: float = 0.05, verdict_fpr: float = 0.01,
              methods: Sequence[str] = DEFAULT_METHODS, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
              saliencies: Sequence[str] = (), data: str = "") -> AttackThresholds:
    """Thresholds of ``model`` at false-positive rate ``fpr`` from clean images.

    The threshold is the score that at most ``fpr`` of the clean images exceed (``clean_flagged``: how many
    do), raised where needed until the full verdict calls at most ``verdict_fpr`` of them attacked; each
    entry also records the share of clean images the full verdict (changed top-1, score, removal
    check) calls attacked, overall (``false_positive_rate``) and per kind of image (``false_positive_by_kind``).

    Returns:
        :class:`~elgs.thresholds.AttackThresholds` ready for :func:`elgs.thresholds.write_calibration`.
    """
    for name, value in (("fpr", fpr), ("verdict_fpr", verdict_fpr)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    settings = settings_for(model, methods, lambdas, saliencies)
    views = clean_views(model, chunks, settings)
    images = next(iter(views.values())).scores.numel() if views else 0
    if images == 0:
        raise ValueError("no images to calibrate on")
    entries = []
    for setting, clean in views.items():
        threshold = max(threshold_at_fpr(clean.scores, fpr), threshold_at_fpr(clean.verdict_scores(), verdict_fpr))
        entries.append(ThresholdEntry(method=setting.method, lam=setting.lam, saliency=setting.saliency,
                                      threshold=threshold,
                                      clean_flagged=round(float((clean.scores > threshold).float().mean()), 6),
                                      false_positive_rate=round(float(clean.attacked(threshold).float().mean()), 6),
                                      false_positive_by_kind=clean.flagged_by_kind(threshold)))
    return AttackThresholds(model=model.name, input_size=model.input_size, fpr=fpr, verdict_fpr=verdict_fpr,
                            images=images, data=data,
                            entries=tuple(entries), default_saliency=parse_saliency(model.spec.default_saliency).spec)
