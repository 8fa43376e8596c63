"""Typed exceptions: one class per HTTP status the service documents, each carrying the server's ``detail``."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "ElgsError", "APIConnectionError", "APITimeoutError", "APIStatusError", "BadRequestError",
    "AuthenticationError", "NotFoundError", "PayloadTooLargeError", "UnsupportedMediaTypeError",
    "UnprocessableEntityError", "ServiceUnavailableError", "GatewayTimeoutError", "InternalServerError",
]


class ElgsError(Exception):
    """Base class of every error the SDK raises."""


class APIConnectionError(ElgsError):
    """The server could not be reached (after the retries)."""


class APITimeoutError(APIConnectionError):
    """The client-side timeout elapsed before the server answered (after the retries)."""


class APIStatusError(ElgsError):
    """The server answered with an error status.

    Attributes:
        status_code: the HTTP status.
        detail: the server's ``detail`` (a string, or FastAPI's list of validation errors for some 422s).
        response: the :class:`httpx.Response`.
    """

    def __init__(self, status_code: int, detail: Any, response: httpx.Response | None = None) -> None:
        self.status_code = status_code
        self.detail = detail
        self.response = response
        super().__init__(f"HTTP {status_code}: {_format_detail(detail)}")


class BadRequestError(APIStatusError):
    """400: the upload is not a decodable image."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class NotFoundError(APIStatusError):
    """404: unknown defence method or model."""


class PayloadTooLargeError(APIStatusError):
    """413: the upload is over the server's size or pixel limit."""


class UnsupportedMediaTypeError(APIStatusError):
    """415: the upload is not an image type."""


class UnprocessableEntityError(APIStatusError):
    """422: a parameter is out of range (lambda, threshold) or malformed."""


class ServiceUnavailableError(APIStatusError):
    """503: the server's queue is full or it is not ready; ``retry_after`` is in seconds (None if absent)."""

    def __init__(self, status_code: int, detail: Any, response: httpx.Response | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status_code, detail, response)
        self.retry_after = retry_after


class GatewayTimeoutError(APIStatusError):
    """504: the request did not finish within the server's per-request timeout."""


class InternalServerError(APIStatusError):
    """Any other 5xx."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError, 422: UnprocessableEntityError, 503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}


def _format_detail(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI's request-validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                location = ".".join(str(p) for p in item.get("loc", ()))
                parts.append(f"{location}: {item.get('msg', item)}" if location else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def error_for_status(response: httpx.Response, retry_after: float | None = None) -> APIStatusError:
    """The typed exception for an error ``response``; ``detail`` from its JSON body, else its text."""
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text or response.reason_phrase
    status = response.status_code
    cls = _STATUS_ERRORS.get(status, InternalServerError if status >= 500 else APIStatusError)
    if cls is ServiceUnavailableError:
        return ServiceUnavailableError(status, detail, response, retry_after=retry_after)
    return cls(status, detail, response)
