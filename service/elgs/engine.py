"""The two-pass engine (design.md, section 3): one batch of requests for one model in, one result per request out.

Pass 1 is one forward on the original images; it carries the input gradient only when a request
of the batch needs a saliency map (``slgs``, ``wlgs``, the ``saliency`` task), and then one backward
of those requests' summed losses. A ``smoothgrad`` request adds its noisy copies to that same
forward (:func:`elgs.defenses.saliency_pass`). The defences run batched per method. Pass 2 is one
forward on all defended images. Every ``defend`` result carries the attack score (L1 distance of
the two softmax vectors), the decision against the model's calibrated threshold
(:mod:`elgs.thresholds`) and the predictions to trust. The engine knows nothing of HTTP; the
batcher, the CLI and the attack evaluation call it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from elgs.defenses import (
    DEFAULT_THRESHOLD,
    LAMBDA_RANGE,
    THRESHOLD_RANGE,
    DefenseInput,
    SaliencyConfig,
    get_defense,
    parse_saliency,
    saliency_pass,
    saliency_region,
)
from elgs.models import LoadedModel
from elgs.thresholds import SCORE_RANGE, AttackThresholds, load_thresholds

Task = Literal["classify", "defend", "saliency"]
TOP_K = 5


class UnknownMethodError(KeyError):
    """The requested defence is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class InvalidParameterError(ValueError):
    """A request parameter is out of its range."""


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
        attack_threshold: attack-score threshold in [0, 2] overriding the calibrated one (``defend``).
    """

    image: torch.Tensor | np.ndarray | None
    task: Task = "defend"
    method: str = "none"
    lam: float | None = None
    threshold: float | None = None
    saliency: str | None = None
    attack_threshold: float | None = None


@dataclass(frozen=True)
class Prediction:
    """A class and its softmax probability."""

    index: int
    label: str
    score: float


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
        attacked: ``attack_score > attack_threshold``; None when there is no threshold.
        final_predictions: the defended top-5 when attacked (or undecided), else the original top-5.
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
        tensor of shape (B,) in [0, 2] (float32).
    """
    if original_logits.shape != defended_logits.shape or original_logits.ndim != 2:
        raise ValueError(f"logits must both have shape (B, N), got {tuple(original_logits.shape)} "
                         f"and {tuple(defended_logits.shape)}")
    original = torch.softmax(original_logits.detach().float(), dim=1)
    defended = torch.softmax(defended_logits.detach().float(), dim=1)
    return (original - defended).abs().sum(dim=1).clamp(*SCORE_RANGE)


def decide(score: float, threshold: float | None) -> bool | None:
    """``score > threshold``; None without a threshold."""
    return None if threshold is None else bool(score > threshold)


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
    saliency = resolve_saliency(request.saliency, model.default_saliency).spec if defense.needs_saliency else None
    return Request(image=request.image, task="defend", method=request.method, lam=lam, threshold=threshold,
                   saliency=saliency, attack_threshold=attack_threshold)


def needs_saliency(request: Request) -> bool:
    """Whether a resolved request's pass 1 carries the input gradient."""
    return request.task == "saliency" or (request.task == "defend" and get_defense(request.method).needs_saliency)


def pass_one_rows(request: Request) -> int:
    """Rows a resolved request adds to pass 1: the copies of its saliency estimator (SmoothGrad's ``n``), else 1."""
    return parse_saliency(request.saliency).n if needs_saliency(request) else 1


class Engine:
    """Runs batches of :class:`Request` through one :class:`~elgs.models.LoadedModel`.

    Args:
        model: the loaded model.
        thresholds: attack-score thresholds; None reads the calibration files for ``model``
            (:func:`elgs.thresholds.load_thresholds`), which finds none for random weights.
    """

    def __init__(self, model: LoadedModel, thresholds: AttackThresholds | None = None) -> None:
        self.model = model
        if thresholds is None:
            thresholds = load_thresholds(model.name, model.input_size, model.weights)
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

    def attack_threshold(self, request: Request) -> float | None:
        """The threshold that decides ``attacked`` for a resolved ``defend`` request."""
        if request.attack_threshold is not None:
            return request.attack_threshold
        if self.thresholds is None:
            return None
        return self.thresholds.lookup(request.method, request.lam, request.saliency)

    @property
    def defaults(self) -> ModelDefaults:
        """The model's name, input size, default lambda and estimator, for :func:`resolve_request`."""
        return ModelDefaults(name=self.model.name, input_size=self.model.input_size,
                             default_lambda=self.model.spec.default_lambda,
                             default_saliency=getattr(self.model.spec, "default_saliency", "gradient"))

    def resolve(self, request: Request) -> Request:
        """:func:`resolve_request` for this engine's model.

        Raises:
            UnknownMethodError: the method is not a registered defence.
            InvalidParameterError: lambda, threshold, task or image shape is invalid.
        """
        return resolve_request(request, self.defaults)

    def _top_k(self, logits: torch.Tensor) -> list[list[Prediction]]:
        probabilities = torch.softmax(logits.detach().float(), dim=1)
        scores, indices = probabilities.topk(min(TOP_K, logits.shape[1]), dim=1)
        labels = self.model.labels
        return [
            [Prediction(int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)), float(s))
             for s, i in zip(row_scores, row_indices)]
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist())
        ]

    def _pass1(self, x: torch.Tensor, requests: Sequence[Request]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, N) and, when a request needs one, ``S`` (B, H, W) (zeros elsewhere): one model call."""
        configs = [parse_saliency(r.saliency) if needs_saliency(r) else None for r in requests]
        result = saliency_pass(self.model.forward, x, self.model.normalize, configs, k=TOP_K,
                               network=self.model.module)
        return result.logits, result.saliency

    def _defend(self, x: torch.Tensor, requests: Sequence[Request], rows: list[int],
                saliency: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Defended images (len(rows), 3, H, W) and masks (len(rows), 1, H, W), batched per method."""
        images = torch.empty((len(rows), *x.shape[1:]), dtype=x.dtype, device=x.device)
        masks = torch.empty((len(rows), 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        by_method: dict[str, list[int]] = {}
        for position, row in enumerate(rows):
            by_method.setdefault(requests[row].method, []).append(position)
        for method, positions in by_method.items():
            batch_rows = [rows[p] for p in positions]
            defense = get_defense(method)
            index = torch.tensor(batch_rows, device=x.device)
            output = defense.apply(DefenseInput(
                x=x[index],
                mean=self.model.mean.to(x.dtype),
                std=self.model.std.to(x.dtype),
                lam=torch.tensor([requests[r].lam or 0.0 for r in batch_rows], dtype=x.dtype, device=x.device),
                threshold=torch.tensor([requests[r].threshold or 0.0 for r in batch_rows], dtype=x.dtype,
                                       device=x.device),
                saliency=saliency[index] if defense.needs_saliency else None,
                saliency_quantile=torch.tensor(
                    [parse_saliency(requests[r].saliency).quantile for r in batch_rows], dtype=x.dtype,
                    device=x.device) if defense.needs_saliency else None,
            ))
            target = torch.tensor(positions, device=x.device)
            images[target] = output.image.to(x.dtype)
            masks[target] = output.mask.to(x.dtype)
        return images, masks

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Run a batch; result ``i`` is computed from ``requests[i]`` alone.

        Raises:
            UnknownMethodError, InvalidParameterError: a request is invalid (nothing runs).
        """
        if not requests:
            return []
        requests = [self.resolve(r) for r in requests]
        x = self.model.to_input(torch.stack([r.image for r in requests]))
        saliency_rows = [i for i, r in enumerate(requests) if needs_saliency(r)]
        defend_rows = [i for i, r in enumerate(requests) if r.task == "defend"]

        started = time.perf_counter()
        logits, saliency = self._pass1(x, requests)
        original = self._top_k(logits)
        timing = {"pass1": (time.perf_counter() - started) * 1000}

        started = time.perf_counter()
        defended_predictions: list[list[Prediction]] = []
        images = masks = scores = None
        if defend_rows:
            images, masks = self._defend(x, requests, defend_rows, saliency)
            timing["defense"] = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            with torch.inference_mode():
                defended_logits = self.model.forward(self.model.normalize(images))
            defended_predictions = self._top_k(defended_logits)
            scores = attack_scores(logits[defend_rows], defended_logits).tolist()
            timing["pass2"] = (time.perf_counter() - started) * 1000
            images, masks = images.cpu(), masks.cpu()
        saliency_cpu = saliency.cpu() if saliency is not None else None

        results = []
        defend_position = {row: p for p, row in enumerate(defend_rows)}
        for i, request in enumerate(requests):
            result = Result(predictions=original[i], batch_size=len(requests), timing_ms=dict(timing))
            if i in defend_position:
                p = defend_position[i]
                result.defended_predictions = defended_predictions[p]
                result.image, result.mask = images[p], masks[p]
                result.lam, result.threshold = request.lam, request.threshold
                result.attack_score = scores[p]
                result.attack_threshold = self.attack_threshold(request)
                result.attacked = decide(scores[p], result.attack_threshold)
                result.final_predictions = original[i] if result.attacked is False else defended_predictions[p]
            if saliency_cpu is not None and i in saliency_rows:
                result.saliency = saliency_cpu[i]
                result.saliency_method = request.saliency
                if request.task == "saliency":
                    result.region = saliency_region(saliency_cpu[i : i + 1])[0]
            results.append(result)
        return results
