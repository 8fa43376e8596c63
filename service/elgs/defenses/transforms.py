"""The three gradient-smoothing defences: LGS, SLGS and WLGS (design.md, section 2.2)."""

from __future__ import annotations

import torch

from elgs.defenses.estimators import robust_normalize
from elgs.defenses.gradients import local_gradient_map
from elgs.defenses.morphology import saliency_region
from elgs.defenses.smoothing import smooth


def _saliency_weight(xn: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """``saliency`` (B, H, W) or (B, 1, H, W), checked against ``xn``'s grid, as (B, 1, H, W) in its dtype."""
    if saliency.ndim == 3:
        saliency = saliency.unsqueeze(1)
    if saliency.ndim != 4 or saliency.shape[1] != 1:
        raise ValueError(f"saliency must have shape (B, H, W) or (B, 1, H, W), got {tuple(saliency.shape)}")
    if saliency.shape[0] != xn.shape[0] or saliency.shape[-2:] != xn.shape[-2:]:
        raise ValueError(f"saliency {tuple(saliency.shape)} does not match images {tuple(xn.shape)}")
    return saliency.to(xn.dtype)


def lgs_mask(xn: torch.Tensor, *, threshold: float | torch.Tensor = 0.2) -> torch.Tensor:
    """LGS mask ``m = g``; (B, C, H, W) -> (B, C, H, W)."""
    return local_gradient_map(xn, threshold=threshold)


def slgs_weight(xn: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """SLGS's weight: the saliency region ``D`` (B, 1, H, W), 0/1, of ``S`` (B, H, W) or (B, 1, H, W)."""
    return saliency_region(_saliency_weight(xn, saliency))


def wlgs_weight(xn: torch.Tensor, saliency: torch.Tensor, quantile: float | torch.Tensor = 1.0) -> torch.Tensor:
    """WLGS's weight ``W`` (B, 1, H, W) in [0, 1]: :func:`robust_normalize` of ``S`` at ``quantile``."""
    return robust_normalize(_saliency_weight(xn, saliency), quantile)


def slgs_mask(xn: torch.Tensor, saliency: torch.Tensor, *, threshold: float | torch.Tensor = 0.2) -> torch.Tensor:
    """SLGS mask ``m = D * g``: the gradient map inside the saliency region ``D``.

    Args:
        xn: normalised images of shape (B, C, H, W).
        saliency: ``S`` of shape (B, H, W) or (B, 1, H, W).
        threshold: block threshold, scalar or (B,).

    Returns:
        tensor of shape (B, C, H, W).
    """
    return slgs_weight(xn, saliency) * local_gradient_map(xn, threshold=threshold)


def wlgs_mask(xn: torch.Tensor, saliency: torch.Tensor, *, threshold: float | torch.Tensor = 0.2,
              quantile: float | torch.Tensor = 1.0) -> torch.Tensor:
    """WLGS mask ``m = W * g``; ``W`` the per-image saliency weights of :func:`robust_normalize`.

    With ``quantile = 1`` (the default) ``W`` is the paper's min-max normalised saliency. Smoother
    estimators use a lower quantile (``smoothgrad``: 0.9) so their top pixels get full weight.

    Args:
        xn: normalised images of shape (B, C, H, W).
        saliency: ``S`` of shape (B, H, W) or (B, 1, H, W).
        threshold: block threshold, scalar or (B,).
        quantile: weight normalisation quantile in [0.5, 1], scalar or (B,).

    Returns:
        tensor of shape (B, C, H, W).
    """
    return wlgs_weight(xn, saliency, quantile) * local_gradient_map(xn, threshold=threshold)


def lgs(xn: torch.Tensor, lam: float | torch.Tensor, *, threshold: float | torch.Tensor = 0.2) -> torch.Tensor:
    """Local Gradients Smoothing of normalised images (B, C, H, W); returns the smoothed ``xn``."""
    return smooth(xn, lgs_mask(xn, threshold=threshold), lam)


def slgs(
    xn: torch.Tensor, saliency: torch.Tensor, lam: float | torch.Tensor, *, threshold: float | torch.Tensor = 0.2
) -> torch.Tensor:
    """Saliency-map-based LGS of normalised images (B, C, H, W); returns the smoothed ``xn``."""
    return smooth(xn, slgs_mask(xn, saliency, threshold=threshold), lam)


def wlgs(
    xn: torch.Tensor, saliency: torch.Tensor, lam: float | torch.Tensor, *, threshold: float | torch.Tensor = 0.2,
    quantile: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Weighted LGS of normalised images (B, C, H, W); returns the smoothed ``xn``."""
    return smooth(xn, wlgs_mask(xn, saliency, threshold=threshold, quantile=quantile), lam)
