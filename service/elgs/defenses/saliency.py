"""Top-k saliency ``S`` (design.md, section 2.3): input gradient of the summed cross entropy of the top-k classes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from elgs.defenses._checks import check_image_batch


def topk_loss(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Per-image ``sum_{c in top-k} CE(z, c)`` with the top-k classes taken from ``logits`` itself.

    Args:
        logits: tensor of shape (B, N).
        k: number of classes.

    Returns:
        tensor of shape (B,).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, N), got {tuple(logits.shape)}")
    k = min(k, logits.shape[1])
    return classes_loss(logits, logits.detach().topk(k, dim=1).indices)


def classes_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per row ``sum_{c in classes} CE(z, c)``.

    Args:
        logits: tensor of shape (N, K).
        classes: class indices of shape (N, k).

    Returns:
        tensor of shape (N,).
    """
    return -F.log_softmax(logits, dim=1).gather(1, classes).sum(dim=1)


def gradient_magnitude(grad: torch.Tensor) -> torch.Tensor:
    """``S = max_c |dL/dx|``: the input gradient (B, C, H, W) reduced over channels to (B, H, W)."""
    return grad.abs().amax(dim=1)


def saliency_from_loss(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``max_c |dL/dx|`` for a pixel-space input ``x`` (B, C, H, W) that requires grad; (B, H, W).

    Only the input gradient is asked of autograd, so no parameter's ``.grad`` is touched.
    """
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return gradient_magnitude(grad)


def topk_saliency(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    k: int = 5,
) -> torch.Tensor:
    """Saliency map of each image for its own top-k classes.

    Args:
        model: classifier mapping normalised images (B, 3, H, W) to logits (B, N), in eval mode.
        x: pixel-space images in [0, 1] of shape (B, 3, H, W); not modified.
        normalize: maps pixel space to what ``model`` sees.
        k: number of top classes in the loss (5).

    Returns:
        ``S`` of shape (B, H, W), detached.
    """
    check_image_batch(x, "x")
    with torch.enable_grad():
        x_input = x.detach().clone().requires_grad_(True)
        loss = topk_loss(model(normalize(x_input)), k)
        return saliency_from_loss(loss, x_input).detach()
