"""One registry of defences by name; the engine, the API, the CLI and the docs all read it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from elgs.defenses import filters, transforms
from elgs.defenses.smoothing import smooth_pixels, suppression
from elgs.registry import Registry

LAMBDA_RANGE = (0.0, 10.0)
THRESHOLD_RANGE = (0.0, 1.0)
DEFAULT_THRESHOLD = 0.2
# LGS suppression from which a pixel counts as part of the suspected patch for the removal check.
REMOVAL_STRENGTH = 0.5
# The removal view's neighbourhood (fill_from_surroundings' sigma) as a share of the image side: 8 px at 224.
REMOVAL_FILL_SIGMA = 8 / 224


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

    @classmethod
    def of(cls, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, lam: Sequence[float] | float,
           threshold: Sequence[float] | float, saliency: torch.Tensor | None = None,
           saliency_quantile: Sequence[float] | float | None = None) -> DefenseInput:
        """The batch with per-image parameters given as floats or sequences of B floats, made tensors on
        ``x``'s device and dtype (the one place a :class:`DefenseInput` is assembled from request values).

        Args:
            x: pixel-space images (B, 3, H, W) in [0, 1].
            mean, std: the model's per-channel statistics, (3,).
            lam, threshold: a float for every image or one per image (None entries count as 0).
            saliency: ``S`` (B, H, W) or None.
            saliency_quantile: WLGS quantile, a float or one per image; None: 1.
        """
        def per_image(values: Sequence[float | None] | float | torch.Tensor) -> torch.Tensor:
            if isinstance(values, torch.Tensor):
                return values.to(device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
            if isinstance(values, (int, float)):
                return torch.full((x.shape[0],), float(values), dtype=x.dtype, device=x.device)
            return torch.tensor([0.0 if v is None else float(v) for v in values], dtype=x.dtype, device=x.device)

        return cls(x=x, mean=mean.to(device=x.device, dtype=x.dtype), std=std.to(device=x.device, dtype=x.dtype),
                   lam=per_image(lam), threshold=per_image(threshold),
                   saliency=None if saliency is None else saliency.to(x.dtype),
                   saliency_quantile=None if saliency_quantile is None else per_image(saliency_quantile))

    def normalized(self) -> torch.Tensor:
        """``(x - mean) / std``, (B, 3, H, W)."""
        return (self.x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


@dataclass(frozen=True)
class DefenseOutput:
    """What a defence returns: ``image`` (B, 3, H, W) in [0, 1], the applied ``mask`` (B, 1, H, W) in [0, 1]
    and, for the gradient defences, ``removal`` (B, 1, H, W), 0/1: the pixels a hard removal of the
    suspected patch replaces by its surroundings (LGS's own suppression at least :data:`REMOVAL_STRENGTH`),
    which the engine's verdict checks the original answer against (design.md, section 2.6)."""

    image: torch.Tensor
    mask: torch.Tensor
    removal: torch.Tensor | None = None


@dataclass(frozen=True)
class Defense:
    """A registered defence.

    Attributes:
        name: the name used by the API and the CLI.
        summary: one line for help texts and ``GET /defenses``.
        needs_saliency: whether the engine must compute ``S`` in pass 1.
        uses_lambda: whether ``lambda`` changes the result.
        uses_threshold: whether ``threshold`` changes the result.
        apply: the batched operation (for a cascade: its screen's).
        escalates_to: for a cascade, the defence that images its screen flags are sent on to (the engine
            runs it in a second round, design.md section 3.1); None for a plain defence.
        screen: for a cascade, the name of the defence ``apply`` is (whose thresholds decide the screen).
    """

    name: str
    summary: str
    needs_saliency: bool
    uses_lambda: bool
    uses_threshold: bool
    apply: Callable[[DefenseInput], DefenseOutput]
    escalates_to: str | None = None
    screen: str | None = None

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
        described = {
            "name": self.name,
            "summary": self.summary,
            "needs_saliency": self.needs_saliency,
            "parameters": parameters,
        }
        if self.escalates_to is not None:
            described["cascade"] = {"screen": self.screen, "strong": self.escalates_to}
        return described


DEFENSES: Registry[Defense] = Registry("defence")


def register(defense: Defense) -> Defense:
    """Add ``defense`` to the registry; names are unique."""
    return DEFENSES.register(defense)


def get_defense(name: str) -> Defense:
    """The registered defence called ``name``; ``KeyError`` naming the choices otherwise."""
    return DEFENSES.find(name)


def defense_names() -> list[str]:
    """Registered names in registration order."""
    return DEFENSES.names()


def _gradient_defense(weight_of: Callable[[DefenseInput, torch.Tensor], torch.Tensor] | None = None,
                      ) -> Callable[[DefenseInput], DefenseOutput]:
    """A defence ``m = w * g`` (``w`` = 1 for LGS); ``g`` is computed once and also gives the removal mask."""
    def apply(batch: DefenseInput) -> DefenseOutput:
        xn = batch.normalized()
        gradient = transforms.lgs_mask(xn, threshold=batch.threshold)  # (B, C, H, W)
        mask = gradient if weight_of is None else weight_of(batch, xn) * gradient
        strength = suppression(mask, batch.lam)
        removal = suppression(gradient, batch.lam).amax(dim=1, keepdim=True) >= REMOVAL_STRENGTH
        return DefenseOutput(image=smooth_pixels(batch.x, strength, batch.mean),
                             mask=strength.amax(dim=1, keepdim=True), removal=removal.to(batch.x.dtype))

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
    apply=_gradient_defense(),
))
register(Defense(
    name="slgs",
    summary="Saliency-map-based LGS: smooth only inside the top-5 saliency region",
    needs_saliency=True, uses_lambda=True, uses_threshold=True,
    apply=_gradient_defense(lambda b, xn: transforms.slgs_weight(xn, _require_saliency(b))),
))
register(Defense(
    name="wlgs",
    summary="Weighted LGS: gradient map weighted by the normalised saliency map",
    needs_saliency=True, uses_lambda=True, uses_threshold=True,
    apply=_gradient_defense(lambda b, xn: transforms.wlgs_weight(
        xn, _require_saliency(b), 1.0 if b.saliency_quantile is None else b.saliency_quantile)),
))
register(Defense(
    name="auto",
    summary="Cascade: an LGS screen answers clean images; flagged ones get SLGS with the model's estimator",
    needs_saliency=False, uses_lambda=True, uses_threshold=True,
    apply=DEFENSES["lgs"].apply, escalates_to="slgs", screen="lgs",
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
