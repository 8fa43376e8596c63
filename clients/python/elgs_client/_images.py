"""Turning the SDK's image inputs into an upload, and the service's base64 PNGs back into images.

Pillow is optional: it is imported only to encode a PIL input (which means it is installed) or to
decode a result into a PIL image (``pip install "elgs-client[images]"``).
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], "PILImage.Image"]
"""A path, raw encoded bytes, a binary file object, or a PIL image."""

# Magic numbers of the formats Pillow decodes most often, so bytes and unnamed files get a real type.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def _is_pil_image(value: Any) -> bool:
    # Duck-typed so that Pillow is not imported unless the caller already uses it.
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "mode")


def sniff_content_type(data: bytes, filename: str | None = None) -> str:
    """The image MIME type from the leading bytes, else from the file name, else ``application/octet-stream``."""
    for signature, content_type in _SIGNATURES:
        if data.startswith(signature):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed = mimetypes.guess_type(filename)[0] if filename else None
    return guessed or "application/octet-stream"


def to_upload(image: ImageInput) -> tuple[str, bytes, str]:
    """``(filename, bytes, content_type)`` for the multipart field ``image``.

    The bytes are read once, so a retried request sends the same upload.

    Raises:
        FileNotFoundError: a path that does not exist.
        TypeError: an input of another type.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        data = path.read_bytes()
        return path.name, data, sniff_content_type(data, path.name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return "image", data, sniff_content_type(data)
    if _is_pil_image(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"file objects must be opened in binary mode ('rb'), got {type(data).__name__} from read()")
        name = os.path.basename(str(getattr(image, "name", "") or "")) or "image"
        return name, bytes(data), sniff_content_type(bytes(data), name)
    raise TypeError(
        f"image must be a path, bytes, a binary file object or a PIL image, got {type(image).__name__}"
    )


def decode_base64(data: str) -> bytes:
    """Bytes of a base64 field; a ``data:image/png;base64,`` prefix is accepted."""
    if data.startswith("data:"):
        data = data.split(",", 1)[1]
    return base64.b64decode(data)


def png_to_pil(png: bytes) -> PILImage.Image:
    """Decode PNG bytes to a loaded PIL image.

    Raises:
        ImportError: Pillow is not installed.
    """
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - exercised only without Pillow
        raise ImportError(
            'decoding results to PIL images needs Pillow: pip install "elgs-client[images]" '
            "(the raw PNG bytes are available without it, e.g. result.image_png)"
        ) from error
    image = Image.open(io.BytesIO(png))
    image.load()
    return image
