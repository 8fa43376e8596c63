"""Typed results: pydantic models of the service's JSON (DESIGN 6).

Unknown fields the server may add later are kept (``extra="allow"``), so an older SDK keeps working.
Base64 PNG fields are stored as ``*_base64``; ``result.image`` / ``result.mask`` decode them to PIL
images and ``result.image_png`` / ``result.mask_png`` give the PNG bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from elgs_client._images import decode_base64, png_to_pil

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "Prediction", "ClassifyResult", "DefendResult", "SaliencyResult", "ModelInfo", "DefenseInfo", "ParameterRange",
    "Health", "Stage",
]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True, protected_namespaces=())


class Prediction(_Schema):
    """One of the top-5 classes and its softmax probability."""

    index: int
    label: str
    score: float


def _write_pngs(directory: Union[str, Path], files: dict[str, bytes]) -> dict[str, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, png in files.items():
        path = directory / f"{name}.png"
        path.write_bytes(png)
        written[name] = path
    return written


class ClassifyResult(_Schema):
    """``POST /classify``: the top-5 on the uploaded image."""

    model: str
    weights: str
    predictions: list[Prediction]
    timing_ms: dict[str, float] = Field(default_factory=dict)
    batch_size: Optional[int] = None

    @property
    def top1(self) -> Prediction:
        return self.predictions[0]


class Stage(_Schema):
    """One defence view a request computed (``auto``: the LGS screen, then SLGS when the screen flagged it)."""

    method: str
    lam: Optional[float] = Field(default=None, alias="lambda")
    attack_score: float
    attack_threshold: Optional[float] = None
    flagged: Optional[bool] = None
    top1: Prediction


class DefendResult(_Schema):
    """``POST /defend/{method}``: defended top-5, original top-5, defended image, applied mask, attack verdict.

    ``final_predictions`` is the one answer to use: when ``attacked`` (a view, the defended one or the removal
    view, changed the top-1 by more than its threshold, on an original top-1 of at least 0.1 probability, and the
    original top-1 does not survive removing the suspected patch outright) the removal view's top-5 (the
    defended top-5 for the whole-image filters), else the original top-5 (the defended one when undecided).
    ``path`` (``auto`` only) says whether the cheap screen answered or the strong path decided; ``stages``
    lists every view computed.
    """

    model: str
    weights: str
    method: str
    lam: Optional[float] = Field(default=None, alias="lambda")
    threshold: Optional[float] = None
    predictions: list[Prediction]
    original_predictions: list[Prediction]
    image_base64: str = Field(alias="image")
    mask_base64: str = Field(alias="mask")
    timing_ms: dict[str, float] = Field(default_factory=dict)
    batch_size: Optional[int] = None
    saliency_method: Optional[str] = Field(default=None, alias="saliency")
    attack_score: Optional[float] = None
    attack_threshold: Optional[float] = None
    attacked: Optional[bool] = None
    final_predictions: list[Prediction] = Field(default_factory=list)
    removal_top1: Optional[Prediction] = None
    removal_score: Optional[float] = None
    removal_threshold: Optional[float] = None
    stages: list[Stage] = Field(default_factory=list)
    path: Optional[str] = None

    @property
    def final_top1(self) -> Prediction:
        """The top class of ``final_predictions`` (the answer to use)."""
        return (self.final_predictions or self.predictions)[0]

    @property
    def top1(self) -> Prediction:
        """The defended image's top class."""
        return self.predictions[0]

    @property
    def image_png(self) -> bytes:
        return decode_base64(self.image_base64)

    @property
    def mask_png(self) -> bytes:
        return decode_base64(self.mask_base64)

    @property
    def image(self) -> PILImage.Image:
        """The defended image (RGB, the model's input size); needs Pillow."""
        return png_to_pil(self.image_png)

    @property
    def mask(self) -> PILImage.Image:
        """The applied mask (8-bit grayscale, 255 = fully suppressed); needs Pillow."""
        return png_to_pil(self.mask_png)

    def save(self, directory: Union[str, Path], stem: Optional[str] = None) -> dict[str, Path]:
        """Write ``<stem>.png`` (defended image) and ``<stem>_mask.png`` into ``directory`` (created if needed).

        Args:
            directory: target folder.
            stem: file name stem; default the method name (``slgs.png``, ``slgs_mask.png``).

        Returns:
            ``{"image": path, "mask": path}``.
        """
        stem = stem or self.method
        written = _write_pngs(directory, {stem: self.image_png, f"{stem}_mask": self.mask_png})
        return {"image": written[stem], "mask": written[f"{stem}_mask"]}


class SaliencyResult(_Schema):
    """``POST /saliency``: top-5, the saliency map ``S`` and the SLGS region ``D``, as 8-bit PNGs."""

    model: str
    weights: Optional[str] = None
    predictions: list[Prediction]
    saliency_base64: str = Field(alias="saliency")
    region_base64: str = Field(alias="region")
    timing_ms: dict[str, float] = Field(default_factory=dict)
    batch_size: Optional[int] = None
    saliency_method: Optional[str] = None

    @property
    def saliency_png(self) -> bytes:
        return decode_base64(self.saliency_base64)

    @property
    def region_png(self) -> bytes:
        return decode_base64(self.region_base64)

    @property
    def saliency(self) -> PILImage.Image:
        """Saliency map, 8-bit grayscale; needs Pillow."""
        return png_to_pil(self.saliency_png)

    @property
    def region(self) -> PILImage.Image:
        """SLGS saliency region (0 or 255), 8-bit grayscale; needs Pillow."""
        return png_to_pil(self.region_png)

    def save(self, directory: Union[str, Path], stem: str = "saliency") -> dict[str, Path]:
        """Write ``<stem>.png`` and ``<stem>_region.png``; returns ``{"saliency": path, "region": path}``."""
        written = _write_pngs(directory, {stem: self.saliency_png, f"{stem}_region": self.region_png})
        return {"saliency": written[stem], "region": written[f"{stem}_region"]}


class ModelInfo(_Schema):
    """One loaded model as ``GET /models`` describes it."""

    name: str
    summary: Optional[str] = None
    input_size: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    default_lambda: Optional[float] = None
    default_saliency: Optional[str] = None
    weights_source: Optional[str] = None
    weights: Optional[str] = None
    device: Optional[str] = None
    max_batch_size: Optional[int] = None
    default: bool = False


class ParameterRange(_Schema):
    """A defence parameter's range and default."""

    minimum: float
    maximum: float
    default: Union[float, str, None] = None


class DefenseInfo(_Schema):
    """One defence as ``GET /defenses`` describes it."""

    name: str
    summary: Optional[str] = None
    needs_saliency: Optional[bool] = None
    parameters: dict[str, ParameterRange] = Field(default_factory=dict)
    cascade: Optional[dict[str, str]] = None


class Health(_Schema):
    """``GET /health/ready`` (or ``/health/live``).

    ``ready`` is whether the probe answered 200: for ``/health/ready`` False while the models load or
    warm up (``detail`` says which); for ``/health/live`` whether the process serves HTTP.
    """

    ready: bool
    status: Optional[str] = None
    models: list[str] = Field(default_factory=list)
    detail: Any = None
