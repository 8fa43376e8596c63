"""Straightforward per-image NumPy references of DESIGN 2, written loop by loop, in float64."""

from __future__ import annotations

import numpy as np
import torch

SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])


def sobel_magnitude(image: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (C, H, W): per channel, cross-correlation with zero padding 1."""
    channels, height, width = image.shape
    padded = np.zeros((channels, height + 2, width + 2))
    padded[:, 1:-1, 1:-1] = image
    gx = np.zeros(image.shape)
    gy = np.zeros(image.shape)
    for i in range(3):
        for j in range(3):
            window = padded[:, i : i + height, j : j + width]
            gx += SOBEL_X[i, j] * window
            gy += SOBEL_X.T[i, j] * window
    return np.sqrt(gx**2 + gy**2)


def local_gradient_map(image: np.ndarray, threshold: float = 0.2, window: int = 15, overlap: int = 5) -> np.ndarray:
    """(C, H, W) normalised image -> g (C, H, W)."""
    gradient = sobel_magnitude(image)
    low, high = gradient.min(), gradient.max()
    gradient = (gradient - low) / (high - low) if high > low else np.zeros_like(gradient)
    channels, height, width = gradient.shape
    stride = window - overlap

    def padded_length(length: int) -> int:
        if (length - window) % stride == 0:
            return max(length, window)
        return max(length + stride - (length - window) % stride, window)

    hp, wp = padded_length(height), padded_length(width)
    padded = np.zeros((channels, hp, wp))
    padded[:, :height, :width] = gradient
    total = np.zeros_like(padded)
    count = np.zeros_like(padded)
    for top in range(0, hp - window + 1, stride):
        for left in range(0, wp - window + 1, stride):
            block = padded[:, top : top + window, left : left + window]
            count[:, top : top + window, left : left + window] += 1
            if block.mean() >= threshold:
                total[:, top : top + window, left : left + window] += block
    return (total / count)[:, :height, :width]


def _morph(mask: np.ndarray, reduce) -> np.ndarray:
    """3x3 min or max over the neighbours that lie inside the image; (H, W) -> (H, W)."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    for r in range(height):
        for c in range(width):
            out[r, c] = reduce(mask[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2])
    return out


def saliency_region(saliency: np.ndarray, erosions: int = 2, dilations: int = 3) -> np.ndarray:
    """(H, W) -> 0/1 (H, W)."""
    region = (saliency >= saliency.mean()).astype(np.float64)
    for _ in range(erosions):
        region = _morph(region, np.min)
    for _ in range(dilations):
        region = _morph(region, np.max)
    return region


def topk_saliency(model, image: torch.Tensor, normalize, k: int = 5) -> torch.Tensor:
    """One image (3, H, W): sum of the cross entropies of its top-k classes, one class at a time."""
    x = image.detach().clone().unsqueeze(0).requires_grad_(True)
    logits = model(normalize(x))[0]
    loss = 0.0
    for cls in torch.argsort(logits.detach(), descending=True)[:k].tolist():
        loss = loss + torch.nn.functional.cross_entropy(logits.unsqueeze(0), torch.tensor([cls]))
    (grad,) = torch.autograd.grad(loss, x)
    return grad[0].abs().max(dim=0).values
