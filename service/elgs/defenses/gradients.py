"""Local gradient map of LGS (design.md, section 2.1): Sobel magnitude, per-image min-max, block filtering."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elgs.defenses._checks import as_per_sample, check_image_batch

def _magnitude(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    if not (gx.requires_grad or gy.requires_grad):
        return torch.hypot(gx, gy)
    # hypot's gradient is NaN where both components are zero (flat regions). Clamping the squared
    # magnitude at the smallest normal number changes such a zero by ~1e-19 (float32) and gives a
    # zero gradient there instead, so attacks can backpropagate through flat regions.
    return (gx.square() + gy.square()).clamp_min(torch.finfo(gx.dtype).tiny).sqrt()


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
    left, centre, right = padded[..., :, :-2], padded[..., :, 1:-1], padded[..., :, 2:]
    column_difference = left - right  # (B, C, H+2, W)
    gx = torch.add(column_difference[..., :-2, :] + column_difference[..., 2:, :], column_difference[..., 1:-1, :],
                   alpha=2)
    column_smooth = torch.add(left + right, centre, alpha=2)
    gy = column_smooth[..., :-2, :] - column_smooth[..., 2:, :]
    return _magnitude(gx, gy)


def minmax_normalize(values: torch.Tensor) -> torch.Tensor:
    """Rescale each image of a batch to [0, 1] over all its non-batch dims; zeros where constant.

    Args:
        values: tensor of shape (B, ...).

    Returns:
        tensor of the same shape.
    """
    dims = tuple(range(1, values.ndim))
    low = values.amin(dim=dims, keepdim=True)
    return scale_to_unit(values, low, values.amax(dim=dims, keepdim=True) - low)


def scale_to_unit(values: torch.Tensor, low: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``(values - low) / span`` with zeros where ``span == 0``; ``low`` and ``span`` broadcast per image.

    Args:
        values: tensor of shape (B, ...).
        low: per-image minimum, broadcastable to ``values`` (e.g. (B, 1, 1, 1)).
        span: per-image ``high - low``, same shape as ``low``.

    Returns:
        tensor shaped like ``values``.
    """
    # The per-image factor is tiny; only one subtraction and one product touch the whole batch.
    inverse_span = torch.where(span > 0, 1.0 / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return (values - low) * inverse_span


def padded_length(length: int, window: int, stride: int) -> int:
    """Length after bottom/right zero padding so that blocks of ``window`` at ``stride`` tile it."""
    remainder = (length - window) % stride
    padded = length if remainder == 0 else length + stride - remainder
    return max(padded, window)


def _spread_blocks(per_block: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Sum, at each pixel, the values of the blocks covering it: (B, 1, nh, nw) -> (B, 1, hp, wp).

    A transposed convolution with a ``window x window`` kernel of ones, done as a row pass and a
    column pass (the kernel is separable), which is a few times cheaper.
    """
    row_kernel = torch.ones(1, 1, 1, window, dtype=per_block.dtype, device=per_block.device)
    rows = F.conv_transpose2d(per_block, row_kernel, stride=(1, stride))
    return F.conv_transpose2d(rows, row_kernel.transpose(2, 3), stride=(stride, 1))


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
    # Mean over channels then over the window is the mean over all C x w x w values of a block;
    # only the one-channel mean needs the zero padding.
    channel_mean = F.pad(gradient.mean(dim=1, keepdim=True), (0, wp - w, 0, hp - h))
    block_means = F.avg_pool2d(channel_mean, window, stride=stride)  # (B,1,nh,nw)
    thresholds = as_per_sample(threshold, b, "threshold", gradient)
    kept = (block_means >= thresholds).to(gradient.dtype)
    kept_cover = _spread_blocks(kept, window, stride)[..., :h, :w]  # (B,1,H,W)
    cover = _spread_blocks(torch.ones_like(kept[:1]), window, stride)[..., :h, :w]
    return gradient * (kept_cover / cover)


def local_gradient_map(
    xn: torch.Tensor,
    *,
    threshold: float | torch.Tensor = 0.2,
    window: int = 15,
    overlap: int = 5,
) -> torch.Tensor:
    """Local gradient map ``g`` of LGS (Naseer et al., 2019) as design.md, section 2.1 fixes it.

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
