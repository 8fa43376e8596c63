"""Whole-image baseline filters in pixel space (design.md, section 2.5): JPEG, median, Gaussian."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from elgs.defenses._checks import check_image_batch


def jpeg(x: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG round trip through Pillow at ``quality``.

    Args:
        x: pixel-space RGB images in [0, 1] of shape (B, 3, H, W).
        quality: Pillow JPEG quality, 1 to 95.

    Returns:
        tensor shaped like ``x``, in [0, 1], quantised to 1/255.
    """
    check_image_batch(x, "x")
    if x.shape[1] != 3:
        raise ValueError(f"jpeg needs RGB images (B, 3, H, W), got {tuple(x.shape)}")
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must be in [1, 95], got {quality}")
    pixels = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    # The codec is Pillow's, one image at a time; there is no batched JPEG in torch on every device.
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    if not decoded:
        return x.clone()
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=x.device, dtype=x.dtype) / 255.0


def median(x: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Median filter with replicated borders.

    Args:
        x: images of shape (B, C, H, W).
        kernel_size: odd window side (3).

    Returns:
        tensor shaped like ``x``.
    """
    check_image_batch(x, "x")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if x.numel() == 0:
        return x.clone()
    pad = kernel_size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    if kernel_size == 3:
        h, w = x.shape[-2:]
        return _median_of_nine([padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3)])
    windows = padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # (B, C, H, W, k, k)
    return windows.flatten(-2).median(dim=-1).values


# Exchange pairs of a 19-comparator median-of-9 selection network (Paeth; Devillard's opt_med9).
_MEDIAN9_NETWORK = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
    (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)


def _median_of_nine(values: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise median of nine equally shaped tensors with min/max exchanges (no sort)."""
    values = list(values)
    for low, high in _MEDIAN9_NETWORK:
        values[low], values[high] = torch.minimum(values[low], values[high]), torch.maximum(values[low], values[high])
    return values[4]


# Up to this radius (sigma <= 1, the gaussian defence's default) the blur sums shifted slices; beyond it,
# depthwise conv2d: at sigma 8 (radius 24) on a 224 px image it took half the time at batch 1 and a seventh at 8.
_SLICED_RADIUS = 3


def gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``ceil(3 sigma)``; shape (2 * radius + 1,)."""
    radius = max(1, math.ceil(3 * sigma))
    positions = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur with replicated borders.

    Args:
        x: images of shape (B, C, H, W).
        sigma: standard deviation in pixels (1.0).

    Returns:
        tensor shaped like ``x``.
    """
    check_image_batch(x, "x")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if x.numel() == 0:
        return x.clone()
    kernel = gaussian_kernel1d(sigma, x.dtype, x.device)
    radius = kernel.numel() // 2
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    if radius > _SLICED_RADIUS:  # long kernels (the removal view's fill): a depthwise conv2d per axis is faster
        channels = x.shape[1]
        rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    h, w = x.shape[-2:]
    # Sums of shifted slices, one per tap: faster than single-channel conv2d on the CPU for short kernels.
    rows = sum(weight * padded[..., :, tap : tap + w] for tap, weight in enumerate(kernel))
    return sum(weight * rows[..., tap : tap + h, :] for tap, weight in enumerate(kernel))
