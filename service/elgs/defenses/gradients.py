"""Local gradient map of LGS (DESIGN 2.1): Sobel magnitude, per-image min-max, block filtering."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elgs.defenses._checks import as_per_sample, check_image_batch

def _safe_sqrt(squared: torch.Tensor) -> torch.Tensor:
    # Clamping at the smallest normal number changes a zero magnitude by ~1e-19 (float32) but gives
    # a zero gradient instead of NaN there, so attacks can backpropagate through flat regions.
    return squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt()


def sobel_magnitude(xn: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude, cross-correlation with zero padding 1.

    ``Kx = [[1,0,-1],[2,0,-2],[1,0,-1]]`` is the outer product of ``[1,2,1]`` (rows) and
    ``[1,0,-1]`` (columns), and ``Ky = Kx^T``; both are applied as sums of shifted slices, which on
    the CPU is several times faster than a single-channel ``conv2d``.

    Args:
        xn: images of shape (B, C, H, W).

    Returns:
        ``sqrt(Gx^2 + Gy^2)`` of shape (B, C, H, W).
    """
    check_image_batch(xn, "xn")
    padded = F.pad(xn, (1, 1, 1, 1))
    column_difference = padded[..., :, :-2] - padded[..., :, 2:]  # (B, C, H+2, W)
    gx = column_difference[..., :-2, :] + 2 * column_difference[..., 1:-1, :] + column_difference[..., 2:, :]
    column_smooth = padded[..., :, :-2] + 2 * padded[..., :, 1:-1] + padded[..., :, 2:]
    gy = column_smooth[..., :-2, :] - column_smooth[..., 2:, :]
    return _safe_sqrt(gx.square() + gy.square())


def minmax_normalize(values: torch.Tensor) -> torch.Tensor:
    """Rescale each image of a batch to [0, 1] over all its non-batch dims; zeros where constant.

    Args:
        values: tensor of shape (B, ...).

    Returns:
        tensor of the same shape.
    """
    dims = tuple(range(1, values.ndim))
    low = values.amin(dim=dims, keepdim=True)
    span = values.amax(dim=dims, keepdim=True) - low
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (values - low) / safe_span, torch.zeros_like(values))


def padded_length(length: int, window: int, stride: int) -> int:
    """Length after bottom/right zero padding so that blocks of ``window`` at ``stride`` tile it."""
    remainder = (length - window) % stride
    padded = length if remainder == 0 else length + stride - remainder
    return max(padded, window)


def block_filter(
    gradient: torch.Tensor,
    threshold: float | torch.Tensor = 0.2,
    *,
    window: int = 15,
    overlap: int = 5,
) -> torch.Tensor:
    """Keep the overlapping blocks whose mean gradient reaches ``threshold``.

    Each pixel becomes the sum of the kept blocks covering it divided by the number of blocks
    covering it. A block's pixel values are the gradient itself, so that sum equals
    ``gradient * kept_cover / cover``; both counts are transposed convolutions of the per-block
    keep map, which avoids materialising the unfolded blocks.

    Args:
        gradient: normalised gradient of shape (B, C, H, W).
        threshold: scalar or per-image tensor of shape (B,).
        window: block side ``w``.
        overlap: overlap ``o`` between neighbouring blocks; the stride is ``w - o``.

    Returns:
        tensor of shape (B, C, H, W).
    """
    check_image_batch(gradient, "gradient")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got {overlap} with window {window}")
    b, _, h, w = gradient.shape
    stride = window - overlap
    hp, wp = padded_length(h, window, stride), padded_length(w, window, stride)
    padded = F.pad(gradient, (0, wp - w, 0, hp - h))
    # Mean over channels then over the window is the mean over all C x w x w values of a block.
    block_means = F.avg_pool2d(padded.mean(dim=1, keepdim=True), window, stride=stride)  # (B,1,nh,nw)
    thresholds = as_per_sample(threshold, b, "threshold", gradient)
    kept = (block_means >= thresholds).to(gradient.dtype)
    ones_kernel = torch.ones(1, 1, window, window, dtype=gradient.dtype, device=gradient.device)
    kept_cover = F.conv_transpose2d(kept, ones_kernel, stride=stride)  # (B,1,hp,wp)
    cover = F.conv_transpose2d(torch.ones_like(kept[:1]), ones_kernel, stride=stride)
    return (padded * (kept_cover / cover))[..., :h, :w]


def local_gradient_map(
    xn: torch.Tensor,
    *,
    threshold: float | torch.Tensor = 0.2,
    window: int = 15,
    overlap: int = 5,
) -> torch.Tensor:
    """Local gradient map ``g`` of LGS (Naseer et al., 2019) as DESIGN 2.1 fixes it.

    Args:
        xn: model-normalised images of shape (B, C, H, W).
        threshold: block threshold in [0, 1], scalar or per-image tensor of shape (B,).
        window: block side (15).
        overlap: block overlap (5).

    Returns:
        ``g`` of shape (B, C, H, W) with values in [0, 1].

    Example:
        >>> g = local_gradient_map(torch.rand(2, 3, 32, 32))
        >>> g.shape
        torch.Size([2, 3, 32, 32])
    """
    return block_filter(minmax_normalize(sobel_magnitude(xn)), threshold, window=window, overlap=overlap)
