"""The synchronous client."""

from __future__ import annotations

import time
from typing import Optional, TypeVar

import httpx

from elgs_client._base import BaseClient, Call
from elgs_client._images import ImageInput
from elgs_client.types import ClassifyResult, DefendResult, DefenseInfo, Health, ModelInfo, SaliencyResult

T = TypeVar("T")


class Client(BaseClient):
    """Blocking client of the elgs service.

    >>> with Client("http://localhost:8000") as client:      # doctest: +SKIP
    ...     result = client.defend("photo.jpg", method="slgs", lam=3.5)
    ...     print(result.top1.label); result.save("out")

    Args:
        base_url, api_key, timeout, max_retries, backoff, max_backoff, headers, http_client: see
            :class:`~elgs_client._base.BaseClient` (``http_client`` is an :class:`httpx.Client`).
    """

    _http_client_class = httpx.Client
    _http: httpx.Client

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.send(self._build_request(call))
            except httpx.TransportError as error:
                delay = self._transport_error_delay(call, error, attempt)
            else:
                delay = self._retry_delay(call, response, attempt)
                if delay is None:
                    return self._finish(call, response)
                response.close()
            time.sleep(delay)
            attempt += 1

    def classify(self, image: ImageInput, *, model: Optional[str] = None) -> ClassifyResult:
        """Top-5 classes of ``image`` (a path, bytes, a binary file or a PIL image)."""
        return self._send(self._classify_call(image, model))

    def defend(self, image: ImageInput, method: str = "slgs", lam: Optional[float] = None,
               threshold: Optional[float] = None, model: Optional[str] = None, *,
               saliency: Optional[str] = None, attack_threshold: Optional[float] = None) -> DefendResult:
        """Defend ``image`` with ``method`` (auto, lgs, slgs, wlgs, jpeg, median, gaussian, none).

        Args:
            image: a path, bytes, a binary file object or a PIL image.
            method: the defence; ``auto`` screens with LGS and sends only flagged images on to SLGS.
            lam: smoothing factor in [0, 10]; None takes the model's default.
            threshold: gradient-map block threshold in [0, 1]; None takes 0.2.
            model: a loaded model's name; None takes the server's first.
            saliency: saliency estimator spec for slgs/wlgs (auto: its strong path), e.g.
                ``"smoothgrad:n=4,sigma=0.2,rectify=true"``
                (``GET /defenses`` lists them); None takes the model's default.
            attack_threshold: attack-score threshold in [0, 2] deciding ``attacked``; None takes the
                model's calibrated one.
        """
        return self._send(self._defend_call(image, method, lam, threshold, model, saliency, attack_threshold))

    def saliency(self, image: ImageInput, *, model: Optional[str] = None,
                 saliency: Optional[str] = None) -> SaliencyResult:
        """Saliency map and SLGS region of ``image`` with estimator ``saliency`` (None: the model's default)."""
        return self._send(self._saliency_call(image, model, saliency))

    def models(self) -> list[ModelInfo]:
        """The models the server has loaded."""
        return self._send(self._models_call())

    def defenses(self) -> list[DefenseInfo]:
        """The defences the server offers, with their parameters."""
        return self._send(self._defenses_call())

    def health(self, ready: bool = True) -> Health:
        """``/health/ready`` (default) or ``/health/live``; ``Health.ready`` is False while warming up."""
        return self._send(self._health_call(ready))
