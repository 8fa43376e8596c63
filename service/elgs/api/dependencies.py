"""Dependencies the routes declare with ``Depends``; tests override them instead of patching modules."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from elgs.api.middleware import MISSING_KEY, WRONG_KEY
from elgs.api.settings import Settings
from elgs.api.state import ModelRuntime, ServiceState

bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="API key",
    description="Needed on every endpoint but health and metrics when the server sets ELGS_API_KEY.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> ServiceState:
    service = request.app.state.service
    if service is None:
        raise HTTPException(503, "the service is starting: models are not loaded yet; retry in a moment",
                            headers={"Retry-After": "1"})
    return service


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """401 unless the request carries ``Authorization: Bearer <ELGS_API_KEY>`` (when a key is set).

    :class:`elgs.api.middleware.ApiKeyMiddleware` checks the same before the body is read; this
    dependency declares the scheme in the OpenAPI document and guards routes used without it.
    """
    if settings.api_key is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(401, MISSING_KEY, headers=challenge)
    expected = settings.api_key.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(401, WRONG_KEY, headers=challenge)


def get_runtime(
    service: Annotated[ServiceState, Depends(get_service)],
    model: Annotated[str | None, Query(
        description="a loaded model (GET /models); default: the first one the server loaded",
        examples=["efficientnet_lite0"])] = None,
) -> ModelRuntime:
    """The loaded model a request names (404 when it is not loaded)."""
    return service.runtime(model)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[ServiceState, Depends(get_service)]
RuntimeDep = Annotated[ModelRuntime, Depends(get_runtime)]
