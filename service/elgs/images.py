"""Image decoding, conversion to tensors and PNG encoding shared by the CLI, the API and the attacks."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

SAMPLE_PREFIX = "skimage:"
# scikit-image photographs that ship inside its wheel (no download needed).
SAMPLE_PHOTOS = (
    "chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "colorwheel", "camera", "coins", "clock", "moon", "brick", "grass", "gravel", "cat", "page", "text",
)


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode."""


class ImageTooLargeError(ValueError):
    """The image declares more pixels than allowed (decompression-bomb guard)."""


# EXIF orientation -> the transposition that undoes it (what ImageOps.exif_transpose applies).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Reduce while decoding only down to this many times the model's side (see decode_for_model).
REDUCING_GAP = 4
# Rows of a strip in the strip-wise reduction: about this many source pixels per strip.
_STRIP_PIXELS = 1 << 20


def _eight_bit_scale(image: Image.Image) -> float:
    """The divisor that maps a 16-bit or float image to [0, 1] (decided on the whole image, not a strip)."""
    if image.mode.startswith("I;16"):
        return 65535.0
    high = image.getextrema()[1] if image.mode in ("I", "F") else 255
    if image.mode == "I":
        return 65535.0 if high > 255 else 255.0
    if image.mode == "F":
        return 255.0 if high > 1.0 else 1.0
    return 255.0


def _to_8bit(image: Image.Image, scale: float | None = None) -> Image.Image:
    """16-bit and float grayscale modes scaled to 8-bit 'L' by their dtype's range."""
    scale = _eight_bit_scale(image) if scale is None else scale
    scaled = np.asarray(image).astype(np.float64) / scale
    return Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), mode="L")


def _pixels_to_rgb(image: Image.Image, scale: float | None = None, transparent: bool | None = None) -> Image.Image:
    """Any Pillow mode to RGB pixel by pixel (no orientation); transparency lands on white.

    ``scale`` and ``transparent`` let a strip of a larger image be converted as the whole image would be.
    """
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image, scale)
    if image.mode == "P":
        has_alpha = "transparency" in image.info if transparent is None else transparent
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except (ValueError, TypeError, SyntaxError, OSError):  # a corrupt EXIF block orients nothing
        return 1


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    return image.transpose(transpose) if transpose is not None else image


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any Pillow mode to RGB; transparency lands on white."""
    return _orient(_pixels_to_rgb(image), _orientation(image))


def reduced_rgb(image: Image.Image, factor: int) -> Image.Image:
    """RGB of ``image`` box-reduced by ``factor``, converted strip by strip (no orientation).

    Equal to ``_pixels_to_rgb(image).reduce(factor)`` (strips are a multiple of ``factor`` rows high),
    but a palette, 16-bit or transparent image is never converted whole: the extra memory is one
    strip of about 2**20 pixels, not 4 bytes per pixel of the full image.

    Args:
        image: a loaded image of any mode, (W, H).
        factor: integer reduction >= 1.

    Returns:
        RGB image of ``(ceil(W / factor), ceil(H / factor))``.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    width, height = image.size
    scale = _eight_bit_scale(image) if image.mode in _WIDE_MODES else None
    transparent = "transparency" in image.info
    rows = max(1, _STRIP_PIXELS // max(1, width * factor)) * factor
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        strip = _pixels_to_rgb(image.crop((0, top, width, min(height, top + rows))), scale, transparent)
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return out


def _bomb_error(error: Exception, max_pixels: int | None) -> ImageTooLargeError:
    """Pillow's decompression-bomb error reworded with our own limit (it quotes Pillow's)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{found.group(1)} pixels" if found else f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
    limit = f"the limit of {max_pixels} pixels (ELGS_MAX_PIXELS)" if max_pixels is not None else "Pillow's limit"
    return ImageTooLargeError(f"image is {size}, over {limit}")


def _open_checked(source: bytes | BinaryIO, max_pixels: int | None) -> Image.Image:
    """``Image.open`` and the pixel-limit check, before any pixel is decoded."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        image = Image.open(stream)
    except Image.DecompressionBombError as error:
        raise _bomb_error(error, max_pixels) from error
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (ELGS_MAX_PIXELS)"
        )
    return image


def _decoding_errors(function):
    """Map Pillow's decoding failures to :class:`ImageDecodeError` (keeping :class:`ImageTooLargeError`)."""
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ImageTooLargeError:
            raise
        except Image.DecompressionBombError as error:
            raise _bomb_error(error, kwargs.get("max_pixels")) from error
        except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as error:
            raise ImageDecodeError(f"cannot decode image: {error}") from error
    wrapped.__doc__, wrapped.__name__ = function.__doc__, function.__name__
    return wrapped


def open_image(source: str | os.PathLike | bytes | BinaryIO, *, max_pixels: int | None = None) -> Image.Image:
    """Decode an image from a path, bytes or a binary file into RGB at its full size.

    ``skimage:NAME`` names one of scikit-image's sample photographs (``skimage:chelsea``).

    Raises:
        FileNotFoundError: the path does not exist.
        ImageTooLargeError: more than ``max_pixels`` pixels declared.
        ImageDecodeError: not a decodable image.
    """
    if isinstance(source, str) and source.startswith(SAMPLE_PREFIX):
        return sample_photo(source[len(SAMPLE_PREFIX):])
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        source = path.read_bytes()
    return _open_rgb(source, max_pixels=max_pixels)


@_decoding_errors
def _open_rgb(source: bytes | BinaryIO, *, max_pixels: int | None) -> Image.Image:
    image = _open_checked(source, max_pixels)
    image.load()
    return to_rgb(image)


@_decoding_errors
def decode_for_model(source: bytes | BinaryIO, size: int, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an upload straight to the model's input: the whole image (no crop) at ``size x size``.

    The same as ``image_to_tensor(open_image(source), size)`` (as uint8, HWC) for images whose short
    side is under ``2 * REDUCING_GAP * size`` (8x the model's side). A larger image is reduced while it
    is decoded, so its cost stays bounded: a JPEG decodes at 1/2, 1/4 or 1/8 scale (``draft``), then
    any image is box-reduced by an integer factor, strip by strip, to no less than
    ``REDUCING_GAP * size`` on its short side, and only then resized bilinearly (Pillow's
    ``reducing_gap`` idea). Pixels then differ from the one-step resize of the full image by about
    0.2 levels in 255 on average and by a few levels at most, at the borders of a detailed
    photograph (a box filter then a bilinear one instead of one wide bilinear filter).

    Args:
        source: encoded image bytes or a binary file.
        size: the model's square input side.
        max_pixels: refuse images declaring more pixels (decompression bombs).

    Returns:
        RGB uint8 array of shape (size, size, 3); no torch object.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels declared.
        ImageDecodeError: not a decodable image.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    image = _open_checked(source, max_pixels)
    orientation = _orientation(image)
    if image.format == "JPEG" and min(image.size) >= 2 * REDUCING_GAP * size:
        # The largest DCT scale (1/2, 1/4, 1/8) that keeps at least REDUCING_GAP * size per side.
        image.draft("RGB", (REDUCING_GAP * size, REDUCING_GAP * size))
    image.load()
    width, height = image.size
    factor = min(width, height) // (REDUCING_GAP * size)
    if factor < 2:
        rgb = _orient(_pixels_to_rgb(image), orientation).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    reduced = reduced_rgb(image, factor)
    # The last box of a row or column covers fewer than ``factor`` pixels: resize exactly the
    # reduced extent of the image, as Pillow's ``reducing_gap`` does (after orienting both).
    box = _oriented_box((0.0, 0.0, width / factor, height / factor), reduced.size, orientation)
    rgb = _orient(reduced, orientation).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(rgb, dtype=np.uint8)


def _oriented_box(box: tuple[float, float, float, float], size: tuple[int, int],
                  orientation: int) -> tuple[float, float, float, float]:
    """Where ``box`` of an image of ``size`` lies once the image is transposed for ``orientation``."""
    x0, y0, x1, y1 = box
    w, h = size
    return {
        2: (w - x1, y0, w - x0, y1), 3: (w - x1, h - y1, w - x0, h - y0), 4: (x0, h - y1, x1, h - y0),
        5: (y0, x0, y1, x1), 6: (h - y1, x0, h - y0, x1), 7: (h - y1, w - x1, h - y0, w - x0),
        8: (y0, w - x1, y1, w - x0),
    }.get(orientation, box)


def sample_photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photographs (``chelsea``, ``coffee``, ``astronaut``, ...) as RGB."""
    from skimage import data

    if name not in SAMPLE_PHOTOS:
        raise FileNotFoundError(f"no sample photo {name!r}; choose one of {', '.join(SAMPLE_PHOTOS)}")
    array = np.asarray(getattr(data, name)())
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64) / max(1.0, float(array.max())), 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(array[..., :3], mode="RGB")


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """An RGB uint8 image array (S, S, 3) -> a float32 tensor (3, S, S) in [0, 1].

    The service calls this in the model's compute thread: decoding ends in NumPy, and every torch
    op of a model runs in one thread (see :mod:`elgs.batcher`).
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {type(array).__name__} "
                         f"{getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}")
    if not array.flags.writeable or not array.flags.c_contiguous:  # torch.from_numpy wants a writable buffer
        array = np.array(array, order="C")
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def image_to_array(image: Image.Image, size: int) -> np.ndarray:
    """Resize the whole RGB image (no crop) to ``size x size`` with bilinear; uint8 (size, size, 3)."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the whole RGB image (no crop) to ``size x size`` with bilinear; (3, size, size) in [0, 1]."""
    return array_to_tensor(image_to_array(image, size))


def tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) or (H, W) in [0, 1] -> uint8 (H, W, 3) or (H, W), rounded to nearest.

    The service calls this in the model's compute thread, so the threads that encode PNGs touch
    NumPy only.
    """
    tensor = tensor.detach().float().cpu().clamp(0, 1)
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim not in (2, 3) or (tensor.ndim == 3 and tensor.shape[0] != 3):
        raise ValueError(f"expected (3, H, W), (1, H, W) or (H, W), got {tuple(tensor.shape)}")
    array = (tensor * 255).round().to(torch.uint8)
    return (array.permute(1, 2, 0) if array.ndim == 3 else array).contiguous().numpy()


def array_to_image(array: np.ndarray) -> Image.Image:
    """uint8 (H, W, 3) -> RGB, uint8 (H, W) -> L Pillow image."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected uint8 (H, W, 3) or (H, W), got {array.dtype} {array.shape}")
    return Image.fromarray(array, mode="RGB" if array.ndim == 3 else "L")


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, H, W) or (H, W) in [0, 1] -> an 8-bit RGB or L Pillow image."""
    return array_to_image(tensor_to_array(tensor))


def encode_png(image: torch.Tensor | np.ndarray) -> bytes:
    """PNG bytes of a tensor accepted by :func:`tensor_to_array` or a uint8 array accepted by
    :func:`array_to_image` (the array path runs no torch op).

    zlib level 1: for a 224x224 photograph it encodes about 4x faster than Pillow's default level 6
    for about 7% more bytes, which matters when every response carries two PNGs.
    """
    array = image if isinstance(image, np.ndarray) else tensor_to_array(image)
    buffer = io.BytesIO()
    array_to_image(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
