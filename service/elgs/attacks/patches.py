"""Patch shapes and batched patch application (LaVAN squares, Adversarial-Patch circles).

A patch ``(C, s, s)`` and its 0/1 shape mask ``(1, s, s)`` are pasted into a batch of pixel-space
images by mask replacement, ``x' = x * (1 - M) + P * M``, where ``P`` and ``M`` are the patch and the
mask laid onto image-sized canvases at each image's position. Everything is batched (one gather per
batch, no loop over images) and differentiable in the patch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Shape = Literal["square", "circle"]
TEST_MARGIN = 10  # the paper's test placement: top-right corner, 10 px from both edges


def square_mask(size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """LaVAN's square mask: all ones, (1, size, size)."""
    if size < 1:
        raise ValueError(f"patch size must be >= 1, got {size}")
    return torch.ones(1, size, size, dtype=dtype, device=device)


def circle_mask(size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Adversarial Patch's disc: 1 where a pixel centre lies within ``size / 2`` of the centre, (1, size, size).

    Example:
        >>> circle_mask(4)[0]
        tensor([[0., 1., 1., 0.],
                [1., 1., 1., 1.],
                [1., 1., 1., 1.],
                [0., 1., 1., 0.]])
    """
    if size < 1:
        raise ValueError(f"patch size must be >= 1, got {size}")
    centres = torch.arange(size, dtype=torch.float64) + 0.5 - size / 2
    distance_squared = centres.view(-1, 1).square() + centres.view(1, -1).square()
    return (distance_squared <= (size / 2) ** 2).to(dtype=dtype, device=device).unsqueeze(0)


def patch_mask(shape: Shape, size: int, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The mask of a ``square`` or ``circle`` patch, (1, size, size)."""
    if shape == "square":
        return square_mask(size, dtype=dtype, device=device)
    if shape == "circle":
        return circle_mask(size, dtype=dtype, device=device)
    raise ValueError(f"patch shape must be 'square' or 'circle', got {shape!r}")


def top_right_position(image_size: int, patch_size: int, margin: int = TEST_MARGIN) -> tuple[int, int]:
    """``(top, left)`` of the paper's test placement: top-right corner, ``margin`` px from both edges."""
    left = image_size - patch_size - margin
    if margin < 0 or left < 0 or margin + patch_size > image_size:
        raise ValueError(f"a {patch_size} px patch with a {margin} px margin does not fit a {image_size} px image")
    return margin, left


def fixed_positions(batch: int, image_size: int, patch_size: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The test placement for every image of a batch, (B, 2) long ``(top, left)``."""
    top, left = top_right_position(image_size, patch_size)
    return torch.tensor([[top, left]], dtype=torch.long, device=device).expand(batch, 2).clone()


def random_positions(batch: int, image_size: int, patch_size: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform positions that keep the patch inside the image, (B, 2) long ``(top, left)``."""
    if patch_size > image_size:
        raise ValueError(f"patch size {patch_size} exceeds image size {image_size}")
    positions = torch.randint(0, image_size - patch_size + 1, (batch, 2), generator=generator)
    return positions.to(device)


def placement_positions(placement: str, batch: int, image_size: int, patch_size: int, *,
                        generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``fixed`` (the test placement) or ``random`` positions for a batch, (B, 2) long ``(top, left)``."""
    if placement == "fixed":
        return fixed_positions(batch, image_size, patch_size, device=device)
    if placement == "random":
        return random_positions(batch, image_size, patch_size, generator=generator, device=device)
    raise ValueError(f"placement must be 'fixed' or 'random', got {placement!r}")


def place(patch: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay a patch and its mask onto image-sized canvases, one per position.

    Args:
        patch: (C, s, s) patch.
        mask: (1, s, s) shape mask in [0, 1].
        positions: (B, 2) integer ``(top, left)`` of the patch's top-left pixel; the patch may overhang.
        height: canvas height ``H``.
        width: canvas width ``W``.

    Returns:
        canvases ``P`` (B, C, H, W) and ``M`` (B, 1, H, W); zero outside the patch.
    """
    if patch.ndim != 3 or mask.ndim != 3 or mask.shape[0] != 1 or patch.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"patch must be (C, s, s) and mask (1, s, s), got {tuple(patch.shape)} and {tuple(mask.shape)}")
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must have shape (B, 2), got {tuple(positions.shape)}")
    size_h, size_w = patch.shape[-2:]
    positions = positions.to(device=patch.device, dtype=torch.long)
    rows = torch.arange(height, device=patch.device).view(1, -1) - positions[:, :1]  # (B, H) patch-local rows
    cols = torch.arange(width, device=patch.device).view(1, -1) - positions[:, 1:]  # (B, W)
    inside = ((rows >= 0) & (rows < size_h)).unsqueeze(2) & ((cols >= 0) & (cols < size_w)).unsqueeze(1)  # (B, H, W)
    row_index = rows.clamp(0, size_h - 1).unsqueeze(2)  # (B, H, 1)
    col_index = cols.clamp(0, size_w - 1).unsqueeze(1)  # (B, 1, W)
    # Advanced indexing gathers (C, B, H, W); its backward scatters into the patch, so this is differentiable.
    inside = inside.unsqueeze(1).to(patch.dtype)
    patch_canvas = patch[:, row_index, col_index].transpose(0, 1) * inside
    mask_canvas = mask.to(patch.dtype)[:, row_index, col_index].transpose(0, 1) * inside
    return patch_canvas, mask_canvas


def composite(images: torch.Tensor, patch_canvas: torch.Tensor, mask_canvas: torch.Tensor) -> torch.Tensor:
    """Mask replacement ``x * (1 - M) + P * M``; (B, C, H, W) with canvases from :func:`place`."""
    return images * (1.0 - mask_canvas) + patch_canvas * mask_canvas


def apply_patch(images: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Paste ``patch`` into every image at its position by mask replacement.

    Args:
        images: pixel-space images (B, C, H, W).
        patch: (C, s, s), values in [0, 1].
        mask: (1, s, s) shape mask (see :func:`square_mask`, :func:`circle_mask`).
        positions: (B, 2) ``(top, left)`` per image.

    Returns:
        patched images (B, C, H, W); a new tensor, differentiable in ``patch``.

    Example:
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> out = apply_patch(x, torch.ones(3, 2, 2), square_mask(2), torch.tensor([[0, 0], [6, 6]]))
        >>> out[0, 0, :2, :2].sum().item(), out[1, 0, 6:, 6:].sum().item()
        (4.0, 4.0)
    """
    if images.ndim != 4 or images.shape[1] != patch.shape[0]:
        raise ValueError(f"images must be (B, {patch.shape[0]}, H, W), got {tuple(images.shape)}")
    if positions.shape[0] != images.shape[0]:
        raise ValueError(f"need one position per image: {positions.shape[0]} positions for {images.shape[0]} images")
    patch_canvas, mask_canvas = place(patch.to(images.dtype), mask, positions, *images.shape[-2:])
    return composite(images, patch_canvas, mask_canvas)


def random_transforms(batch: int, *, image_size: int, patch_size: int, scale_range: tuple[float, float] = (0.8, 1.2),
                      max_rotation_deg: float = 45.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random EoT transforms for :func:`transform_patch`: rotation, scale and a position that keeps the
    (rotated, scaled) patch inside the image.

    Returns:
        (B, 4) float64 rows ``(angle_rad, scale, centre_y, centre_x)`` in pixels.
    """
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    uniform = torch.rand(batch, 4, generator=generator, dtype=torch.float64)
    angle = (uniform[:, 0] * 2 - 1) * math.radians(max_rotation_deg)
    scale = low + (high - low) * uniform[:, 1]
    # A square patch rotated by any angle stays inside its circumscribed circle of radius s*scale/sqrt(2).
    radius = patch_size * scale / math.sqrt(2)
    span = (image_size - 2 * radius).clamp(min=0)
    centre_y = radius + uniform[:, 2] * span
    centre_x = radius + uniform[:, 3] * span
    centre_y = torch.where(span > 0, centre_y, torch.full_like(centre_y, image_size / 2))
    centre_x = torch.where(span > 0, centre_x, torch.full_like(centre_x, image_size / 2))
    return torch.stack([angle, scale, centre_y, centre_x], dim=1)


def transform_patch(patch: torch.Tensor, mask: torch.Tensor, transforms: torch.Tensor, height: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate, scale and place a patch on image-sized canvases with one ``affine_grid`` / ``grid_sample``.

    Args:
        patch: (C, s, s) patch.
        mask: (1, s, s) shape mask.
        transforms: (B, 4) rows ``(angle_rad, scale, centre_y, centre_x)`` from :func:`random_transforms`.
        height: canvas height ``H``.
        width: canvas width ``W``.

    Returns:
        canvases ``P`` (B, C, H, W) and ``M`` (B, 1, H, W); ``M`` is bilinear, so edges are soft.
    """
    if transforms.ndim != 2 or transforms.shape[1] != 4:
        raise ValueError(f"transforms must have shape (B, 4), got {tuple(transforms.shape)}")
    batch = transforms.shape[0]
    size = patch.shape[-1]
    transforms = transforms.to(device=patch.device, dtype=patch.dtype)
    angle, scale, centre_y, centre_x = transforms.unbind(dim=1)
    # affine_grid maps output coordinates (normalised to [-1, 1] over the canvas, align_corners=False)
    # to input coordinates normalised over the patch; output pixel p -> patch pixel R^-1 (p - c) / scale.
    cos, sin = torch.cos(angle), torch.sin(angle)
    sx = width / (size * scale)
    sy = height / (size * scale)
    tx = (width / 2 - centre_x) * 2 / (size * scale)  # canvas centre relative to patch centre, in patch units
    ty = (height / 2 - centre_y) * 2 / (size * scale)
    theta = torch.stack([
        torch.stack([cos * sx, sin * sy, cos * tx + sin * ty], dim=1),
        torch.stack([-sin * sx, cos * sy, -sin * tx + cos * ty], dim=1),
    ], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [batch, patch.shape[0] + 1, height, width], align_corners=False)
    stacked = torch.cat([patch, mask.to(patch.dtype)], dim=0).unsqueeze(0).expand(batch, -1, -1, -1)
    canvas = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return canvas[:, :-1], canvas[:, -1:]


def eot_apply_patch(images: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Paste ``patch`` under per-image random rotation, scale and position (Expectation over Transformation).

    Args:
        images: pixel-space images (B, C, H, W).
        patch: (C, s, s).
        mask: (1, s, s).
        transforms: (B, 4) from :func:`random_transforms`.

    Returns:
        patched images (B, C, H, W), differentiable in ``patch``.
    """
    patch_canvas, mask_canvas = transform_patch(patch.to(images.dtype), mask, transforms, *images.shape[-2:])
    return composite(images, patch_canvas, mask_canvas)
