"""What :class:`~elgs_client.Client` and :class:`~elgs_client.AsyncClient` share: configuration,
building each call, parsing each response, and the retry policy. The two clients differ only in
how they send and sleep."""

from __future__ import annotations

import email.utils
import functools
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar, Union

import httpx
from pydantic import BaseModel, TypeAdapter

from elgs_client import __version__
from elgs_client._images import ImageInput, to_upload
from elgs_client.errors import APIConnectionError, APITimeoutError, error_for_status
from elgs_client.types import ClassifyResult, DefendResult, DefenseInfo, Health, ModelInfo, SaliencyResult

DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
DEFAULT_MAX_RETRIES = 3

# Statuses worth retrying: the queue was full (503) or the request timed out server-side (504).
RETRY_STATUSES = frozenset({503, 504})
# Transport failures worth retrying. A read timeout is not: the server may still be computing.
RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                httpx.WriteError, httpx.PoolTimeout)

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call, ready to send as often as the retries need, and how to parse its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    files: Optional[dict[str, tuple[str, bytes, str]]] = None
    retry_statuses: frozenset[int] = RETRY_STATUSES
    answer_statuses: frozenset[int] = frozenset()  # error statuses that are answers, parsed not raised


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (fractions accepted) or an HTTP date."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _params(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _model_parser(schema: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: schema.model_validate(response.json())


@functools.lru_cache(maxsize=None)
def _list_adapter(schema: type[BaseModel]) -> TypeAdapter:
    return TypeAdapter(list[schema])


def _listing_parser(schema: type[BaseModel], key: str) -> Callable[[httpx.Response], list]:
    """The list under ``key`` of a ``{key: [...], ...}`` body, as ``schema`` instances."""
    return lambda response: _list_adapter(schema).validate_python(response.json()[key])


def _health_parser(response: httpx.Response) -> Health:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {"detail": body}
    ready = response.status_code == 200 and body.get("ready", True) is not False
    return Health.model_validate({**body, "ready": ready})


class BaseClient:
    """Configuration and call building shared by the sync and async clients.

    Args:
        base_url: the service root; default ``$ELGS_URL``, else ``http://localhost:8000``.
        api_key: sent as ``Authorization: Bearer <key>``; default ``$ELGS_API_KEY`` (none when unset).
        timeout: seconds (or an :class:`httpx.Timeout`) per attempt.
        max_retries: extra attempts after connection errors, 503 and 504 (0 disables retries).
        backoff: first retry delay in seconds; doubles each retry (with up to 25% jitter), capped at
            ``max_backoff``. A 503's ``Retry-After`` replaces it when present.
        max_backoff: the cap of one retry delay, ``Retry-After`` included.
        headers: extra headers for every request.
        http_client: an :class:`httpx.Client` (for :class:`~elgs_client.Client`) or
            :class:`httpx.AsyncClient` (for :class:`~elgs_client.AsyncClient`) to send through (proxies,
            custom transports, a test client); the SDK does not close it.
    """

    # The httpx client class a subclass sends through when it is given none.
    _http_client_class: type[Union[httpx.Client, httpx.AsyncClient]]

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 timeout: Union[float, httpx.Timeout, None] = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, backoff: float = 0.5, max_backoff: float = 30.0,
                 headers: Optional[Mapping[str, str]] = None,
                 http_client: Union[httpx.Client, httpx.AsyncClient, None] = None) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"backoff and max_backoff must be >= 0, got {backoff} and {max_backoff}")
        self.base_url = (base_url or os.environ.get("ELGS_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else (os.environ.get("ELGS_API_KEY") or None)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.headers = {"User-Agent": f"elgs-client/{__version__}", "Accept": "application/json"}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"
        self.headers.update(headers or {})
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else self._http_client_class()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key={'***' if self.api_key else None})"

    # Calls -------------------------------------------------------------------------------------

    def _classify_call(self, image: ImageInput, model: Optional[str]) -> Call[ClassifyResult]:
        return Call("POST", "/classify", _model_parser(ClassifyResult), _params(model=model),
                    {"image": to_upload(image)})

    def _defend_call(self, image: ImageInput, method: str, lam: Optional[float], threshold: Optional[float],
                     model: Optional[str], saliency: Optional[str] = None,
                     attack_threshold: Optional[float] = None) -> Call[DefendResult]:
        if not method or "/" in method:
            raise ValueError(f"method must be a defence name such as 'slgs', got {method!r}")
        params = _params(model=model, threshold=threshold, saliency=saliency, attack_threshold=attack_threshold)
        if lam is not None:
            params["lambda"] = lam
        return Call("POST", f"/defend/{method}", _model_parser(DefendResult), params, {"image": to_upload(image)})

    def _saliency_call(self, image: ImageInput, model: Optional[str],
                       saliency: Optional[str] = None) -> Call[SaliencyResult]:
        return Call("POST", "/saliency", _model_parser(SaliencyResult), _params(model=model, saliency=saliency),
                    {"image": to_upload(image)})

    def _models_call(self) -> Call[list[ModelInfo]]:
        return Call("GET", "/models", _listing_parser(ModelInfo, "models"))

    def _defenses_call(self) -> Call[list[DefenseInfo]]:
        return Call("GET", "/defenses", _listing_parser(DefenseInfo, "defenses"))

    def _health_call(self, ready: bool) -> Call[Health]:
        # A 503 from /health/ready means "not ready yet": an answer, not a failure to retry.
        return Call("GET", "/health/ready" if ready else "/health/live", _health_parser,
                    retry_statuses=frozenset({504}), answer_statuses=frozenset({503}))

    # Sending -----------------------------------------------------------------------------------

    def _build_request(self, call: Call) -> httpx.Request:
        return self._http.build_request(call.method, self.base_url + call.path, params=call.params or None,
                                        files=call.files, headers=self.headers, timeout=self.timeout)

    def _backoff_delay(self, attempt: int) -> float:
        delay = self.backoff * (2 ** attempt)
        return min(self.max_backoff, delay * (1 + 0.25 * random.random()))

    def _retry_delay(self, call: Call, response: httpx.Response, attempt: int) -> Optional[float]:
        """Seconds to wait before retrying ``response``, or None to stop and return or raise it."""
        if response.status_code not in call.retry_statuses or attempt >= self.max_retries:
            return None
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if response.status_code == 503 and retry_after is not None:
            return min(self.max_backoff, retry_after)
        return self._backoff_delay(attempt)

    def _transport_error_delay(self, call: Call, error: httpx.TransportError, attempt: int) -> float:
        """Seconds to wait before retrying after a transport ``error``.

        Raises:
            APIConnectionError: (:class:`APITimeoutError` for a timeout) when the error is not worth
                retrying or the retries are spent.
        """
        if isinstance(error, RETRY_ERRORS) and attempt < self.max_retries:
            return self._backoff_delay(attempt)
        target = f"{call.method} {self.base_url}{call.path}"
        if isinstance(error, httpx.TimeoutException):
            raise APITimeoutError(f"{target}: timed out ({type(error).__name__}: {error})") from error
        raise APIConnectionError(f"{target}: {type(error).__name__}: {error}") from error

    def _finish(self, call: Call[T], response: httpx.Response) -> T:
        """Parse a final response, or raise the typed error for its status."""
        if response.is_error and response.status_code not in call.answer_statuses:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise error_for_status(response, retry_after=retry_after)
        return call.parse(response)


