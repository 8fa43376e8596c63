"""Gradient smoothing ``T(xn) = xn * clamp(1 - lam * m, 0, 1)`` (design.md, section 2.2, paper Eq. 5).

:func:`smooth` applies it to model-normalised images; :func:`smooth_pixels` is the same formula carried to
pixel space, which is what the defences return (``T * std + mean``, clamped to [0, 1]).
:func:`fill_from_surroundings` is the hard removal of the verdict's check (:func:`fill_with_own_mean` its
far-field colour).
"""

from __future__ import annotations

import torch

from elgs.defenses._checks import as_per_sample, check_image_batch
from elgs.defenses.filters import gaussian

# Kept-pixel weight (out of 1) below which the fill fades to the image's own mean colour: the far field.
_FAR_FIELD_WEIGHT = 1e-3


def suppression(mask: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """How strongly each value is pulled to the mean colour: ``clamp(lam * m, 0, 1)``.

    Args:
        mask: tensor of shape (B, C, H, W) or (B, 1, H, W).
        lam: scalar or per-image tensor of shape (B,).

    Returns:
        tensor shaped like ``mask`` with values in [0, 1].
    """
    check_image_batch(mask, "mask")
    lam = as_per_sample(lam, mask.shape[0], "lam", mask)
    return (lam * mask).clamp(0.0, 1.0)


def smooth(xn: torch.Tensor, mask: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Suppress ``xn`` where ``lam * mask`` is large; returns a new tensor.

    Args:
        xn: model-normalised images of shape (B, C, H, W).
        mask: tensor broadcastable to ``xn``, of shape (B, C, H, W) or (B, 1, H, W).
        lam: scalar or per-image tensor of shape (B,).

    Returns:
        tensor shaped like ``xn``.
    """
    check_image_batch(xn, "xn")
    if mask.ndim != 4 or mask.shape[0] != xn.shape[0]:
        raise ValueError(f"mask must have shape (B, C or 1, H, W) matching xn {tuple(xn.shape)}, got {tuple(mask.shape)}")
    return xn * (1.0 - suppression(mask, lam))


def smooth_pixels(x: torch.Tensor, strength: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``clamp(T(xn) * std + mean, 0, 1)`` computed in pixel space as ``x - s * (x - mean)``.

    Equal to :func:`smooth` followed by de-normalisation, without the round trip's error (exact at
    ``s = 0``); the std cancels.

    Args:
        x: pixel-space images in [0, 1] of shape (B, C, H, W).
        strength: ``s = clamp(lam * m, 0, 1)`` (:func:`suppression`), (B, C, H, W) or (B, 1, H, W).
        mean: the model's per-channel mean, (C,).

    Returns:
        tensor shaped like ``x`` in [0, 1].
    """
    check_image_batch(x, "x")
    return torch.addcmul(x, strength, x - mean.view(1, -1, 1, 1), value=-1).clamp(0.0, 1.0)


def fill_with_own_mean(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Replace ``region`` of each image by that image's mean colour over the pixels outside it.

    The far field of :func:`fill_from_surroundings`. The image's own colour, not the dataset mean: a grey
    square on a dark photograph is an object of its own (on seed-7 training crops it turned bubbles into
    spotlights), where a square of the photograph's own colour reads as background. An image whose region
    covers every pixel gets the region's own mean.

    Args:
        x: pixel-space images in [0, 1] of shape (B, C, H, W).
        region: 0/1 tensor of shape (B, 1, H, W), 1 where the pixel is replaced.

    Returns:
        tensor shaped like ``x``; ``x`` itself is not modified.
    """
    check_image_batch(x, "x")
    if region.ndim != 4 or region.shape[1] != 1 or region.shape[0] != x.shape[0] or region.shape[2:] != x.shape[2:]:
        raise ValueError(f"region must have shape (B, 1, H, W) matching x {tuple(x.shape)}, got {tuple(region.shape)}")
    region = region.to(x.dtype)
    keep = 1.0 - region
    kept_pixels = keep.sum(dim=(2, 3), keepdim=True)
    everywhere = torch.ones_like(keep)
    weights = torch.where(kept_pixels > 0, keep, everywhere)
    colour = (x * weights).sum(dim=(2, 3), keepdim=True) / weights.sum(dim=(2, 3), keepdim=True)
    return torch.lerp(x, colour.expand_as(x), region)


def fill_from_surroundings(x: torch.Tensor, region: torch.Tensor, sigma: float) -> torch.Tensor:
    """Replace ``region`` of each image by its surroundings: the removal check's view (design.md, section 3.2).

    Each replaced pixel gets the Gaussian-weighted (std ``sigma``) mean of the kept pixels around it
    (normalised convolution), fading into the image's own mean colour (:func:`fill_with_own_mean`) where
    the kept pixels' weight drops towards 1e-3, about three ``sigma`` inside the region. A region narrower than
    a few ``sigma`` takes its neighbours' colours; the middle of a large one is the own-colour square with
    its rim blended into what surrounds it, which reads less as an object of its own than a hard-edged
    square on texture (seed-7 crops, docs/attacks.md section 7.6).

    Args:
        x: pixel-space images in [0, 1] of shape (B, C, H, W).
        region: 0/1 tensor of shape (B, 1, H, W), 1 where the pixel is replaced.
        sigma: the neighbourhood's standard deviation in pixels, > 0.

    Returns:
        tensor shaped like ``x``, equal to ``x`` outside ``region``; ``x`` itself is not modified.
    """
    far = fill_with_own_mean(x, region)  # also checks the shapes
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    region = region.to(x.dtype)
    keep = 1.0 - region
    near = gaussian(torch.cat([x * keep, keep], dim=1), sigma)  # (B, C + 1, H, W): weighted sums, then weights
    colour = (near[:, :-1] + _FAR_FIELD_WEIGHT * far) / (near[:, -1:] + _FAR_FIELD_WEIGHT)
    return torch.lerp(x, colour, region)
