"""``POST /classify``: the model's top-5 on the uploaded image (pass 1 only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile

from elgs.api import inference
from elgs.api.dependencies import RuntimeDep, SettingsDep
from elgs.api.errors import error_responses
from elgs.api.schemas import ClassifyResponse

router = APIRouter(tags=["inference"])

# minLength: an empty file is refused (400), so the schema says so to generated clients and fuzzers.
IMAGE_FIELD = File(description="the image, a non-empty file: any format Pillow reads (JPEG, PNG, GIF, WebP, TIFF, "
                               "BMP ...), RGB, RGBA, gray, palette, CMYK or 16-bit; EXIF orientation is applied",
                   json_schema_extra={"minLength": 1})


@router.post(
    "/classify", response_model=ClassifyResponse, summary="Classify an image",
    responses=error_responses(400, 401, 404, 408, 413, 415, 422, 503, 504),
)
async def classify(
    http_request: Request,
    image: Annotated[UploadFile, IMAGE_FIELD],
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> ClassifyResponse:
    """Top-5 classes of the uploaded image, resized whole (no crop) to the model's input size."""
    answer = await inference.run(http_request, runtime, settings, image, task="classify")
    return ClassifyResponse(
        model=runtime.name, weights=runtime.model.weights, predictions=inference.predictions(answer.result.predictions),
        timing_ms=answer.finish(), batch_size=answer.result.batch_size,
    )
