import io

import numpy as np
import pytest
import torch
from PIL import Image

from elgs.images import ImageDecodeError, ImageTooLargeError, encode_png, image_to_tensor, open_image


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_modes_convert_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert open_image(_bytes(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert open_image(_bytes(sixteen, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert open_image(_bytes(cmyk, "JPEG")).mode == "RGB"
    assert open_image(_bytes(Image.new("L", (4, 4), 128), "PNG")).getpixel((0, 0)) == (128, 128, 128)
    assert open_image(_bytes(Image.new("P", (4, 4)), "GIF")).mode == "RGB"


def test_exif_orientation_applied():
    image = Image.new("RGB", (6, 3), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = open_image(_bytes(image, "JPEG", exif=exif))
    assert rotated.size == (3, 6)


def test_limits_and_errors():
    with pytest.raises(ImageDecodeError):
        open_image(b"hello")
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        open_image(_bytes(Image.new("RGB", (100, 100)), "PNG"), max_pixels=9_999)
    with pytest.raises(FileNotFoundError, match="no sample photo"):
        open_image("skimage:not_a_photo")


def test_tensor_round_trip():
    x = image_to_tensor(Image.new("RGB", (10, 20), (255, 0, 51)), 8)
    assert x.shape == (3, 8, 8) and torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    decoded = Image.open(io.BytesIO(encode_png(x)))
    assert decoded.size == (8, 8) and decoded.getpixel((0, 0)) == (255, 0, 51)
    assert Image.open(io.BytesIO(encode_png(torch.zeros(1, 8, 8)))).mode == "L"
