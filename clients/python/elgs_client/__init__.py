"""Python SDK of the elgs service: defend image classifiers against adversarial patches over HTTP.

>>> from elgs_client import Client                         # doctest: +SKIP
>>> result = Client("http://localhost:8000").defend("photo.jpg", method="slgs")
>>> result.top1.label, result.image.size                   # doctest: +SKIP

Depends on httpx and pydantic only; ``pip install "elgs-client[images]"`` adds Pillow for
``result.image`` / ``result.mask`` as PIL images.
"""

__version__ = "0.1.0"

from elgs_client._async_client import AsyncClient  # noqa: E402
from elgs_client._client import Client  # noqa: E402
from elgs_client.errors import (  # noqa: E402
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ElgsError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
)
from elgs_client.types import (  # noqa: E402
    ClassifyResult,
    DefendResult,
    DefenseInfo,
    Health,
    ModelInfo,
    Prediction,
    SaliencyResult,
    Stage,
)

__all__ = [
    "Client", "AsyncClient", "ClassifyResult", "DefendResult", "SaliencyResult", "Prediction", "ModelInfo",
    "DefenseInfo", "Health", "Stage", "ElgsError", "APIConnectionError", "APITimeoutError", "APIStatusError",
    "BadRequestError", "AuthenticationError", "NotFoundError", "PayloadTooLargeError",
    "UnsupportedMediaTypeError", "UnprocessableEntityError", "ServiceUnavailableError", "GatewayTimeoutError",
    "InternalServerError",
]
