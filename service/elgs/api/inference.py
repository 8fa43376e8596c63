"""Glue the routes share: decode, submit to the batcher while watching the client, encode the answer.

Placement (issue 8): decoding ends in an RGB uint8 NumPy array; the model's compute thread turns it
into a tensor, runs the engine and turns the result's images back into uint8 arrays
(:func:`display_arrays`); the helper threads here only run Pillow's PNG encoder and base64.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from fastapi import Request as HttpRequest
from fastapi import UploadFile

from elgs.api.middleware import Admission, admit
from elgs.api.settings import Settings
from elgs.api.state import ModelRuntime
from elgs.api.uploads import read_image
from elgs.defenses import minmax_normalize
from elgs.engine import ModelDefaults, Prediction, Request, Result, resolve_request
from elgs.images import encode_png, tensor_to_array


class ClientDisconnectedError(Exception):
    """The client closed the connection while its request was waiting."""


@dataclass
class Answer:
    """An engine result and the request's own timings (milliseconds).

    The result's ``image``, ``mask``, ``saliency`` and ``region`` are uint8 NumPy arrays ready for PNG
    (see :func:`display_arrays`), made in the compute thread.
    """

    result: Result
    timing_ms: dict[str, float]
    started: float

    def finish(self, encode_ms: float = 0.0) -> dict[str, float]:
        """``timing_ms`` with ``encode`` and ``total`` filled in."""
        self.timing_ms["encode"] = round(encode_ms, 3)
        self.timing_ms["total"] = round((time.perf_counter() - self.started) * 1000, 3)
        return self.timing_ms


async def _wait_for_disconnect(http_request: HttpRequest) -> None:
    # The body is fully read by now, so the only message left is the disconnect.
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


def display_arrays(result: Result) -> Result:
    """The result with its images as uint8 NumPy arrays for PNG: ``image`` (S, S, 3), ``mask`` and ``region``
    (S, S), ``saliency`` (S, S) min-max scaled to 0..255 for display. Runs in the compute thread."""
    def convert(tensor: torch.Tensor | None, scale: bool = False) -> np.ndarray | None:
        if tensor is None or not isinstance(tensor, torch.Tensor):
            return tensor
        return tensor_to_array(_scaled(tensor) if scale else tensor)

    return replace(result, image=convert(result.image), mask=convert(result.mask),
                   saliency=convert(result.saliency, scale=True), region=convert(result.region))


async def submit_unless_disconnected(http_request: HttpRequest, runtime: ModelRuntime, request: Request,
                                     admission: Admission) -> Result:
    """``runtime.batcher.submit(request)``, cancelled (so dropped before compute) if the client leaves;
    the result comes through :func:`display_arrays`."""
    submission = asyncio.ensure_future(runtime.batcher.submit(request, deadline=admission.deadline,
                                                              finish=display_arrays, reservation=admission.reservation))
    watcher = asyncio.ensure_future(_wait_for_disconnect(http_request))
    try:
        await asyncio.wait({submission, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not submission.done():
            submission.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await submission  # the batcher takes the request out of its queue
    if submission.cancelled():
        raise ClientDisconnectedError("the client closed the connection")
    return submission.result()


async def run(http_request: HttpRequest, runtime: ModelRuntime, settings: Settings, upload: UploadFile,
              **request_fields) -> Answer:
    """Check the request (404/422), decode ``upload`` at the model's input size, run it through the batcher,
    time each stage."""
    started = time.perf_counter()
    check(runtime, **request_fields)  # bad parameters cost no admission and no decode
    admission = await admit(http_request, runtime, settings)  # 503 when the model cannot take it, before decoding
    image = await read_image(upload, size=runtime.model.input_size, max_upload_mb=settings.max_upload_mb,
                             max_pixels=settings.max_pixels, decoder=http_request.app.state.decoder)
    decoded = time.perf_counter()
    result = await submit_unless_disconnected(http_request, runtime, Request(image=image, **request_fields), admission)
    engine_timing = dict(result.timing_ms)
    while result.escalate is not None:  # a cascade's screen flagged it: the strong stage, batched with other such
        # The reservation was spent on the first round; the second is admitted (or refused) like a new request.
        strong = Admission(deadline=admission.deadline, reservation=None)
        result = await submit_unless_disconnected(http_request, runtime, result.escalate, strong)
        for stage, ms in result.timing_ms.items():
            engine_timing[stage] = engine_timing.get(stage, 0.0) + ms
    if result.path is not None:
        http_request.app.state.metrics.cascade_answer(runtime.name, request_fields.get("method", ""), result.path,
                                                      result.attacked)
    waited_ms = (time.perf_counter() - decoded) * 1000
    engine_ms = sum(engine_timing.values())
    timing = {"decode": round((decoded - started) * 1000, 3), "queue": round(max(0.0, waited_ms - engine_ms), 3)}
    timing.update({stage: round(ms, 3) for stage, ms in engine_timing.items()})
    return Answer(result=result, timing_ms=timing, started=started)


def check(runtime: ModelRuntime, **request_fields) -> Request:
    """:func:`elgs.engine.resolve_request` of the request's parameters (no image yet) for ``runtime``'s model,
    the same check the batcher and the engine make, against ``runtime.model.describe()`` (which a local model
    and a Ray Serve model deployment both answer).

    Raises:
        UnknownMethodError (404), InvalidParameterError (422).
    """
    return resolve_request(Request(image=None, **request_fields), ModelDefaults.of(runtime.model.describe()))


def predictions(items: list[Prediction] | None) -> list[dict]:
    return [{"index": p.index, "label": p.label, "score": p.score} for p in items or []]


def _scaled(tensor: torch.Tensor) -> torch.Tensor:
    """One image (any shape) min-max scaled to [0, 1] for display (zeros when constant)."""
    return minmax_normalize(tensor.float().unsqueeze(0)).squeeze(0)


def _png_base64(image: np.ndarray | torch.Tensor) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


async def encode_base64_pngs(*images: np.ndarray | torch.Tensor, scale: tuple[bool, ...] = ()) -> tuple[list[str], float]:
    """Base64 PNGs of ``images`` (encoded in a worker thread) and the time it took in ms.

    uint8 arrays (from :func:`display_arrays`) are encoded as they are, with no torch op; ``scale``
    (min-max scaling for display) applies to tensors only, which are converted here (slower: a
    second thread then runs torch ops, see :mod:`elgs.compute`).
    """
    started = time.perf_counter()

    def encode() -> list[str]:
        return [_png_base64(_scaled(image) if i < len(scale) and scale[i] and isinstance(image, torch.Tensor)
                            else image) for i, image in enumerate(images)]

    encoded = await asyncio.to_thread(encode)
    return encoded, (time.perf_counter() - started) * 1000


async def encode_png_bytes(image: np.ndarray | torch.Tensor) -> bytes:
    """PNG bytes of ``image`` (a uint8 array or a tensor), encoded in a worker thread."""
    return await asyncio.to_thread(encode_png, image)
