"""Attack objectives on logits: LaVAN's logit margin and Adversarial Patch's targeted cross entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, N), got {tuple(logits.shape)}")


def _as_targets(target: int | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    targets = torch.as_tensor(target, device=logits.device, dtype=torch.long)
    targets = targets.expand(logits.shape[0]) if targets.ndim == 0 else targets
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"target must be an int or have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < logits.shape[1]):
        raise ValueError(f"target indices must be in [0, {logits.shape[1]}), got {targets.tolist()}")
    return targets


def lavan_margin(logits: torch.Tensor, target: int | torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """LaVAN's objective ``z_target - z_source`` per image, to be maximised (Karmon et al., 2018).

    Args:
        logits: (B, N).
        target: the target class, an int or (B,).
        source: the true class of each image, (B,).

    Returns:
        (B,) margins.

    Example:
        >>> lavan_margin(torch.tensor([[1.0, 3.0, 0.5]]), 1, torch.tensor([0]))
        tensor([2.])
    """
    _check_logits(logits)
    targets = _as_targets(target, logits)
    sources = _as_targets(source, logits)
    return logits.gather(1, targets[:, None])[:, 0] - logits.gather(1, sources[:, None])[:, 0]


def lavan_loss(logits: torch.Tensor, target: int | torch.Tensor, source: torch.Tensor,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar loss to minimise: ``-mean(z_target - z_source)``, optionally weighted per image.

    Args:
        logits: (B, N).
        target: int or (B,).
        source: (B,).
        weight: optional (B,) weights, e.g. 0 for images whose true class is the target.
    """
    margin = lavan_margin(logits, target, source)
    if weight is None:
        return -margin.mean()
    return -(margin * weight).sum() / weight.sum().clamp(min=1e-12)


def target_cross_entropy(logits: torch.Tensor, target: int | torch.Tensor,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial Patch's loss: mean ``CE(z, target)`` (Brown et al., 2017), optionally weighted per image.

    Example:
        >>> round(target_cross_entropy(torch.tensor([[0.0, 0.0]]), 0).item(), 4)  # log 2
        0.6931
    """
    _check_logits(logits)
    per_image = F.cross_entropy(logits, _as_targets(target, logits), reduction="none")
    if weight is None:
        return per_image.mean()
    return (per_image * weight).sum() / weight.sum().clamp(min=1e-12)


def targeted_success(logits: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """Whether each image's top-1 class is the target, (B,) bool."""
    _check_logits(logits)
    return logits.argmax(dim=1) == _as_targets(target, logits)
