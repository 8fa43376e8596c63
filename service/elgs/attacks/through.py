"""White-box attack through a defence (paper Eq. 13): the defence sits inside the attack's loss.

``logits = f(normalize(T(x_patched)))`` where ``T`` is LGS, SLGS or WLGS exactly as the engine
applies it (``x - s * (x - mean)`` with ``s = clamp(lam * m, 0, 1)``, then clamped to [0, 1]).

What the gradient flows through, and what is held constant:

- The local gradient map ``g`` (Sobel magnitude, min-max normalisation, block averaging) is
  differentiable and carries gradient. The block keep/reject decision (``mean >= threshold``) is a
  step function: it is piecewise constant, so it contributes no gradient (as in the forward pass).
- The saliency map ``S`` of SLGS and WLGS is computed on the *detached* patched image and then held
  constant: SLGS's region ``D`` is a threshold plus morphology (zero gradient almost everywhere), and
  differentiating WLGS's weight ``W(S)`` would need second-order gradients through the network. So
  ``D`` and ``W`` are constants of each step; ``g`` and the smoothing carry the gradient.

The saliency is the service's: the same estimator code (:func:`elgs.defenses.estimate_saliency`)
with the model's default estimator (``ModelSpec.default_saliency``) unless ``saliency`` names
another, and WLGS weights normalised with that estimator's quantile. What this costs per training
step: one extra forward and backward of the batch for ``gradient``, ``n`` of them (the batch and its
``n - 1`` noisy copies, in one call) for ``smoothgrad``; being held constant, it adds no
second-order term to the patch's gradient.
"""

from __future__ import annotations

import torch

from elgs.defenses import (
    DEFAULT_THRESHOLD,
    DefenseInput,
    SaliencyConfig,
    estimate_saliency,
    get_defense,
    parse_saliency,
)
from elgs.models import LoadedModel

THROUGH_METHODS = ("lgs", "slgs", "wlgs", "auto")


def resolve_saliency(model: LoadedModel, saliency: str | SaliencyConfig | None = None) -> SaliencyConfig:
    """The estimator the service would use for ``model``: ``saliency`` over the model's default (None: it)."""
    default = parse_saliency(model.spec.default_saliency)
    return default if saliency is None else parse_saliency(saliency, base=default)


def constant_saliency(model: LoadedModel, x: torch.Tensor,
                      saliency: str | SaliencyConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``S`` (B, H, W) of the detached images, as the engine computes it, and the WLGS quantile (B,).

    Args:
        model: the classifier.
        x: pixel-space images (B, 3, H, W) in [0, 1].
        saliency: estimator spec (None: the model's default).
    """
    config = resolve_saliency(model, saliency)
    saliency_map = estimate_saliency(model.module, x.detach(), model.normalize, config).to(x.dtype)
    return saliency_map, torch.full((x.shape[0],), float(config.quantile), dtype=x.dtype, device=x.device)


def defend_differentiable(model: LoadedModel, x: torch.Tensor, method: str, lam: float,
                          threshold: float = DEFAULT_THRESHOLD,
                          saliency: str | SaliencyConfig | None = None) -> torch.Tensor:
    """Defended pixel-space images, differentiable in ``x`` (see the module docstring).

    Args:
        model: supplies mean/std and, for SLGS/WLGS, the saliency.
        x: pixel-space images (B, 3, H, W) in [0, 1].
        method: ``lgs``, ``slgs`` or ``wlgs``.
        lam: smoothing factor.
        threshold: gradient-map block threshold.
        saliency: estimator spec for SLGS/WLGS (None: the model's default, as the service).

    Returns:
        (B, 3, H, W) in [0, 1], equal to the engine's defended image.
    """
    if method not in THROUGH_METHODS or get_defense(method).escalates_to is not None:
        raise ValueError(f"can defend differentiably with lgs, slgs or wlgs, got {method!r}")
    defense = get_defense(method)
    saliency_map = quantile = None
    if defense.needs_saliency:
        saliency_map, quantile = constant_saliency(model, x, saliency)
    return defense.apply(DefenseInput.of(x, model.mean, model.std, lam=lam, threshold=threshold,
                                         saliency=saliency_map, saliency_quantile=quantile)).image


def logits_through(model: LoadedModel, x: torch.Tensor, method: str | None, lam: float,
                   threshold: float = DEFAULT_THRESHOLD, saliency: str | SaliencyConfig | None = None) -> torch.Tensor:
    """Logits (B, N) of ``x`` after the defence ``method`` (None: no defence).

    ``auto`` (the cascade) answers with the original image unless its LGS screen changes the top-1, so an
    attacker who knows it wants both views on the target: the undefended one (the answer) and the LGS one
    (so the screen sees no change and the verdict's score stays small). Its logits are the sum of the two
    views' logits, one batched call: LaVAN's loss is linear in the logits, so its loss on the sum is the sum
    of its losses on the views (for the Adversarial Patch's cross entropy, a joint objective of the same
    kind). The screen's block decision is a step (no gradient, as for ``lgs``).
    """
    if method is not None and get_defense(method).escalates_to is not None:
        screened = defend_differentiable(model, x, get_defense(method).screen, lam, threshold)
        logits = model.module(model.normalize(torch.cat([x, screened])))
        return logits[: x.shape[0]] + logits[x.shape[0]:]
    if method is not None:
        x = defend_differentiable(model, x, method, lam, threshold, saliency)
    return model.module(model.normalize(x))
