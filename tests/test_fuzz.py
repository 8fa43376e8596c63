"""Schema-driven fuzz of the live API (issue 11): schemathesis draws requests from the app's own
``/openapi.json`` (valid and invalid parameters), the ``image`` part is swapped for a drawn upload
(mostly decodable images of many modes and formats, some truncated or not images at all), and every
answer must be no 5xx, a documented status and content type, and a body that fits its schema.

Bounded for CI: ``ELGS_FUZZ_EXAMPLES`` cases (default 150) from a fixed seed, so a failure reproduces.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from tests.api.helpers import LiveServer, tiny_settings
from tests.conftest import make_tiny_model

IMAGE_OPERATIONS = ("POST /classify", "POST /defend/{method}", "POST /saliency")
EXAMPLES = int(os.environ.get("ELGS_FUZZ_EXAMPLES", "150"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Pillow modes, and the formats that can store each.
MODES = {"RGB": ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"], "L": ["PNG", "JPEG", "GIF", "BMP", "TIFF"],
         "RGBA": ["PNG", "GIF", "TIFF", "WEBP"], "P": ["PNG", "GIF", "BMP", "TIFF"], "LA": ["PNG"],
         "I;16": ["PNG", "TIFF"], "CMYK": ["JPEG", "TIFF"], "1": ["PNG", "BMP", "GIF"], "F": ["TIFF"]}


@st.composite
def decodable_images(draw) -> bytes:
    """A small image of a random mode, size and format, with noise, maybe transparency or EXIF rotation."""
    mode = draw(st.sampled_from(list(MODES)))
    format = draw(st.sampled_from(MODES[mode]))
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(
        "RGB" if mode in ("RGB", "CMYK") else "L")
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) * 257))
    elif mode == "F":
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / 255.0)
    elif mode != image.mode:
        image = image.convert(mode)
    options = {}
    if mode == "P" and draw(st.booleans()):
        options["transparency"] = draw(st.integers(0, 255))
    if format in ("JPEG", "WEBP", "PNG", "TIFF") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))
        options["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def uploads() -> st.SearchStrategy[bytes]:
    """Mostly decodable images; some cut short, some random bytes, some empty."""
    truncated = decodable_images().flatmap(lambda data: st.integers(0, len(data)).map(lambda n: data[:n]))
    return st.one_of(decodable_images(), decodable_images(), decodable_images(), truncated,
                     st.binary(max_size=512))


def decodes(data: bytes) -> bool:
    """Whether Pillow reads ``data`` as a whole image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # noqa: BLE001 - any failure to read counts as "not an image" here
        return False
    return True


@dataclass(frozen=True)
class Answer:
    """One fuzzed call: the operation, the status, whether its upload was a readable image (None: no upload)."""

    operation: str
    status: int
    readable: bool | None


def fuzz(url: str, examples: int) -> list[Answer]:
    """Send ``examples`` drawn requests to the server at ``url`` and check each answer; what was asked and answered."""
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json", timeout=10).json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} >= {*IMAGE_OPERATIONS, "GET /models"}
    cases = st.one_of([operation.as_strategy(generation_mode=mode) for operation in operations
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    answers: list[Answer] = []

    @given(case=cases, upload=uploads())
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case, upload):
        readable = None
        if isinstance(case.body, dict) and "image" in case.body:
            case.body["image"], readable = upload, decodes(upload)
        response = case.call(base_url=url)
        answers.append(Answer(case.operation.label, response.status_code, readable))
        case.validate_response(response, checks=CHECKS)

    check()
    return answers


def test_fuzz_the_api_from_its_own_openapi():
    with LiveServer(tiny_settings(max_upload_mb=1, max_pixels=100_000), [make_tiny_model()]) as server:
        answers = fuzz(server.url, EXAMPLES)
    seen = Counter((answer.operation, answer.status) for answer in answers)
    print("fuzz answers:", dict(sorted(seen.items())))
    # Every image endpoint got drawn images through to the model...
    for operation in IMAGE_OPERATIONS:
        assert seen[operation, 200] > 0, f"no drawn request reached the model through {operation}"
    # ...never answered from an upload that is not a readable image...
    unreadable = [answer for answer in answers if answer.readable is False]
    assert unreadable and all(answer.status != 200 for answer in unreadable)
    # ...and refused both ways: an undecodable upload (400) and a bad parameter (422).
    statuses = {answer.status for answer in answers}
    assert {400, 422} <= statuses, statuses


class _Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("broken")


def test_the_fuzz_reports_a_server_error():
    model = make_tiny_model()
    model.module = _Broken()
    with LiveServer(tiny_settings(warmup=False), [model]) as server, pytest.raises(FailureGroup, match="Server error"):
        fuzz(server.url, 30)
