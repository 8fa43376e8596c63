"""Input checks shared by the defence ops; messages name the bad value."""

from __future__ import annotations

import math

import torch


def check_image_batch(images: torch.Tensor, name: str) -> None:
    """Raise unless ``images`` is a floating tensor of shape (B, C, H, W)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {images.dtype}")


def as_per_sample(value: float | torch.Tensor, batch: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value as a (B, 1, 1, 1) tensor on ``like``'s device and dtype."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            value = value.reshape(1).expand(batch)
        if value.ndim != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite, got {value.tolist()}")
        return value.to(device=like.device, dtype=like.dtype).reshape(batch, 1, 1, 1)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return torch.full((batch, 1, 1, 1), value, dtype=like.dtype, device=like.device)
