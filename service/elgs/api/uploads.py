"""Uploads: the request-body limit and decoding the ``image`` field off the event loop."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import HTTPException, UploadFile
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elgs.images import image_to_array, open_image

# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Declared types accepted besides image/*: what clients send when they do not know the type.
GENERIC_CONTENT_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/x-www-form-urlencoded"}


def _too_large_message(max_upload_mb: float) -> str:
    return (f"the upload is over the limit of {max_upload_mb:g} MiB; send a smaller image (e.g. re-encode it as "
            f"JPEG) or raise ELGS_MAX_UPLOAD_MB")


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_upload_mb`` (plus multipart overhead) with 413.

    A declared ``Content-Length`` over the limit is answered before the body is read; a body without
    one (chunked) is counted as it streams and cut off at the limit, so no upload is held in full.
    """

    def __init__(self, app: ASGIApp, max_upload_mb: float) -> None:
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_body_bytes = int(max_upload_mb * 1024 * 1024) + MULTIPART_OVERHEAD_BYTES

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

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, _too_large_message(self.max_upload_mb))
            return message

        await self.app(scope, limited_receive, send)


def _decode(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    return image_to_array(open_image(data, max_pixels=max_pixels), size)  # no torch here: issue 8


async def read_image(upload: UploadFile, *, size: int, max_upload_mb: float, max_pixels: int) -> np.ndarray:
    """Check and decode the uploaded image in a worker thread; RGB uint8 (size, size, 3).

    Raises:
        HTTPException: 415 for a declared non-image type, 413 over the byte limit, 400 for an empty file.
        ImageDecodeError: undecodable (400) or not an image format at all (415).
        ImageTooLargeError: over ``max_pixels`` (413).
    """
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if not content_type.startswith("image/") and content_type not in GENERIC_CONTENT_TYPES:
        raise HTTPException(415, f"the upload's content type is {content_type!r}, not an image; send a JPEG, PNG, "
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
    return await asyncio.to_thread(_decode, data, size, max_pixels)
