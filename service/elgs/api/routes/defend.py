"""``POST /defend/{method}``: apply a defence, classify the original and the defended image."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, UploadFile
from fastapi.responses import Response

from elgs.api import inference
from elgs.api.dependencies import RuntimeDep, SettingsDep
from elgs.api.errors import error_responses
from elgs.api.routes.classify import IMAGE_FIELD
from elgs.api.schemas import DefendResponse, StageInfo
from elgs.defenses import DEFAULT_THRESHOLD, DEFENSES, LAMBDA_RANGE, THRESHOLD_RANGE, estimator_names
from elgs.thresholds import SCORE_RANGE

router = APIRouter(tags=["inference"])

_METHODS = ", ".join(f"`{name}` ({defense.summary})" for name, defense in DEFENSES.items())
SALIENCY_DESCRIPTION = (
    f"saliency estimator spec `name[:key=value,...]`, name in {', '.join(estimator_names())}, e.g. "
    "`smoothgrad:n=4,sigma=0.2,rectify=true` (parameters and defaults: GET /defenses); parameters left out "
    "take the model's default when it uses that estimator. Default: the model's own (GET /models)")


@router.post(
    "/defend/{method}", response_model=DefendResponse, response_model_by_alias=True, summary="Defend an image",
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or with ?response=image|mask the PNG itself"},
        **error_responses(400, 401, 404, 413, 415, 422, 503, 504),
    },
)
async def defend(
    http_request: Request,
    method: Annotated[str, Path(description=f"the defence: {_METHODS}", examples=["slgs"],
                                json_schema_extra={"enum": list(DEFENSES)})],  # unknown names: 404 at runtime
    image: Annotated[UploadFile, IMAGE_FIELD],
    runtime: RuntimeDep,
    settings: SettingsDep,
    lam: Annotated[float | None, Query(
        alias="lambda", ge=LAMBDA_RANGE[0], le=LAMBDA_RANGE[1], allow_inf_nan=False,
        description=f"smoothing factor in [{LAMBDA_RANGE[0]:g}, {LAMBDA_RANGE[1]:g}] (lgs, slgs, wlgs); "
                    "default: the model's (GET /models)")] = None,
    threshold: Annotated[float | None, Query(
        ge=THRESHOLD_RANGE[0], le=THRESHOLD_RANGE[1], allow_inf_nan=False,
        description=f"gradient block threshold in [{THRESHOLD_RANGE[0]:g}, {THRESHOLD_RANGE[1]:g}] "
                    f"(lgs, slgs, wlgs); default {DEFAULT_THRESHOLD}")] = None,
    saliency: Annotated[str | None, Query(max_length=200, description=f"(slgs, wlgs) {SALIENCY_DESCRIPTION}",
                                          examples=["smoothgrad:n=4,sigma=0.2,rectify=true"])] = None,
    attack_threshold: Annotated[float | None, Query(
        ge=SCORE_RANGE[0], le=SCORE_RANGE[1], allow_inf_nan=False,
        description="attack-score threshold in [0, 2] deciding `attacked`; default: the model's calibrated one "
                    "for this method and lambda (`elgs calibrate`)")] = None,
    response: Annotated[Literal["json", "image", "mask"], Query(
        description="`json` (default); `image` or `mask` return that PNG itself (for curl -o)")] = "json",
) -> DefendResponse | Response:
    """Smooth the suspected patch away and classify both images.

    The mask is the applied suppression (255 = the pixel moved all the way to the dataset mean).
    `attack_score` compares the two answers; the image counts as attacked when the defence changed the top-1,
    the score exceeds the threshold and the original top-1 does not survive removing the suspected patch outright;
    then `final_predictions` is the defended top-5, else the original one. `auto` screens with LGS and sends only
    the images its screen flags on to SLGS (the answer's `path` and `stages` say which ran).
    """
    answer = await inference.run(http_request, runtime, settings, image, task="defend", method=method, lam=lam,
                                 threshold=threshold, saliency=saliency, attack_threshold=attack_threshold)
    result = answer.result
    if response != "json":
        png = await inference.encode_png_bytes(result.image if response == "image" else result.mask)
        headers = {"X-Elgs-Model": runtime.name, "X-Elgs-Weights": runtime.model.weights,
                   "X-Elgs-Batch-Size": str(result.batch_size),
                   "X-Elgs-Top1": result.defended_predictions[0].label if result.defended_predictions else "",
                   "X-Elgs-Attack-Score": f"{result.attack_score:.6f}",
                   "X-Elgs-Attacked": "unknown" if result.attacked is None else str(result.attacked).lower(),
                   **({"X-Elgs-Path": result.path} if result.path else {})}
        return Response(png, media_type="image/png", headers=headers)
    (image_png, mask_png), encode_ms = await inference.encode_base64_pngs(result.image, result.mask)
    return DefendResponse(
        model=runtime.name, weights=runtime.model.weights, method=method, lam=result.lam, threshold=result.threshold,
        predictions=inference.predictions(result.defended_predictions),
        original_predictions=inference.predictions(result.predictions),
        image=image_png, mask=mask_png, timing_ms=answer.finish(encode_ms), batch_size=result.batch_size,
        saliency=result.saliency_method, attack_score=result.attack_score, attack_threshold=result.attack_threshold,
        attacked=result.attacked, final_predictions=inference.predictions(result.final_predictions),
        removal_top1=inference.predictions([result.removal_prediction])[0] if result.removal_prediction else None,
        removal_score=result.removal_score, removal_threshold=result.removal_threshold,
        stages=[StageInfo(method=stage.method, lam=stage.lam, attack_score=stage.attack_score,
                          attack_threshold=stage.attack_threshold, flagged=stage.flagged,
                          top1=inference.predictions(stage.predictions[:1])[0]) for stage in result.stages],
        path=result.path,
    )
