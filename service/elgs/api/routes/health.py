"""``GET /health/live`` and ``GET /health/ready`` (open even when an API key is set)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from elgs.api.schemas import ErrorResponse, HealthResponse

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", response_model=HealthResponse, summary="Liveness")
async def live() -> HealthResponse:
    """200 while the process serves HTTP."""
    return HealthResponse(status="alive")


@router.get("/ready", response_model=HealthResponse, summary="Readiness",
            responses={503: {"model": ErrorResponse, "description": "models loading or warming up"}})
async def ready(request: Request) -> HealthResponse | JSONResponse:
    """200 once every model is loaded and has run its warm-up batch; 503 before."""
    service = request.app.state.service
    if service is None:
        return JSONResponse({"detail": "not ready: loading models"}, status_code=503, headers={"Retry-After": "1"})
    if not service.ready:
        runtimes = service.runtimes.values()
        failed = [f"{r.name} ({r.warmup_error})" for r in runtimes if r.warmup_error]
        waiting = [r.name for r in runtimes if not r.ready and not r.warmup_error]
        stopped = [r.name for r in runtimes if not r.batcher.running]
        detail = "not ready: " + "; ".join(
            ([f"warm-up failed for {', '.join(failed)}"] if failed else [])
            + ([f"warming up {', '.join(waiting)}"] if waiting else [])
            + ([f"batcher stopped for {', '.join(stopped)}"] if stopped else []))
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
    return HealthResponse(status="ready", models=list(service.runtimes))
