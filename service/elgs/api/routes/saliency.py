"""``POST /saliency``: the top-5 saliency map ``S`` and the SLGS region ``D``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, UploadFile

from elgs.api import inference
from elgs.api.dependencies import RuntimeDep, SettingsDep
from elgs.api.errors import error_responses
from elgs.api.routes.classify import IMAGE_FIELD
from elgs.api.schemas import SaliencyResponse

router = APIRouter(tags=["inference"])


@router.post(
    "/saliency", response_model=SaliencyResponse, summary="Saliency map and SLGS region",
    responses=error_responses(400, 401, 404, 413, 415, 422, 503, 504),
)
async def saliency(
    http_request: Request,
    image: Annotated[UploadFile, IMAGE_FIELD],
    runtime: RuntimeDep,
    settings: SettingsDep,
) -> SaliencyResponse:
    """``S`` = max over channels of the input gradient of the top-5 cross-entropy (scaled to 0..255 for display)
    and the region ``D`` that SLGS smooths (255 inside)."""
    answer = await inference.run(http_request, runtime, settings, image, task="saliency")
    result = answer.result
    (saliency_png, region_png), encode_ms = await inference.encode_base64_pngs(
        result.saliency, result.region, scale=(True, False))
    return SaliencyResponse(
        model=runtime.name, weights=runtime.model.weights, predictions=inference.predictions(result.predictions),
        saliency=saliency_png, region=region_png, timing_ms=answer.finish(encode_ms), batch_size=result.batch_size,
    )
