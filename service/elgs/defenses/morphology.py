"""Binary morphology with a 3x3 square element and the SLGS saliency region (design.md, section 2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _extreme_filter(mask: torch.Tensor, radius: int, reduce, outside: float) -> torch.Tensor:
    """Max or min over a (2r+1) square, as a row pass then a column pass of shifted slices.

    ``outside`` fills the border so that pixels outside the image never win (-inf for max, +inf
    for min). On the CPU this is several times faster than ``max_pool2d`` on one channel.
    """
    height, width = mask.shape[-2:]
    padded = F.pad(mask, (radius, radius, 0, 0), value=outside)
    rows = padded[..., :, :width]
    for shift in range(1, 2 * radius + 1):
        rows = reduce(rows, padded[..., :, shift : shift + width])
    padded = F.pad(rows, (0, 0, radius, radius), value=outside)
    out = padded[..., :height, :]
    for shift in range(1, 2 * radius + 1):
        out = reduce(out, padded[..., shift : shift + height, :])
    return out


def dilate(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``iterations`` 3x3 binary dilations; pixels outside the image are ignored (OpenCV's default).

    On a rectangle, n dilations by a 3x3 square equal one by a (2n+1) square.

    Args:
        mask: 0/1 tensor of shape (B, 1, H, W).
        iterations: how many 3x3 dilations (>= 0).

    Returns:
        tensor of shape (B, 1, H, W).
    """
    if iterations == 0:
        return mask.clone()
    return _extreme_filter(mask, iterations, torch.maximum, float("-inf"))


def erode(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``iterations`` 3x3 binary erosions; pixels outside the image are ignored.

    Args:
        mask: 0/1 tensor of shape (B, 1, H, W).
        iterations: how many 3x3 erosions (>= 0).

    Returns:
        tensor of shape (B, 1, H, W).
    """
    if iterations == 0:
        return mask.clone()
    return _extreme_filter(mask, iterations, torch.minimum, float("inf"))


def saliency_region(saliency: torch.Tensor, *, erosions: int = 2, dilations: int = 3) -> torch.Tensor:
    """Saliency region ``D`` of SLGS: ``S >= mean(S)`` per image, then erosions, then dilations.

    Args:
        saliency: saliency maps of shape (B, H, W) or (B, 1, H, W).
        erosions: number of 3x3 erosions (2).
        dilations: number of 3x3 dilations (3).

    Returns:
        0/1 float tensor of shape (B, 1, H, W) in ``saliency``'s dtype.
    """
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"saliency must be a torch.Tensor, got {type(saliency).__name__}")
    if saliency.ndim == 3:
        saliency = saliency.unsqueeze(1)
    if saliency.ndim != 4 or saliency.shape[1] != 1:
        raise ValueError(f"saliency must have shape (B, H, W) or (B, 1, H, W), got {tuple(saliency.shape)}")
    if erosions < 0 or dilations < 0:
        raise ValueError(f"erosions and dilations must be >= 0, got {erosions} and {dilations}")
    dtype = saliency.dtype if saliency.is_floating_point() else torch.float32
    saliency = saliency.detach().to(dtype)
    region = (saliency >= saliency.mean(dim=(1, 2, 3), keepdim=True)).to(dtype)
    return dilate(erode(region, erosions), dilations)
