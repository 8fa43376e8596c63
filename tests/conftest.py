"""Shared fixtures: devices, a tiny CNN wrapped as a LoadedModel, photographs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from elgs.images import image_to_tensor, sample_photo
from elgs.models import LoadedModel, ModelSpec

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


class TinyCNN(nn.Module):
    """A small deterministic classifier for fast engine, batcher and API tests; (B,3,S,S) -> (B,classes)."""

    def __init__(self, classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.5), nn.Linear(16 * 16, classes),
        )
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.features(x)


def make_tiny_model(input_size: int = 32, classes: int = 10, device: str = "cpu", name: str = "tiny") -> LoadedModel:
    """A LoadedModel around :class:`TinyCNN`, built the same way as zoo models."""
    spec = ModelSpec(
        name=name, summary="tiny test CNN", input_size=input_size, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), default_lambda=3.5, weights_source="random (tests)", build=lambda _: TinyCNN(classes),
    )
    return LoadedModel(spec=spec, module=TinyCNN(classes), weights="random", device=torch.device(device),
                       input_size=input_size, labels=tuple(f"class_{i}" for i in range(classes)))


@pytest.fixture
def tiny_model() -> LoadedModel:
    return make_tiny_model()


@pytest.fixture(scope="session")
def photos() -> dict[str, torch.Tensor]:
    """Eight scikit-image photographs at 32x32, (3, 32, 32) each."""
    names = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "cat"]
    return {name: image_to_tensor(sample_photo(name), 32) for name in names}


def patched_photo() -> torch.Tensor:
    """hubble_deep_field at 32x32 with a 10 px checkerboard "patch" at rows 2-11, columns 11-20, (3, 32, 32).

    The patch turns the tiny CNN's top-1 from 9 to 1; LGS at lambda 3.5 and the removal view both give 9 back.
    """
    x = image_to_tensor(sample_photo("hubble_deep_field"), 32)
    x[:, 2:12, 11:21] = ((torch.arange(10)[:, None] + torch.arange(10)[None]) % 2).to(x.dtype)
    return x
