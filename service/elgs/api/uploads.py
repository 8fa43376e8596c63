"""Uploads: the request-body limits (size and time) and decoding the ``image`` field off the event loop."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import HTTPException, UploadFile
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elgs.api.sanitize import quote_client_text
from elgs.images import decode_for_model

# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Declared types accepted besides image/*: what clients send when they do not know the type.
GENERIC_CONTENT_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/x-www-form-urlencoded"}


def _too_large_message(max_upload_mb: float) -> str:
    return (f"the upload is over the limit of {max_upload_mb:g} MiB; send a smaller image (e.g. re-encode it as "
            f"JPEG) or raise ELGS_MAX_UPLOAD_MB")


def default_decode_concurrency() -> int:
    """Decodes at once by default: one per core, at most 4 (each may hold a full-size image)."""
    return max(1, min(4, os.cpu_count() or 1))


def _body_timeout_message(body_timeout_s: float) -> str:
    return (f"the request body did not arrive within {body_timeout_s:g} s; send the upload at once "
            f"(or raise ELGS_BODY_TIMEOUT_S on the server)")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_upload_mb`` (plus multipart overhead) with 413, and bodies
    that take longer than ``body_timeout_s`` to arrive with 408.

    A declared ``Content-Length`` over the limit is answered before the body is read; a body without
    one (chunked) is counted as it streams and cut off at the limit, so no upload is held in full.
    The time limit runs from the start of the request to the body's last byte, so a client sending
    one byte a second holds its connection for ``body_timeout_s`` at most.
    """

    def __init__(self, app: ASGIApp, max_upload_mb: float, body_timeout_s: float = 30.0) -> None:
        if not body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be > 0, got {body_timeout_s}")
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_body_bytes = int(max_upload_mb * 1024 * 1024) + MULTIPART_OVERHEAD_BYTES
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            response = JSONResponse({"detail": _too_large_message(self.max_upload_mb)}, status_code=413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0
        body_done = False
        body_deadline = time.monotonic() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # only the disconnect is left to wait for: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, body_deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(408, _body_timeout_message(self.body_timeout_s),
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise HTTPException(413, _too_large_message(self.max_upload_mb), headers={"Connection": "close"})
            else:
                body_done = True
            return message

        await self.app(scope, limited_receive, send)


class DecodePool:
    """The threads that decode uploads: at most ``max_workers`` at once, the rest wait their turn.

    Decoding an image may hold the full-size image in memory; a bounded pool makes the peak memory
    of decoding ``max_workers`` times one decode, however many uploads arrive at once.
    """

    def __init__(self, max_workers: int | None = None) -> None:
        max_workers = default_decode_concurrency() if max_workers is None else max_workers
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="elgs-decode")

    async def decode(self, data: bytes, size: int, max_pixels: int) -> np.ndarray:
        """:func:`elgs.images.decode_for_model` in one of the pool's threads; (size, size, 3) uint8."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _decode, data, size, max_pixels)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _decode(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    return decode_for_model(data, size, max_pixels=max_pixels)


async def read_image(upload: UploadFile, *, size: int, max_upload_mb: float, max_pixels: int,
                     decoder: DecodePool | None = None) -> np.ndarray:
    """Check and decode the uploaded image in a decode thread; RGB uint8 (size, size, 3), no torch object
    (the model's compute thread makes the tensor, issue 8).

    Args:
        decoder: the app's bounded decode pool (None: the event loop's default executor).

    Raises:
        HTTPException: 415 for a declared non-image type, 413 over the byte limit, 400 for an empty file.
        ImageDecodeError: undecodable (400) or not an image format at all (415).
        ImageTooLargeError: over ``max_pixels`` (413).
    """
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if not content_type.startswith("image/") and content_type not in GENERIC_CONTENT_TYPES:
        raise HTTPException(415, f"the upload's content type is {quote_client_text(content_type)}, not an image; "
                                 "send a JPEG, PNG, "
                                 "GIF, WebP ... file (with curl: -F 'image=@photo.jpg;type=image/jpeg')")
    max_bytes = int(max_upload_mb * 1024 * 1024)
    if upload.size is not None and upload.size > max_bytes:
        raise HTTPException(413, _too_large_message(max_upload_mb))
    data = await upload.read()
    if not data:
        raise HTTPException(400, "the uploaded file 'image' is empty; send the image's bytes "
                                 "(curl -F image=@photo.jpg: note the @)")
    if len(data) > max_bytes:
        raise HTTPException(413, _too_large_message(max_upload_mb))
    if decoder is None:
        array = await asyncio.to_thread(_decode, data, size, max_pixels)
    else:
        array = await decoder.decode(data, size, max_pixels)
    return array
