"""The two-pass engine (design.md, section 3): one batch of requests for one model in, one result per request out.

Pass 1 is one forward on the original images; it carries the input gradient only when a request
of the batch needs a saliency map (``slgs``, ``wlgs``, the ``saliency`` task), and then one backward
of those requests' summed losses. A ``smoothgrad`` request adds its noisy copies to that same
forward (:func:`elgs.defenses.saliency_pass`). The defences run batched per method. Pass 2 is one
forward on all defended images, plus, for the gradient defences, each image with its suspected patch
removed outright (the removal check). Every ``defend`` result carries the attack score (L1 distance
of the two softmax vectors), the verdict (:func:`judge`) against the model's calibrated threshold
(:mod:`elgs.thresholds`) and the predictions to trust.

A cascade (``auto``) runs in rounds: :meth:`Engine.run_round` screens (pass 1 without a gradient,
LGS, pass 2) and answers the requests its screen passes; a flagged one comes back with
``Result.escalate``, the strong stage's request, which the caller runs in a later round (the
batcher, batched with other flagged requests; :meth:`Engine.run` at once). So a request costs at
most four model calls and a batch of clean ones two. The engine knows nothing of HTTP; the batcher,
the CLI, calibration and the attack evaluation call it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from elgs.defenses import (
    DEFAULT_THRESHOLD,
    LAMBDA_RANGE,
    THRESHOLD_RANGE,
    Defense,
    DefenseInput,
    REMOVAL_FILL_SIGMA,
    PassOne,
    SaliencyConfig,
    fill_from_surroundings,
    get_defense,
    parse_saliency,
    saliency_pass,
    saliency_region,
)
from elgs.errors import ServiceError
from elgs.models import LoadedModel
from elgs.thresholds import REMOVAL_VIEW, SCORE_RANGE, AttackThresholds, load_thresholds

Task = Literal["classify", "defend", "saliency"]
TOP_K = 5


class UnknownMethodError(ServiceError, KeyError):
    """The requested defence is not registered."""

    status = 404

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class InvalidParameterError(ServiceError, ValueError):
    """A request parameter is out of its range."""

    status = 422


@dataclass(frozen=True)
class Prediction:
    """A class and its softmax probability."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Stage:
    """One defence's view of a request and what its verdict said.

    Attributes:
        method: the defence that made the view (``lgs`` for ``auto``'s screen, ``slgs`` for its strong path).
        lam: its lambda.
        attack_score: L1 distance of the original and defended softmax vectors, in [0, 2].
        attack_threshold: the threshold it was judged against (None: not calibrated).
        flagged: the defence changed the top-1 and the score is above the threshold (None: no threshold).
        predictions: the defended top-5.
    """

    method: str
    lam: float | None
    attack_score: float
    attack_threshold: float | None
    flagged: bool | None
    predictions: list[Prediction]


@dataclass(frozen=True)
class Request:
    """One image and what to do with it.

    Attributes:
        image: pixel-space image in [0, 1], (3, S, S) at the model's input size; before it reaches
            :meth:`Engine.run` also an RGB uint8 NumPy array (S, S, 3) (the batcher converts it) or None
            (:func:`resolve_request` then checks the parameters alone).
        task: ``classify`` (pass 1 only), ``defend`` (both passes) or ``saliency`` (pass 1 with ``S``).
        method: a registered defence name (``defend`` only).
        lam: smoothing factor; None takes the model's default.
        threshold: gradient-map block threshold; None takes 0.2.
        saliency: saliency estimator spec (:func:`elgs.defenses.parse_saliency`), used by ``slgs``,
            ``wlgs`` and the ``saliency`` task; None takes the model's default. Resolved requests hold
            the canonical spec.
        attack_threshold: attack-score threshold in [0, 2] overriding the calibrated one (``defend``; for a
            cascade, its strong stage's: the one that decides ``attacked``).
        screen: set on a cascade's second round only: what its screen saw (the engine then runs the
            cascade's strong defence); made by the engine (``Result.escalate``), never by a client.
    """

    image: torch.Tensor | np.ndarray | None
    task: Task = "defend"
    method: str = "none"
    lam: float | None = None
    threshold: float | None = None
    saliency: str | None = None
    attack_threshold: float | None = None
    screen: Stage | None = None


@dataclass
class Result:
    """What the engine returns for one request; tensors are on the CPU.

    Attributes:
        predictions: top-5 on the original image (pass 1).
        defended_predictions: top-5 on the defended image (pass 2), ``defend`` only.
        image: defended image (3, S, S) in [0, 1], ``defend`` only.
        mask: applied suppression (1, S, S) in [0, 1], ``defend`` only.
        saliency: ``S`` (S, S) when it was computed.
        region: SLGS saliency region (1, S, S), ``saliency`` task only.
        lam: the lambda used (None where the method has none).
        threshold: the threshold used (None where the method has none).
        batch_size: how many requests shared the batch.
        timing_ms: the batch's ``pass1``, ``defense`` and ``pass2`` wall times.
        saliency_method: canonical spec of the saliency estimator used (None when none was).
        attack_score: L1 distance between the softmax vectors of pass 1 and pass 2, in [0, 2] (``defend``).
        attack_threshold: the threshold ``attacked`` was decided with (None: not calibrated).
        attacked: the verdict (:func:`judge`); None when it needed a threshold and there is none.
        final_predictions: the original top-5 unless attacked; when attacked, the top-5 with the suspect
            removed (gradient defences; the defended top-5 for the filters); when undecided, the defended top-5.
        removal_prediction: top-1 with the suspected patch removed outright (gradient defences), which
            the verdict checks the original answer against.
        removal_score: L1 distance of the original and the removal view's softmax vectors, in [0, 2]
            (gradient defences).
        removal_threshold: the calibrated threshold above which the removal view alone flags the image
            (None: not calibrated, then only the defended view can).
        stages: every defence view the request computed, in order (a cascade: screen, then strong).
        path: for a cascade, ``screen`` (its screen answered) or ``strong``; None otherwise.
        escalate: for a cascade's screen that flagged the image, the request of its strong stage, to be
            run in a later round; None otherwise (then the result is final).
    """

    predictions: list[Prediction]
    defended_predictions: list[Prediction] | None = None
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    saliency: torch.Tensor | None = None
    region: torch.Tensor | None = None
    lam: float | None = None
    threshold: float | None = None
    batch_size: int = 1
    timing_ms: dict[str, float] = field(default_factory=dict)
    saliency_method: str | None = None
    attack_score: float | None = None
    attack_threshold: float | None = None
    attacked: bool | None = None
    final_predictions: list[Prediction] | None = None
    removal_prediction: Prediction | None = None
    removal_score: float | None = None
    removal_threshold: float | None = None
    stages: list[Stage] = field(default_factory=list)
    path: str | None = None
    escalate: Request | None = None


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> float:
    value = float(value)
    if not math.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        raise InvalidParameterError(f"{name} must be a number in [{bounds[0]:g}, {bounds[1]:g}], got {value}")
    return value


def attack_scores(original_logits: torch.Tensor, defended_logits: torch.Tensor) -> torch.Tensor:
    """L1 distance between the softmax vectors of the same images before and after the defence.

    Args:
        original_logits: tensor of shape (B, N).
        defended_logits: tensor of shape (B, N).

    Returns:
        tensor of shape (B,) in [0, 2] (float32), rounded to 1e-6.
    """
    if original_logits.shape != defended_logits.shape or original_logits.ndim != 2:
        raise ValueError(f"logits must both have shape (B, N), got {tuple(original_logits.shape)} "
                         f"and {tuple(defended_logits.shape)}")
    original = torch.softmax(original_logits.detach().float(), dim=1)
    defended = torch.softmax(defended_logits.detach().float(), dim=1)
    # Rounded to 1e-6: below that it is float32 noise that varies with the batch's shape (a defence that
    # changes nothing scores 0 whoever shares the batch), not a difference between the two answers.
    return ((original - defended).abs().sum(dim=1) * 1e6).round().div(1e6).clamp(*SCORE_RANGE)


def decide(score: float, threshold: float | None) -> bool | None:
    """``score > threshold``; None without a threshold."""
    return None if threshold is None else bool(score > threshold)


NO_REMOVAL = -1  # in a removal top-1 tensor: the image had no removal check
# The least original top-1 probability the verdict protects. Below it the model gives no answer a patch could
# have made (the patches here push their class to 0.25 and more), and a view that reshuffles such a flat
# softmax is no attack: texture photographs (gravel 0.05, cell 0.03) moved it past the thresholds.
MIN_ANSWER_PROBABILITY = 0.1


def verdicts(original: torch.Tensor, defended: torch.Tensor, scores: torch.Tensor, threshold: float,
             removal: torch.Tensor | None = None, removal_scores: torch.Tensor | None = None,
             removal_threshold: float | None = None,
             probability: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The verdict of many images: ``(flagged, attacked)``, bool tensors (N,) (design.md, section 3.2).

    ``flagged``: a view changed the top-1 *and* moved the softmax by more than its threshold (a
    probability shift that keeps the answer is harmless): the defended view (``scores > threshold``) or
    the removal view (``removal_scores > removal_threshold``, when calibrated); never an image whose original
    top-1 probability is below :data:`MIN_ANSWER_PROBABILITY` (no answer to protect). ``attacked``: flagged, and
    the original top-1 does not survive removing the suspected patch outright (``removal``; when it
    survives, the patch was not what made the answer, so a defence that changed it was steered, not
    repairing).

    Args:
        original: pass-1 top-1 classes (N,).
        defended: pass-2 top-1 classes (N,).
        scores: attack scores of the defended view (N,).
        threshold: the attack-score threshold of the defended view.
        removal: top-1 classes with the suspect removed (N,), :data:`NO_REMOVAL` where there was no check;
            None: no check for any image.
        removal_scores: attack scores of the removal view (N,) (ignored where there was no check).
        removal_threshold: their threshold; None: the removal view does not flag on its own.
        probability: the original top-1 probabilities (N,); None: every answer counts.
    """
    flagged = (defended != original) & (scores > threshold)
    if removal is not None and removal_scores is not None and removal_threshold is not None:
        flagged = flagged | ((removal != original) & (removal != NO_REMOVAL) & (removal_scores > removal_threshold))
    if probability is not None:
        flagged = flagged & (probability >= MIN_ANSWER_PROBABILITY)
    return flagged, flagged if removal is None else flagged & (removal != original)


def judge(original_top1: int, defended_top1: int, score: float, threshold: float | None,
          removal_top1: int | None = None, removal_score: float | None = None,
          removal_threshold: float | None = None, probability: float | None = None) -> tuple[bool | None, bool | None]:
    """:func:`verdicts` of one image, ``(flagged, attacked)`` (design.md, section 3.2); ``probability``: the
    original top-1's.

    Without a threshold a changed top-1 is undecided (None) unless the removal view flags it; an image
    neither view changes, or whose original top-1 is below :data:`MIN_ANSWER_PROBABILITY`, is never attacked.
    """
    flagged, attacked = verdicts(
        torch.tensor([original_top1]), torch.tensor([defended_top1]), torch.tensor([score]),
        math.inf if threshold is None else threshold,  # no threshold: only the removal view can flag
        None if removal_top1 is None else torch.tensor([removal_top1]),
        None if removal_score is None else torch.tensor([removal_score]), removal_threshold,
        None if probability is None else torch.tensor([probability]))
    answers = probability is None or probability >= MIN_ANSWER_PROBABILITY
    if threshold is None and not attacked and defended_top1 != original_top1 and answers:
        return None, None
    return bool(flagged), bool(attacked)


def resolve_saliency(spec: str | None, default: SaliencyConfig | str) -> SaliencyConfig:
    """A request's ``?saliency=`` spec resolved against a model's default estimator (None: the default).

    Raises:
        InvalidParameterError: the spec is malformed or out of range.
    """
    try:
        default = parse_saliency(default) if isinstance(default, str) else default
        return default if spec is None else parse_saliency(spec, base=default)
    except (ValueError, TypeError) as error:
        raise InvalidParameterError(f"saliency: {error}") from None


@dataclass(frozen=True)
class ModelDefaults:
    """What checking a request needs to know of its model, from :meth:`LoadedModel.describe` (which a
    Ray Serve model deployment answers too): no weights, no device."""

    name: str
    input_size: int
    default_lambda: float
    default_saliency: str = "gradient"

    @classmethod
    def of_model(cls, model: LoadedModel) -> ModelDefaults:
        """The defaults of a loaded model (its spec)."""
        return cls(name=model.name, input_size=model.input_size, default_lambda=model.spec.default_lambda,
                   default_saliency=getattr(model.spec, "default_saliency", "gradient"))

    @classmethod
    def of(cls, description: dict) -> ModelDefaults:
        return cls(name=description["name"], input_size=int(description["input_size"]),
                   default_lambda=float(description["default_lambda"]),
                   default_saliency=description.get("default_saliency") or "gradient")


def _check_image(image: object, model: ModelDefaults) -> None:
    if image is None:
        return
    size = model.input_size
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.shape != (size, size, 3):
            raise InvalidParameterError(f"image array must be uint8 of shape ({size}, {size}, 3) for {model.name}, "
                                        f"got {image.dtype} {image.shape}")
    elif tuple(image.shape) != (3, size, size):
        raise InvalidParameterError(
            f"image must have shape (3, {size}, {size}) for {model.name}, got {tuple(image.shape)}")


def resolve_request(request: Request, model: ModelDefaults) -> Request:
    """Validate ``request`` for ``model`` and fill its defaults: the one check of a request's parameters.

    The API calls it before it decodes the upload (``image`` None), the batcher before it queues the
    request (a uint8 array or a tensor; no torch op), the engine before it runs a batch. Idempotent: a
    resolved request resolves to itself. Only the image's shape and dtype are read.

    Raises:
        UnknownMethodError: the method is not a registered defence.
        InvalidParameterError: lambda, threshold, saliency spec, attack threshold, task or image shape is invalid.
    """
    if request.task not in ("classify", "defend", "saliency"):
        raise InvalidParameterError(f"task must be classify, defend or saliency, got {request.task!r}")
    _check_image(request.image, model)
    attack_threshold = request.attack_threshold
    if attack_threshold is not None:
        attack_threshold = _check_range("attack_threshold", attack_threshold, SCORE_RANGE)
    if request.task == "classify":
        return Request(image=request.image, task="classify")
    if request.task == "saliency":
        return Request(image=request.image, task="saliency",
                       saliency=resolve_saliency(request.saliency, model.default_saliency).spec)
    try:
        defense = get_defense(request.method)
    except KeyError as error:
        raise UnknownMethodError(str(error.args[0])) from None
    lam = threshold = None
    if defense.uses_lambda:
        lam = _check_range("lambda", model.default_lambda if request.lam is None else request.lam, LAMBDA_RANGE)
    if defense.uses_threshold:
        threshold = _check_range("threshold", DEFAULT_THRESHOLD if request.threshold is None else request.threshold,
                                 THRESHOLD_RANGE)
    uses_saliency = defense.needs_saliency or (defense.escalates_to and get_defense(defense.escalates_to).needs_saliency)
    saliency = resolve_saliency(request.saliency, model.default_saliency).spec if uses_saliency else None
    if request.screen is not None and defense.escalates_to is None:
        raise InvalidParameterError(f"only a cascade has a second round, not {request.method!r}")
    return Request(image=request.image, task="defend", method=request.method, lam=lam, threshold=threshold,
                   saliency=saliency, attack_threshold=attack_threshold, screen=request.screen)


def stage_defense(request: Request) -> Defense:
    """The defence a resolved ``defend`` request runs in this round: its method's, or for a cascade its
    screen's (first round) or its strong defence's (second round, ``request.screen`` set)."""
    defense = get_defense(request.method)
    if defense.escalates_to is None:
        return defense
    return get_defense(defense.escalates_to if request.screen is not None else defense.screen)


def needs_saliency(request: Request) -> bool:
    """Whether a resolved request's pass 1 carries the input gradient."""
    return request.task == "saliency" or (request.task == "defend" and stage_defense(request).needs_saliency)


def pass_one_rows(request: Request) -> int:
    """Rows a resolved request adds to pass 1: the copies of its saliency estimator (SmoothGrad's ``n``), else 1."""
    return parse_saliency(request.saliency).n if needs_saliency(request) else 1


def first_pass(model: LoadedModel, x: torch.Tensor, requests: Sequence[Request]) -> PassOne:
    """Pass 1 of a batch of resolved requests: logits (B, N) and, where a request needs one, ``S`` (B, H, W).

    One model call; with the input gradient only when a request needs a saliency map.
    """
    configs = [parse_saliency(r.saliency) if needs_saliency(r) else None for r in requests]
    return saliency_pass(model.forward, x, model.normalize, configs, k=TOP_K, network=model.module)


@dataclass(frozen=True)
class DefendedBatch:
    """What the defences made of a batch of ``D`` defend requests.

    Attributes:
        images: defended images (D, 3, H, W) in [0, 1].
        masks: applied suppression (D, 1, H, W) in [0, 1].
        removal_rows: the rows that get the removal check (the gradient defences, a cascade's screen included).
        removal_images: those rows' images with the suspected patch replaced by its surroundings
            (:func:`~elgs.defenses.fill_from_surroundings`), (R, 3, H, W).
    """

    images: torch.Tensor
    masks: torch.Tensor
    removal_rows: list[int]
    removal_images: torch.Tensor


def defend(model: LoadedModel, x: torch.Tensor, requests: Sequence[Request],
           saliency: torch.Tensor | None) -> DefendedBatch:
    """Apply each request's defence (batched per defence) to its image.

    Args:
        model: supplies mean and std.
        x: pixel-space images (D, 3, H, W) in [0, 1], one per resolved ``defend`` request.
        requests: the requests, in the order of ``x``.
        saliency: ``S`` (D, H, W) from pass 1 (rows of defences without saliency are ignored), or None.
    """
    images = torch.empty_like(x)
    masks = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    removal = torch.zeros_like(masks)
    removal_rows: list[int] = []
    by_defense: dict[str, list[int]] = {}
    for row, request in enumerate(requests):
        by_defense.setdefault(stage_defense(request).name, []).append(row)
    for name, rows in by_defense.items():
        defense = get_defense(name)
        index = torch.tensor(rows, device=x.device)
        chosen = [requests[r] for r in rows]
        output = defense.apply(DefenseInput.of(
            x[index], model.mean, model.std, lam=[r.lam for r in chosen], threshold=[r.threshold for r in chosen],
            saliency=saliency[index] if defense.needs_saliency else None,
            saliency_quantile=[parse_saliency(r.saliency).quantile for r in chosen] if defense.needs_saliency else None,
        ))
        images[index] = output.image.to(x.dtype)
        masks[index] = output.mask.to(x.dtype)
        if output.removal is not None:
            removal[index] = output.removal.to(x.dtype)
            removal_rows += rows
    removal_rows.sort()
    index = torch.tensor(removal_rows, device=x.device, dtype=torch.long)
    removal_images = fill_from_surroundings(x[index], removal[index], REMOVAL_FILL_SIGMA * x.shape[-1])
    return DefendedBatch(images=images, masks=masks, removal_rows=removal_rows, removal_images=removal_images)


def second_pass(model: LoadedModel, defended: DefendedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2, one model call: logits of the defended images (D, N) and of the removal images (R, N)."""
    inputs = torch.cat([defended.images, defended.removal_images]) if defended.removal_rows else defended.images
    with torch.inference_mode():
        logits = model.forward(model.normalize(inputs))
    count = defended.images.shape[0]
    return logits[:count], logits[count:]


class Engine:
    """Runs batches of :class:`Request` through one :class:`~elgs.models.LoadedModel`.

    Args:
        model: the loaded model.
        thresholds: attack-score thresholds; None reads the calibration files for ``model``
            (:func:`elgs.thresholds.load_thresholds`), which finds none for random weights.
        calibration_file: the user's calibration file (``Settings.calibration_file``), read before the shipped
            one when ``thresholds`` is None; None: the default location.
    """

    def __init__(self, model: LoadedModel, thresholds: AttackThresholds | None = None,
                 calibration_file: str | os.PathLike | None = None) -> None:
        self.model = model
        if thresholds is None:
            thresholds = load_thresholds(model.name, model.input_size, model.weights, user_file=calibration_file)
        self.thresholds = thresholds

    @property
    def default_saliency(self) -> SaliencyConfig:
        """The model's own estimator (``ModelSpec.default_saliency``)."""
        return parse_saliency(getattr(self.model.spec, "default_saliency", "gradient"))

    def saliency_config(self, spec: str | None) -> SaliencyConfig:
        """``spec`` resolved against the model's default (None: the default itself).

        Raises:
            InvalidParameterError: the spec is malformed or out of range.
        """
        return resolve_saliency(spec, self.default_saliency)

    def attack_threshold(self, request: Request, defense: Defense | None = None) -> float | None:
        """The threshold that judges a resolved ``defend`` request's ``defense`` (default: this round's).

        A request's own ``attack_threshold`` judges the defence that decides ``attacked`` (for a cascade,
        the strong one; its screen keeps the calibrated threshold).
        """
        defense = stage_defense(request) if defense is None else defense
        screening = get_defense(request.method).escalates_to is not None and request.screen is None
        if request.attack_threshold is not None and not screening:
            return request.attack_threshold
        if self.thresholds is None:
            return None
        return self.thresholds.lookup(defense.name, request.lam, request.saliency)

    def removal_threshold(self, request: Request) -> float | None:
        """The calibrated threshold of a resolved ``defend`` request's removal view at its lambda (None: not
        calibrated). ``?attack_threshold=`` does not change it."""
        if self.thresholds is None:
            return None
        return self.thresholds.lookup(REMOVAL_VIEW, request.lam)

    @property
    def defaults(self) -> ModelDefaults:
        """The model's name, input size, default lambda and estimator, for :func:`resolve_request`."""
        return ModelDefaults.of_model(self.model)

    def resolve(self, request: Request) -> Request:
        """:func:`resolve_request` for this engine's model.

        Raises:
            UnknownMethodError: the method is not a registered defence.
            InvalidParameterError: lambda, threshold, task or image shape is invalid.
        """
        return resolve_request(request, self.defaults)

    def top_k(self, logits: torch.Tensor) -> list[list[Prediction]]:
        """The top-5 of each row of ``logits`` (B, N), with labels and softmax probabilities."""
        probabilities = torch.softmax(logits.detach().float(), dim=1)
        scores, indices = probabilities.topk(min(TOP_K, logits.shape[1]), dim=1)
        labels = self.model.labels
        return [
            [Prediction(int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)), float(s))
             for s, i in zip(row_scores, row_indices)]
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist())
        ]

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Run a batch to its final answers; result ``i`` is computed from ``requests[i]`` alone.

        A cascade's flagged requests run their strong stage in a second round, together.

        Raises:
            UnknownMethodError, InvalidParameterError: a request is invalid (nothing runs).
        """
        results = self.run_round(requests)
        escalated = [i for i, result in enumerate(results) if result.escalate is not None]
        if escalated:
            for i, result in zip(escalated, self.run_round([results[i].escalate for i in escalated])):
                results[i] = result
        return results

    def run_round(self, requests: Sequence[Request]) -> list[Result]:
        """One round, two passes: a cascade's screen hands its flagged requests back in ``Result.escalate``.

        Raises:
            UnknownMethodError, InvalidParameterError: a request is invalid (nothing runs).
        """
        if not requests:
            return []
        requests = [self.resolve(r) for r in requests]
        x = self.model.to_input(torch.stack([r.image for r in requests]))
        timing: dict[str, float] = {}
        started = time.perf_counter()
        first = first_pass(self.model, x, requests)
        original = self.top_k(first.logits)
        timing["pass1"] = (time.perf_counter() - started) * 1000
        results = [Result(predictions=original[i], batch_size=len(requests), timing_ms=timing)
                   for i in range(len(requests))]
        defend_rows = [i for i, r in enumerate(requests) if r.task == "defend"]
        if defend_rows:
            self._defend_rows(x, requests, defend_rows, first, results, timing)
        if first.saliency is not None:
            saliency = first.saliency.cpu()
            for i, request in enumerate(requests):
                if needs_saliency(request):
                    results[i].saliency, results[i].saliency_method = saliency[i], request.saliency
                    if request.task == "saliency":
                        results[i].region = saliency_region(saliency[i : i + 1])[0]
        for result in results:
            result.timing_ms = dict(timing)
        return results

    def _defend_rows(self, x: torch.Tensor, requests: list[Request], rows: list[int], first: PassOne,
                     results: list[Result], timing: dict[str, float]) -> None:
        """Defence and pass 2 of the ``defend`` rows; fills their results in place."""
        started = time.perf_counter()
        index = torch.tensor(rows, device=x.device)
        chosen = [requests[i] for i in rows]
        defended = defend(self.model, x[index], chosen,
                          first.saliency[index] if first.saliency is not None else None)
        timing["defense"] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        defended_logits, removal_logits = second_pass(self.model, defended)
        original_logits = first.logits[index]
        scores = attack_scores(original_logits, defended_logits).tolist()
        defended_top = self.top_k(defended_logits)
        removal_top = dict(zip(defended.removal_rows, self.top_k(removal_logits)))
        removal_scores = dict(zip(defended.removal_rows, attack_scores(
            original_logits[torch.tensor(defended.removal_rows, device=x.device, dtype=torch.long)],
            removal_logits).tolist()))
        timing["pass2"] = (time.perf_counter() - started) * 1000
        images, masks = defended.images.cpu(), defended.masks.cpu()
        for p, i in enumerate(rows):
            result = results[i]
            result.image, result.mask = images[p], masks[p]
            self._judge(chosen[p], result, defended_top[p], scores[p], removal_top.get(p), removal_scores.get(p))

    def _judge(self, request: Request, result: Result, defended: list[Prediction], score: float,
               removal: list[Prediction] | None, removal_score: float | None) -> None:
        """Fill one defend result's verdict fields from its views (:func:`judge`)."""
        defense = stage_defense(request)
        threshold = self.attack_threshold(request, defense)
        removal_threshold = self.removal_threshold(request) if removal is not None else None
        flagged, attacked = judge(result.predictions[0].index, defended[0].index, score, threshold,
                                  None if removal is None else removal[0].index, removal_score, removal_threshold,
                                  result.predictions[0].score)
        stage = Stage(method=defense.name, lam=request.lam, attack_score=score, attack_threshold=threshold,
                      flagged=flagged, predictions=defended)
        result.defended_predictions, result.lam, result.threshold = defended, request.lam, request.threshold
        result.attack_score, result.attack_threshold = score, threshold
        result.stages = [request.screen, stage] if request.screen is not None else [stage]
        result.removal_prediction = None if removal is None else removal[0]
        result.removal_score, result.removal_threshold = removal_score, removal_threshold
        cascade = get_defense(request.method)
        if cascade.escalates_to is not None:
            result.path = "strong" if request.screen is not None else "screen"
            if request.screen is None:
                attacked = False if flagged is False else None
                if flagged is not False:  # flagged, or changed without a threshold: the strong stage decides
                    result.escalate = replace(request, screen=stage)
        result.attacked = attacked
        # Attacked: the answer with the suspect removed outright, where there is one. It beat the smoothed
        # view on fooled crops (docs/attacks.md, section 7) and no patch pixel reaches it, so a patch trained
        # through the smoothing cannot steer it either.
        if attacked is False:
            result.final_predictions = result.predictions
        else:
            result.final_predictions = removal if attacked and removal is not None else defended
