"""Binary morphology with a 3x3 square element and the SLGS saliency region (DESIGN 2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary dilation; pixels outside the image are ignored (implicit -inf padding).

    Args:
        mask: 0/1 tensor of shape (B, 1, H, W).

    Returns:
        tensor of shape (B, 1, H, W).
    """
    return F.max_pool2d(mask, kernel_size=3, stride=1, padding=1)


def erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary erosion; pixels outside the image are ignored.

    Args:
        mask: 0/1 tensor of shape (B, 1, H, W).

    Returns:
        tensor of shape (B, 1, H, W).
    """
    return -F.max_pool2d(-mask, kernel_size=3, stride=1, padding=1)


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
    for _ in range(erosions):
        region = erode(region)
    for _ in range(dilations):
        region = dilate(region)
    return region
