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
    MIN_ANSWER_PROBABILITY,
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
from elgs.thresholds import REMOVAL_VIEW, AttackThresholds, ThresholdEntry

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
        removal_scores: attack scores of the removal view (N,), 0 without a check.
        kinds: the kind of each image (e.g. ``crops``, ``photos``), N strings.
        probability: the original top-1 probabilities (N,); None: every answer counts
            (:data:`elgs.engine.MIN_ANSWER_PROBABILITY`).
    """

    scores: torch.Tensor
    original: torch.Tensor
    defended: torch.Tensor
    removal: torch.Tensor
    removal_scores: torch.Tensor
    kinds: list[str]
    probability: torch.Tensor | None = None

    @property
    def has_removal(self) -> bool:
        """Whether the setting's defence has the removal check (the gradient defences)."""
        return bool((self.removal != NO_REMOVAL).any())

    def removal_verdict_scores(self) -> torch.Tensor:
        """Each image's removal-view score where that view changed the top-1, else 0: the removal view alone calls
        an image attacked exactly where this is above its threshold."""
        changed = (self.removal != self.original) & (self.removal != NO_REMOVAL)
        if self.probability is not None:
            changed &= self.probability >= MIN_ANSWER_PROBABILITY
        return torch.where(changed, self.removal_scores, torch.zeros_like(self.removal_scores))

    def verdict_scores(self, removal_threshold: float | None = None) -> torch.Tensor:
        """Each image's score where the defended view could call it attacked at some threshold (changed top-1,
        removal check failed) and the removal view at ``removal_threshold`` does not already, else 0: the
        verdict is attacked where this is above the threshold, or the removal view says so."""
        could = verdicts(self.original, self.defended, self.scores, -1.0, self.removal, probability=self.probability)[1]
        could &= ~self.attacked_by_removal(removal_threshold)
        return torch.where(could, self.scores, torch.zeros_like(self.scores))

    def attacked_by_removal(self, removal_threshold: float | None) -> torch.Tensor:
        """The images the removal view alone calls attacked at ``removal_threshold``, (N,) bool."""
        if removal_threshold is None:
            return torch.zeros_like(self.scores, dtype=torch.bool)
        return self.removal_verdict_scores() > removal_threshold

    def attacked(self, threshold: float, removal_threshold: float | None = None) -> torch.Tensor:
        """The engine's verdict at ``threshold`` (and ``removal_threshold``) for each image
        (:func:`elgs.engine.verdicts`), (N,) bool."""
        return verdicts(self.original, self.defended, self.scores, threshold, self.removal,
                        self.removal_scores, removal_threshold, self.probability)[1]

    def flagged_by_kind(self, threshold: float, removal_threshold: float | None = None) -> dict[str, float]:
        """The share of each kind's images the verdict calls attacked at ``threshold``."""
        return _share_by_kind(self.attacked(threshold, removal_threshold), self.kinds)


def _share_by_kind(flags: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    return {kind: round(float(flags[[k == kind for k in kinds]].float().mean()), 6) for kind in dict.fromkeys(kinds)}


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
    collected: dict[Setting, list[tuple[torch.Tensor, ...]]] = {s: [] for s in settings}
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
            probability, original_top1 = torch.softmax(first.logits.float(), dim=1).max(dim=1)
            for setting in group:
                requests = [resolve_request(_setting_request(image, setting, threshold), defaults) for image in images]
                defended = defend(model, x, requests, first.saliency)
                logits, removal_logits = second_pass(model, defended)
                removal = torch.full_like(original_top1, NO_REMOVAL)
                removal_scores = torch.zeros(len(images))
                if defended.removal_rows:
                    rows = torch.tensor(defended.removal_rows, device=x.device)
                    removal[rows] = removal_logits.argmax(dim=1)
                    removal_scores[rows.cpu()] = attack_scores(first.logits[rows], removal_logits).cpu()
                collected[setting].append((attack_scores(first.logits, logits).cpu(), original_top1.cpu(),
                                           logits.argmax(dim=1).cpu(), removal.cpu(), removal_scores,
                                           probability.detach().cpu()))
    empty = torch.empty(0, dtype=torch.long)
    return {s: CleanViews(*(torch.cat([v[i] for v in values]) for i in range(5)), kinds=list(kinds),
                          probability=torch.cat([v[5] for v in values]))
            if values else CleanViews(torch.empty(0), empty, empty, empty, torch.empty(0), [], torch.empty(0))
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
    For each lambda of the gradient defences the removal view gets its own entry (method
    :data:`~elgs.thresholds.REMOVAL_VIEW`), set first so that it alone calls at most half of ``verdict_fpr``
    of the clean images attacked; the defended views' thresholds then share what is left of ``verdict_fpr``.

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
    removal_thresholds: dict[float | None, float] = {}
    for setting, clean in views.items():  # the removal view: one per lambda, whichever defence computed it
        if clean.has_removal and setting.lam not in removal_thresholds:
            removal_threshold = threshold_at_fpr(clean.removal_verdict_scores(), verdict_fpr / 2)
            removal_thresholds[setting.lam] = removal_threshold
            by_removal = clean.attacked_by_removal(removal_threshold)
            rate = round(float(by_removal.float().mean()), 6)
            entries.append(ThresholdEntry(method=REMOVAL_VIEW, lam=setting.lam, saliency=None,
                                          threshold=removal_threshold, clean_flagged=rate, false_positive_rate=rate,
                                          false_positive_by_kind=_share_by_kind(by_removal, clean.kinds)))
    for setting, clean in views.items():
        removal_threshold = removal_thresholds.get(setting.lam) if clean.has_removal else None
        left = max(verdict_fpr - float(clean.attacked_by_removal(removal_threshold).float().mean()), 0.0)
        threshold = max(threshold_at_fpr(clean.scores, fpr), threshold_at_fpr(clean.verdict_scores(removal_threshold),
                                                                                left))
        attacked = clean.attacked(threshold, removal_threshold)
        entries.append(ThresholdEntry(method=setting.method, lam=setting.lam, saliency=setting.saliency,
                                      threshold=threshold,
                                      clean_flagged=round(float((clean.scores > threshold).float().mean()), 6),
                                      false_positive_rate=round(float(attacked.float().mean()), 6),
                                      false_positive_by_kind=clean.flagged_by_kind(threshold, removal_threshold)))
    return AttackThresholds(model=model.name, input_size=model.input_size, fpr=fpr, verdict_fpr=verdict_fpr,
                            images=images, data=data,
                            entries=tuple(entries), default_saliency=parse_saliency(model.spec.default_saliency).spec)
