"""Bad and odd uploads, one request per test against one running server, which must keep answering."""


import httpx
import numpy as np
import pytest
from PIL import Image

from elgs.images import sample_photo
from tests.api.helpers import LiveServer, encode, photo_png, png_header_only, tiny_settings
from tests.conftest import make_tiny_model

MAX_UPLOAD_MB = 0.25
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server():
    settings = tiny_settings(max_upload_mb=MAX_UPLOAD_MB, max_pixels=MAX_PIXELS)
    with LiveServer(settings, [make_tiny_model()]) as server:
        yield server


@pytest.fixture
def post(server):
    """POST to the server, then check that it still answers a good request normally."""
    with httpx.Client(base_url=server.url, timeout=20) as client:
        def send(path="/defend/slgs", **kwargs):
            return client.post(path, **kwargs)

        yield send
        check = client.post("/defend/slgs", files={"image": ("cat.png", photo_png(), "image/png")})
        assert check.status_code == 200 and len(check.json()["predictions"]) == 5



def _photo(size=64) -> Image.Image:
    image = sample_photo("chelsea")
    image.thumbnail((size, size))
    return image


def _file(data: bytes, name="upload.png", content_type="image/png"):
    return {"image": (name, data, content_type)}


def _check_error(response: httpx.Response, status: int, *phrases: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and all(p in detail for p in phrases), detail


def test_empty_upload(post):
    _check_error(post(files=_file(b"")), 400, "empty")


def test_wrong_field_name(post):
    _check_error(post(files={"file": ("cat.png", photo_png(), "image/png")}), 422, "missing form field 'image'",
                 "curl -F image=@")


def test_no_multipart_at_all(post):
    _check_error(post(content=photo_png(), headers={"Content-Type": "image/png"}), 422, "field 'image'")


def test_text_file(post):
    _check_error(post(files=_file(b"just some notes\n", "notes.txt", "text/plain")), 415, "text/plain", "not an image")


def test_text_bytes_declared_as_octet_stream(post):
    _check_error(post(files=_file(b"just some notes\n", "notes", "application/octet-stream")), 415,
                 "not in an image format")


def test_truncated_jpeg(post):
    jpeg = encode(_photo(256), "JPEG", quality=90)
    _check_error(post(files=_file(jpeg[: len(jpeg) // 2], "cut.jpg", "image/jpeg")), 400, "truncated")


def test_png_declaring_30000_by_30000_pixels(post):
    _check_error(post(files=_file(png_header_only(30000, 30000), "bomb.png")), 413, "pixels")


def test_image_over_max_pixels(post):
    flat = encode(Image.new("RGB", (1200, 1000), (120, 30, 200)))  # compresses to a few KiB
    _check_error(post(files=_file(flat)), 413, "1200x1000", "over the limit of 1000000", "ELGS_MAX_PIXELS")


def test_upload_over_the_byte_limit(post):
    noise = np.random.default_rng(0).integers(0, 256, size=int(MAX_UPLOAD_MB * 1024 * 1024 * 2), dtype=np.uint8)
    _check_error(post(files=_file(noise.tobytes())), 413, f"{MAX_UPLOAD_MB:g} MiB")


def test_file_just_over_the_byte_limit_inside_the_multipart_allowance(post):
    data = b"\0" * (int(MAX_UPLOAD_MB * 1024 * 1024) + 1000)
    _check_error(post(files=_file(data)), 413, f"{MAX_UPLOAD_MB:g} MiB")


def test_streamed_upload_over_the_byte_limit_without_content_length(post):
    boundary = "elgsboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(12):
            yield b"\0" * 64 * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    response = post(content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    _check_error(response, 413, "MiB")


ODD_IMAGES = {
    "gif": lambda: encode(_photo().convert("P"), "GIF"),
    "animated_gif": lambda: encode(_photo().convert("P"), "GIF", save_all=True,
                                   append_images=[_photo().rotate(90).convert("P")], duration=100, loop=0),
    "png_16bit": lambda: encode(Image.fromarray(
        (np.asarray(_photo().convert("L"), dtype=np.uint16) * 257).astype(np.uint16))),
    "cmyk_jpeg": lambda: encode(_photo().convert("CMYK"), "JPEG"),
    "grayscale": lambda: encode(_photo().convert("L")),
    "rgba": lambda: encode(_photo().convert("RGBA")),
    "palette_with_transparency": lambda: encode(_photo().convert("P"), "PNG", transparency=0),
    "webp": lambda: encode(_photo(), "WEBP"),
}


@pytest.mark.parametrize("kind", list(ODD_IMAGES))
def test_odd_but_valid_images_work(post, kind):
    response = post(files=_file(ODD_IMAGES[kind](), f"odd.{kind}", "application/octet-stream"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 5 and len(body["original_predictions"]) == 5


def test_exif_orientation_is_applied(post):
    upright = _photo(64)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored_sideways = encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    sideways = post("/classify", files=_file(stored_sideways)).json()
    straight = post("/classify", files=_file(encode(upright))).json()
    assert sideways["predictions"] == straight["predictions"]


@pytest.mark.parametrize("value", ["-1", "11", "NaN", "abc", "inf"])
def test_bad_lambda(post, value):
    _check_error(post(params={"lambda": value}, files=_file(photo_png())), 422, "'lambda'", repr(value),
                 "a number from 0 to 10")


def test_bad_threshold(post):
    _check_error(post(params={"threshold": "1.5"}, files=_file(photo_png())), 422, "'threshold'")


def test_unknown_method(post):
    _check_error(post("/defend/lgss", files=_file(photo_png())), 404, "unknown defence 'lgss'", "slgs")


def test_unknown_model(post):
    _check_error(post(params={"model": "resnet50"}, files=_file(photo_png())), 404, "'resnet50' is not loaded",
                 "loaded: tiny")


def test_image_field_sent_as_text(post):
    _check_error(post(data={"image": "cat.png"}), 422, "must be a file upload")
