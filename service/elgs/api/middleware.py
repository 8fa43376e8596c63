"""ASGI middleware that acts before a request's body is read: request ids and clean 500s, the in-flight
limit, the API key, and admission to a model's queue (docs/design.md, sections 4 and 6).

Pure ASGI (not ``BaseHTTPMiddleware``): none of them touches the body stream, so a refused
request costs no upload, no multipart parse and no decode.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import APIRouter, HTTPException
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elgs.batcher import BatcherClosedError, QueueFullError, Reservation
from elgs.errors import ServiceError

logger = logging.getLogger("elgs.api")

REQUEST_ID_HEADER = "X-Request-ID"
# A client's request id is echoed only when it is short and plain (no header or log injection).
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# Where AdmissionMiddleware leaves the request's reservation for the route, which passes it to submit.
RESERVATION_KEY = "elgs.reservation"

MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>'"
WRONG_KEY = "wrong API key in 'Authorization: Bearer <key>'"


def request_id(scope: Scope) -> str | None:
    """The id :class:`RequestIdMiddleware` gave the request, if any."""
    return scope.get("state", {}).get("request_id")


def internal_error_response(request_id_: str | None) -> JSONResponse:
    """The only thing a client learns of a server fault: no exception type, message or path."""
    return JSONResponse({"detail": "internal error", "request_id": request_id_}, status_code=500)


class RequestIdMiddleware:
    """Give every HTTP request an id, put it on every response as ``X-Request-ID``, and answer an
    unhandled exception with :func:`internal_error_response` after logging it with that id.

    The id is the client's ``X-Request-ID`` when it matches :data:`SANE_REQUEST_ID`, else a new one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        rid = given if SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("internal error on %s %s (request id %s)", scope.get("method"), scope.get("path"), rid)
            if started:  # the answer is half sent: all that is left is to drop the connection
                raise
            await internal_error_response(rid)(scope, receive, send_with_id)


# uvicorn's own limit (limit_concurrency) sits this many connections above the app's: room for idle
# keep-alive connections and health probes, so a flood of requests meets the app's JSON 503 first.
CONNECTION_HEADROOM = 64


class InFlightLimitMiddleware:
    """Answer 503 (JSON, with the request id and ``Retry-After: 1``) to an HTTP request that arrives while
    ``max_in_flight`` others are in progress; health and metrics requests are let through and not counted.

    ``elgs serve`` gives uvicorn ``limit_concurrency = max_in_flight + CONNECTION_HEADROOM``: uvicorn's own
    plain-text 503 (no request id) then only meets connections beyond that.
    """

    def __init__(self, app: ASGIApp, max_in_flight: int, exempt: Sequence[re.Pattern] = ()) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.exempt = exempt
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _matches(self.exempt, scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            response = JSONResponse(
                {"detail": f"server busy: {self.in_flight} requests in progress (ELGS_MAX_CONNECTIONS); retry later",
                 "request_id": request_id(scope)}, status_code=503, headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def route_patterns(routers: Sequence[APIRouter]) -> list[re.Pattern]:
    """Regular expressions of the paths of the routes in ``routers`` (any method)."""
    return [compile_path(route.path)[0] for router in routers for route in router.routes]


def _matches(patterns: Sequence[re.Pattern], scope: Scope) -> bool:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    path = path[len(root):] if root and path.startswith(root) else path
    return any(pattern.match(path) for pattern in patterns)


class ApiKeyMiddleware:
    """401 for a request to a protected route without ``Authorization: Bearer <api_key>``, answered
    before the body is read (uvicorn discards what the client still sends, without parsing it).

    Args:
        api_key: the key; None protects nothing.
        protected: path patterns of the routes that need the key (:func:`route_patterns`).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, protected: Sequence[re.Pattern]) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or not _matches(self.protected, scope):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            detail = MISSING_KEY
        elif not hmac.compare_digest(token.strip().encode(), self.expected):
            detail = WRONG_KEY
        else:
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def describe_service_error(error: ServiceError) -> str:
    """A refusal's message for the client (a KeyError-based one without the quotes ``str`` adds)."""
    detail = str(error.args[0]) if error.args else type(error).__name__
    if isinstance(error, BatcherClosedError):
        detail += "; retry on another replica or in a moment"
    return detail


def service_error_response(error: ServiceError, detail: str | None = None) -> JSONResponse:
    """``{"detail": ...}`` with the error's status and, when it has one, an honest ``Retry-After``."""
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    detail = describe_service_error(error) if detail is None else detail
    return JSONResponse({"detail": detail}, status_code=error.status, headers=headers)


class AdmissionMiddleware:
    """Admit an inference request to its model's queue before its body arrives.

    For a POST to one of ``inference`` routes, find the model (``?model=``, default the first),
    :meth:`~elgs.batcher.Batcher.reserve` a place with the deadline ``request_timeout_s`` from now
    and hold it while the upload arrives and decodes (under :data:`RESERVATION_KEY` in the scope, where
    :func:`admit` finds it for the route to hand to ``batcher.submit``; released here when the request
    ends, if submit did not take it over); answer 503 at once when the model cannot take the request in time. Requests this cannot place (service starting, unknown model) go on to the
    route, which answers them.

    Args:
        inference: path patterns of the routes that upload an image to a model (:func:`route_patterns`).
    """

    def __init__(self, app: ASGIApp, inference: Sequence[re.Pattern]) -> None:
        self.app = app
        self.inference = inference

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not _matches(self.inference, scope):
            await self.app(scope, receive, send)
            return
        app_state = scope["app"].state
        service = getattr(app_state, "service", None)
        runtime = service.runtimes.get(QueryParams(scope["query_string"]).get("model") or service.default_model) \
            if service is not None else None
        if runtime is None:
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + app_state.settings.request_timeout_s
        try:
            reservation = runtime.batcher.reserve(deadline)
        except (QueueFullError, BatcherClosedError) as error:
            # No "Connection: close": uvicorn discards the unread body itself, and a client still
            # sending it would read a reset instead of this answer.
            await service_error_response(error)(scope, receive, send)
            return
        scope[RESERVATION_KEY] = reservation
        try:
            await self.app(scope, receive, send)
        finally:
            reservation.release()


@dataclass(frozen=True)
class Admission:
    """A request admitted to a model's queue: its ``time.monotonic()`` deadline and, when
    :class:`AdmissionMiddleware` reserved it, the place it holds (a :class:`~elgs.batcher.Reservation`, or
    on the Ray ingress a ``RemoteReservation``); the route hands both to ``batcher.submit``."""

    deadline: float
    reservation: Reservation | None = None


async def admit(http_request: HttpRequest, runtime, settings) -> Admission:
    """Check the parsed form and the request's admission.

    A request :class:`AdmissionMiddleware` reserved keeps its place and deadline; any other is
    checked against the queue now (length and expected wait), before its image is decoded.

    Raises:
        HTTPException: 422 when the form has more than one ``image`` part.
        QueueFullError, BatcherClosedError: the model cannot take the request in time.
    """
    form = await http_request.form()  # parsed already for the route's UploadFile: cached
    if len(form.getlist("image")) > 1:
        raise HTTPException(422, f"the form has {len(form.getlist('image'))} 'image' parts; send exactly one "
                                 "image per request (curl -F image=@photo.jpg)")
    reservation = http_request.scope.get(RESERVATION_KEY)
    if reservation is not None and reservation.batcher is runtime.batcher and not reservation.released:
        return Admission(reservation.deadline, reservation)
    deadline = time.monotonic() + settings.request_timeout_s
    runtime.batcher.check_capacity(deadline)
    return Admission(deadline)
