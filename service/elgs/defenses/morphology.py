"""Binary morphology with a 3x3 square element and the SLGS saliency region (DESIGN 2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dilate(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``iterations`` 3x3 binary dilations; pixels outside the image are ignored (implicit -inf padding).

    On a rectangle, n dilations by a 3x3 square equal one by a (2n+1) square, applied here as a
    row pass and a column pass.

    Args:
        mask: 0/1 tensor of shape (B, 1, H, W).
        iterations: how many 3x3 dilations (>= 0).

    Returns:
        tensor of shape (B, 1, H, W).
    """
    if iterations == 0:
        return mask.clone()
    size = 2 * iterations + 1
    rows = F.max_pool2d(mask, kernel_size=(1, size), stride=1, padding=(0, iterations))
    return F.max_pool2d(rows, kernel_size=(size, 1), stride=1, padding=(iterations, 0))


def erode(mask: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``iterations`` 3x3 binary erosions; pixels outside the image are ignored.

    Args:
        mask: 0/1 tensor of shape (B, 1, H, W).
        iterations: how many 3x3 erosions (>= 0).

    Returns:
        tensor of shape (B, 1, H, W).
    """
    return -dilate(-mask, iterations)


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
