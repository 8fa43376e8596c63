"""Map every failure to ``{"detail": "..."}`` with the status of design.md, section 6, worded so a user knows
what to fix."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from elgs.api.inference import ClientDisconnectedError
from elgs.api.middleware import (
    describe_service_error,
    internal_error_response,
    request_id,
    service_error_response,
)
from elgs.api.sanitize import client_values, quote_client_text, sanitize_detail
from elgs.errors import ServiceError
from elgs.images import ImageDecodeError, ImageTooLargeError

logger = logging.getLogger("elgs.api")

# What each parameter is, appended to validation errors about it.
PARAMETER_HINTS = {
    "lambda": "lambda is the smoothing factor: a number from 0 to 10, e.g. ?lambda=3.5",
    "threshold": "threshold is the gradient block threshold: a number from 0 to 1, e.g. ?threshold=0.2",
    "image": "upload the image as the multipart/form-data field 'image', e.g. curl -F image=@photo.jpg URL",
    "response": "response is json (default), image or mask",
    "model": "GET /models lists the loaded models",
}

# Status codes and what they mean, for the OpenAPI document.
ERROR_DESCRIPTIONS = {
    400: "the upload is not a decodable image (e.g. truncated) or is empty",
    401: "ELGS_API_KEY is set and the request lacks 'Authorization: Bearer <key>' or the key is wrong",
    404: "unknown defence method or model not loaded",
    413: "upload over max_upload_mb or image over max_pixels",
    415: "the upload is not an image type",
    422: "a parameter is out of range or the 'image' field is missing",
    408: "the request body did not arrive within body_timeout_s",
    500: "a fault of the server: the body says only 'internal error' and the request id the logs name",
    503: "queue full or the answer would come after the deadline (see Retry-After), or the server is shutting down",
    504: "no answer within request_timeout_s",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for a route, all with the ``{"detail": ...}`` body."""
    from elgs.api.schemas import ErrorResponse

    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


# Our words for a body the multipart parser refused (its own name internals, e.g. "Missing boundary in multipart.").
MULTIPART_ERROR = ("the request body is not valid multipart/form-data (no boundary in its Content-Type, or "
                   "malformed parts); upload the image as the form field 'image', e.g. curl -F image=@photo.jpg URL")
BODY_ERROR = "the request body could not be read as a form; upload the image as the multipart/form-data field 'image'"


def _json(status: int, detail: str, headers: dict[str, str] | None = None, request: Request | None = None
          ) -> JSONResponse:
    """``{"detail": ...}``; a value of ``request``'s path or query is quoted at most in part (:mod:`.sanitize`)."""
    values = client_values(request.path_params, request.query_params.multi_items()) if request is not None else ()
    return JSONResponse({"detail": sanitize_detail(detail, values)}, status_code=status, headers=headers)


def _parameter_name(loc: Sequence[Any]) -> tuple[str, str]:
    """('query', 'lambda') -> ('query parameter', 'lambda')."""
    where = {"query": "query parameter", "path": "path parameter", "body": "form field",
             "header": "header"}.get(str(loc[0]) if loc else "", "parameter")
    name = ".".join(str(part) for part in loc[1:]) or where
    return where, name


def format_validation_errors(errors: Sequence[dict[str, Any]]) -> str:
    """FastAPI's list of pydantic errors as one readable sentence per problem."""
    sentences = []
    for error in errors:
        where, name = _parameter_name(error.get("loc", ()))
        if error.get("type") == "missing":
            sentence = f"missing {where} '{name}'"
        elif name == "image" and where == "form field":
            sentence = "form field 'image' must be a file upload, not a text value"
        else:
            message = str(error.get("msg", "is invalid"))
            message = message[0].lower() + message[1:] if message else message
            given = error.get("input")
            sentence = f"{where} '{name}': {message}"
            if isinstance(given, str):
                sentence += f", got {quote_client_text(given)}"
            elif isinstance(given, (int, float)):
                sentence += f", got {given!r}"
        hint = PARAMETER_HINTS.get(name.split(".")[0])
        sentences.append(f"{sentence} ({hint})" if hint else sentence)
    return "; ".join(sentences) or "invalid request"


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return _json(422, format_validation_errors(error.errors()))


async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
    """Every refusal of the service's own (:class:`elgs.errors.ServiceError`): its status, its message with any
    value of the request quoted at most in part, and its ``Retry-After``."""
    values = client_values(request.path_params, request.query_params.multi_items())
    return service_error_response(error, sanitize_detail(describe_service_error(error), values))


async def _too_large(request: Request, error: ImageTooLargeError) -> JSONResponse:
    return _json(413, f"{error}; resize the image or raise ELGS_MAX_PIXELS")


async def _undecodable(request: Request, error: ImageDecodeError) -> JSONResponse:
    # Our words, not the decoder's (Pillow's messages name its internals and byte counts).
    if isinstance(error.__cause__, UnidentifiedImageError):
        return _json(415, "the upload is not in an image format this server reads (JPEG, PNG, GIF, BMP, TIFF, "
                          "WebP ...); send an image file in the field 'image'")
    cause = str(error.__cause__ or error).lower()
    what = "the file ends early (truncated)" if "truncated" in cause else "the file is corrupt or truncated"
    return _json(400, f"the image could not be decoded: {what}; send the complete image file")


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """FastAPI's answer to an ``HTTPException``, with the form parser's messages in our words and no long or
    unprintable quotation of the request."""
    if isinstance(error.__context__, MultiPartException):
        return _json(error.status_code, MULTIPART_ERROR, error.headers)
    if error.status_code == 400 and error.detail == "There was an error parsing the body":
        return _json(400, BODY_ERROR, error.headers)
    if not isinstance(error.detail, str):
        return await http_exception_handler(request, error)
    return _json(error.status_code, error.detail, error.headers, request=request)


async def _client_gone(request: Request, error: Exception) -> JSONResponse:
    # nginx's 499: nobody reads this, but the metrics and the access log show what happened.
    return _json(499, "the client closed the connection before the answer was ready")


async def _internal(request: Request, error: Exception) -> JSONResponse:
    # RequestIdMiddleware answers unhandled errors first; this is the last resort outside it.
    rid = request_id(request.scope)
    logger.error("internal error on %s %s (request id %s)", request.method, request.url.path, rid, exc_info=error)
    return internal_error_response(rid)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)  # 404, 422, 503, 504: each error says which
    app.add_exception_handler(ImageTooLargeError, _too_large)
    app.add_exception_handler(ImageDecodeError, _undecodable)
    app.add_exception_handler(ClientDisconnectedError, _client_gone)
    app.add_exception_handler(Exception, _internal)
