"""``GET /defenses``: the registered defences and their parameter ranges."""

from __future__ import annotations

from fastapi import APIRouter

from elgs.api.errors import error_responses
from elgs.api.schemas import DefensesResponse
from elgs.defenses import DEFENSES, ESTIMATORS

router = APIRouter(tags=["catalogue"])


@router.get("/defenses", response_model=DefensesResponse, summary="Available defences",
            responses=error_responses(401))
async def list_defenses() -> DefensesResponse:
    """Every method ``POST /defend/{method}`` accepts, with the ranges and defaults of its parameters, and the
    saliency estimators ``?saliency=`` accepts."""
    return DefensesResponse(defenses=[defense.describe() for defense in DEFENSES.values()],
                            saliency_estimators=[estimator.describe() for estimator in ESTIMATORS.values()])
