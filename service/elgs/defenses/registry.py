"""One registry of defences by name; the engine, the API, the CLI and the docs all read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from elgs.defenses import filters, transforms
from elgs.defenses.smoothing import suppression

LAMBDA_RANGE = (0.0, 10.0)
THRESHOLD_RANGE = (0.0, 1.0)
DEFAULT_THRESHOLD = 0.2


@dataclass(frozen=True)
class DefenseInput:
    """A batch handed to a defence.

    Attributes:
        x: pixel-space images in [0, 1], (B, 3, H, W).
        mean: the model's per-channel mean, (3,).
        std: the model's per-channel std, (3,).
        lam: smoothing factor per image, (B,).
        threshold: gradient-map block threshold per image, (B,).
        saliency: ``S`` per image, (B, H, W), when the defence needs it.
        saliency_quantile: WLGS weight normalisation quantile per image, (B,) (None: 1, the paper's min-max).
    """

    x: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    lam: torch.Tensor
    threshold: torch.Tensor
    saliency: torch.Tensor | None = None
    saliency_quantile: torch.Tensor | None = None

    def normalized(self) -> torch.Tensor:
        """``(x - mean) / std``, (B, 3, H, W)."""
        return (self.x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


@dataclass(frozen=True)
class DefenseOutput:
    """What a defence returns: ``image`` (B, 3, H, W) in [0, 1] and the applied ``mask`` (B, 1, H, W) in [0, 1]."""

    image: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class Defense:
    """A registered defence.

    Attributes:
        name: the name used by the API and the CLI.
        summary: one line for help texts and ``GET /defenses``.
        needs_saliency: whether the engine must compute ``S`` in pass 1.
        uses_lambda: whether ``lambda`` changes the result.
        uses_threshold: whether ``threshold`` changes the result.
        apply: the batched operation.
    """

    name: str
    summary: str
    needs_saliency: bool
    uses_lambda: bool
    uses_threshold: bool
    apply: Callable[[DefenseInput], DefenseOutput]

    def describe(self) -> dict:
        """A JSON-ready description with parameter ranges."""
        parameters = {}
        if self.uses_lambda:
            parameters["lambda"] = {"minimum": LAMBDA_RANGE[0], "maximum": LAMBDA_RANGE[1], "default": "per model"}
        if self.uses_threshold:
            parameters["threshold"] = {
                "minimum": THRESHOLD_RANGE[0],
                "maximum": THRESHOLD_RANGE[1],
                "default": DEFAULT_THRESHOLD,
            }
        return {
            "name": self.name,
            "summary": self.summary,
            "needs_saliency": self.needs_saliency,
            "parameters": parameters,
        }


DEFENSES: dict[str, Defense] = {}


def register(defense: Defense) -> Defense:
    """Add ``defense`` to the registry; names are unique."""
    if defense.name in DEFENSES:
        raise ValueError(f"defence {defense.name!r} is already registered")
    DEFENSES[defense.name] = defense
    return defense


def get_defense(name: str) -> Defense:
    """The registered defence called ``name``; ``KeyError`` naming the choices otherwise."""
    try:
        return DEFENSES[name]
    except KeyError:
        raise KeyError(f"unknown defence {name!r}; choose one of {', '.join(DEFENSES)}") from None


def defense_names() -> list[str]:
    """Registered names in registration order."""
    return list(DEFENSES)


def _gradient_defense(mask_of: Callable[[DefenseInput, torch.Tensor], torch.Tensor]) -> Callable[[DefenseInput], DefenseOutput]:
    def apply(batch: DefenseInput) -> DefenseOutput:
        xn = batch.normalized()
        strength = suppression(mask_of(batch, xn), batch.lam)  # (B, C, H, W)
        # T * std + mean == x - s * (x - mean): exact identity at lambda 0, no round trip error.
        image = torch.addcmul(batch.x, strength, batch.x - batch.mean.view(1, -1, 1, 1), value=-1).clamp(0.0, 1.0)
        return DefenseOutput(image=image, mask=strength.amax(dim=1, keepdim=True))

    return apply


def _filter_defense(pixel_filter: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[DefenseInput], DefenseOutput]:
    def apply(batch: DefenseInput) -> DefenseOutput:
        mask = torch.ones_like(batch.x[:, :1])
        return DefenseOutput(image=pixel_filter(batch.x).clamp(0.0, 1.0), mask=mask)

    return apply


def _identity(batch: DefenseInput) -> DefenseOutput:
    return DefenseOutput(image=batch.x.clone(), mask=torch.zeros_like(batch.x[:, :1]))


def _require_saliency(batch: DefenseInput) -> torch.Tensor:
    if batch.saliency is None:
        raise ValueError("this defence needs the saliency map S; the engine computes it in pass 1")
    return batch.saliency


register(Defense(
    name="lgs",
    summary="Local Gradients Smoothing: suppress high-gradient blocks (Naseer et al. 2019)",
    needs_saliency=False, uses_lambda=True, uses_threshold=True,
    apply=_gradient_defense(lambda b, xn: transforms.lgs_mask(xn, threshold=b.threshold)),
))
register(Defense(
    name="slgs",
    summary="Saliency-map-based LGS: smooth only inside the top-5 saliency region",
    needs_saliency=True, uses_lambda=True, uses_threshold=True,
    apply=_gradient_defense(lambda b, xn: transforms.slgs_mask(xn, _require_saliency(b), threshold=b.threshold)),
))
register(Defense(
    name="wlgs",
    summary="Weighted LGS: gradient map weighted by the normalised saliency map",
    needs_saliency=True, uses_lambda=True, uses_threshold=True,
    apply=_gradient_defense(lambda b, xn: transforms.wlgs_mask(
        xn, _require_saliency(b), threshold=b.threshold,
        quantile=1.0 if b.saliency_quantile is None else b.saliency_quantile)),
))
register(Defense(
    name="jpeg", summary="JPEG compression at quality 75 (baseline)",
    needs_saliency=False, uses_lambda=False, uses_threshold=False, apply=_filter_defense(filters.jpeg),
))
register(Defense(
    name="median", summary="3x3 median filter (baseline)",
    needs_saliency=False, uses_lambda=False, uses_threshold=False, apply=_filter_defense(filters.median),
))
register(Defense(
    name="gaussian", summary="Gaussian blur, sigma 1.0 (baseline)",
    needs_saliency=False, uses_lambda=False, uses_threshold=False, apply=_filter_defense(filters.gaussian),
))
register(Defense(
    name="none", summary="No defence: the input unchanged",
    needs_saliency=False, uses_lambda=False, uses_threshold=False, apply=_identity,
))
