"""Response bodies of the HTTP API (design.md, section 6); the OpenAPI document at /docs is generated from them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Prediction(BaseModel):
    """One of the top-5 classes."""

    index: int = Field(description="class index in the model's label list (ImageNet for the zoo models)")
    label: str = Field(description="class name")
    score: float = Field(description="softmax probability", ge=0, le=1)


class ErrorResponse(BaseModel):
    """Every error: what went wrong and what to change."""

    detail: str = Field(examples=["lambda: must be a number from 0 to 10, got 11"])


class _Answer(BaseModel):
    model: str = Field(description="the model that answered")
    weights: str = Field(description="'pretrained', or 'random' on development servers")
    timing_ms: dict[str, float] = Field(
        description="milliseconds: decode, queue, pass1, defense, pass2 (the batch's), encode, total")
    batch_size: int = Field(description="how many requests shared the model passes with this one", ge=1)


class ClassifyResponse(_Answer):
    """``POST /classify``."""

    predictions: list[Prediction] = Field(description="top-5 on the uploaded image")


class StageInfo(BaseModel):
    """One defence view the request computed, and its verdict."""

    model_config = ConfigDict(populate_by_name=True)

    method: str = Field(description="the defence that made this view (auto: lgs screens, slgs is the strong path)")
    lam: float | None = Field(alias="lambda", description="its smoothing factor")
    attack_score: float = Field(description="L1 distance of the original and this view's softmax, in [0, 2]",
                                ge=0, le=2)
    attack_threshold: float | None = Field(description="the threshold it was judged against (null: not calibrated)")
    flagged: bool | None = Field(description="this view changed the top-1 and its score is above the threshold")
    top1: Prediction = Field(description="this view's top-1")


class DefendResponse(_Answer):
    """``POST /defend/{method}``."""

    model_config = ConfigDict(populate_by_name=True)

    method: str = Field(description="the defence applied")
    lam: float | None = Field(alias="lambda", description="smoothing factor used (null when the method has none)")
    threshold: float | None = Field(description="gradient block threshold used (null when the method has none)")
    predictions: list[Prediction] = Field(description="top-5 on the defended image")
    original_predictions: list[Prediction] = Field(description="top-5 on the uploaded image")
    image: str = Field(description="the defended image: base64 PNG, RGB, input_size x input_size")
    mask: str = Field(description="the applied suppression mask: base64 PNG, 8-bit gray (255 = fully smoothed)")
    saliency: str | None = Field(
        default=None, description="the saliency estimator used, as a canonical spec (slgs, wlgs; null otherwise)",
        examples=["smoothgrad:n=4,sigma=0.2,rectify=true,seed=0,quantile=0.9"])
    attack_score: float = Field(
        description="L1 distance between the softmax vectors of the uploaded and the defended image, in [0, 2]",
        ge=0, le=2)
    attack_threshold: float | None = Field(
        description="the score above which the answer counts as attacked: ?attack_threshold= or the model's "
                    "calibrated one for this method and lambda (null: not calibrated)")
    attacked: bool | None = Field(
        description="the verdict: a view changed the top-1 by more than its threshold (the defended view: "
                    "attack_score > attack_threshold; the removal view: removal_score > removal_threshold) on an original "
                    "top-1 of at least 0.1 probability, and the original top-1 does not survive removing the suspected "
                    "patch outright (null: changed, no threshold)")
    final_predictions: list[Prediction] = Field(
        description="the one answer to use: when attacked the top-5 with the suspected patch removed (lgs, slgs, wlgs, "
                    "auto; the defended top-5 for the filters), when undecided the defended top-5, else the original top-5")
    removal_top1: Prediction | None = Field(
        default=None, description="top-1 with the suspected patch removed outright (lgs, slgs, wlgs): the check that "
                                  "keeps an attack on the defence from steering final_predictions")
    removal_score: float | None = Field(
        default=None, ge=0, le=2, description="L1 distance between the softmax vectors of the uploaded image and the "
                                              "removal view (lgs, slgs, wlgs, auto)")
    removal_threshold: float | None = Field(
        default=None, description="the calibrated score above which the removal view alone flags the image (null: "
                                  "not calibrated; ?attack_threshold= does not change it)")
    stages: list[StageInfo] = Field(
        default_factory=list, description="every defence view computed, in order (auto: the screen, then the strong "
                                          "path when the screen flagged the image)")
    path: str | None = Field(
        default=None, description="auto only: `screen` (the cheap screen answered) or `strong` (SLGS decided)")


class SaliencyResponse(_Answer):
    """``POST /saliency``."""

    predictions: list[Prediction] = Field(description="top-5 on the uploaded image")
    saliency: str = Field(description="S, min-max scaled: base64 PNG (gradient: max over channels of |dL/dx| "
                                      "for the top-5 loss; smoothgrad: its mean over the noisy copies)")
    region: str = Field(description="the SLGS saliency region D (255 inside): base64 PNG")
    saliency_method: str = Field(description="the saliency estimator used, as a canonical spec",
                                 examples=["gradient:rectify=false,quantile=1"])


class ModelInfo(BaseModel):
    """A loaded model."""

    name: str
    summary: str
    input_size: int
    mean: list[float]
    std: list[float]
    default_lambda: float
    default_saliency: str = Field(description="saliency estimator spec SLGS/WLGS use when a request names none")
    weights_source: str
    weights: str = Field(description="'pretrained' or 'random'")
    device: str
    max_batch_size: int
    default: bool = Field(description="whether requests without ?model= go to this model")


class ModelsResponse(BaseModel):
    """``GET /models``."""

    default: str = Field(description="the model used when a request names none")
    models: list[ModelInfo] = Field(description="loaded models, resident in memory")
    available: list[str] = Field(description="all zoo models (start the server with ELGS_MODELS to load others)")


class ParameterRange(BaseModel):
    minimum: float
    maximum: float
    default: float | str


class DefenseInfo(BaseModel):
    """A registered defence and its parameters."""

    name: str
    summary: str
    needs_saliency: bool
    parameters: dict[str, ParameterRange]
    cascade: dict[str, str] | None = Field(
        default=None, description="a cascade's screen and strong defence (auto: lgs, then slgs for flagged images)")


class SaliencyParameterInfo(BaseModel):
    """A parameter of a saliency estimator."""

    type: str = Field(description="int, float or bool")
    default: float | int | bool
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""


class SaliencyEstimatorInfo(BaseModel):
    """A registered saliency estimator; a spec is ``name[:key=value,...]`` (``?saliency=``)."""

    name: str
    summary: str
    parameters: dict[str, SaliencyParameterInfo]


class DefensesResponse(BaseModel):
    """``GET /defenses``."""

    defenses: list[DefenseInfo]
    saliency_estimators: list[SaliencyEstimatorInfo] = Field(
        description="estimators for ?saliency= on /defend/slgs, /defend/wlgs and /saliency; a spec is "
                    "name[:key=value,...], e.g. smoothgrad:n=4,sigma=0.2,rectify=true; parameters left out take "
                    "the model's default (GET /models default_saliency) when it uses that estimator, else the "
                    "defaults listed here")


class HealthResponse(BaseModel):
    """``GET /health/live`` and ``GET /health/ready`` when healthy."""

    status: str = Field(examples=["ready"])
    models: list[str] = Field(default_factory=list, description="models loaded (and warmed up, for /ready)")
