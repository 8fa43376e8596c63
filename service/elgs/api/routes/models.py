"""``GET /models``: the loaded models with their defaults, and the zoo."""

from __future__ import annotations

from fastapi import APIRouter

from elgs.api.dependencies import ServiceDep
from elgs.api.errors import error_responses
from elgs.api.schemas import ModelInfo, ModelsResponse
from elgs.models import model_names

router = APIRouter(tags=["catalogue"])


@router.get("/models", response_model=ModelsResponse, summary="Loaded models", responses=error_responses(401))
async def list_models(service: ServiceDep) -> ModelsResponse:
    """Models resident on this server (input size, normalisation, default lambda, weights, device)."""
    default = service.default_model
    return ModelsResponse(
        default=default,
        models=[ModelInfo(**runtime.model.describe(), max_batch_size=runtime.batcher.max_batch_size,
                          default=name == default) for name, runtime in service.runtimes.items()],
        available=model_names(),
    )
