"""``POST /saliency``: the top-5 saliency map ``S`` and the SLGS region ``D``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, UploadFile

from elgs.api import inference
from elgs.api.dependencies import RuntimeDep, SettingsDep
from elgs.api.errors import error_responses
from elgs.api.routes.classify import IMAGE_FIELD
from elgs.api.routes.defend import SALIENCY_DESCRIPTION
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
    saliency: Annotated[str | None, Query(max_length=200, description=SALIENCY_DESCRIPTION,
                                          examples=["smoothgrad:n=4,sigma=0.2,rectify=true"])] = None,
) -> SaliencyResponse:
    """The saliency map ``S`` of the chosen estimator (scaled to 0..255 for display) and the region ``D`` that
    SLGS smooths (255 inside). With `gradient`, ``S`` is the max over channels of the input gradient of the
    top-5 cross-entropy."""
    answer = await inference.run(http_request, runtime, settings, image, task="saliency", saliency=saliency)
    result = answer.result
    (saliency_png, region_png), encode_ms = await inference.encode_base64_pngs(
        result.saliency, result.region, scale=(True, False))
    return SaliencyResponse(
        model=runtime.name, weights=runtime.model.weights, predictions=inference.predictions(result.predictions),
        saliency=saliency_png, region=region_png, saliency_method=result.saliency_method, timing_ms=answer.finish(encode_ms), batch_size=result.batch_size,
    )
