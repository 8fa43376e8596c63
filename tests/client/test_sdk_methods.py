"""Every SDK method against the real app (tiny CNN): results equal the engine's, for every input kind,
sync and async alike, and each documented error arrives as its typed exception."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from elgs.defenses import DEFENSES
from elgs.engine import Engine, Request
from elgs.images import image_to_tensor, open_image, tensor_to_image
from elgs_client import (
    BadRequestError,
    ClassifyResult,
    DefendResult,
    NotFoundError,
    PayloadTooLargeError,
    SaliencyResult,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
)
from tests.client.servers import async_client_for
from tests.conftest import make_tiny_model


def engine_result(photo_png: bytes, **request):
    model = make_tiny_model()  # same seed as the served one
    image = image_to_tensor(open_image(photo_png), model.input_size)
    (result,) = Engine(model).run([Request(image=image, **request)])
    return result


def assert_same_predictions(sdk_predictions, engine_predictions):
    assert [p.index for p in sdk_predictions] == [p.index for p in engine_predictions]
    assert [p.label for p in sdk_predictions] == [p.label for p in engine_predictions]
    np.testing.assert_allclose([p.score for p in sdk_predictions], [p.score for p in engine_predictions],
                               rtol=1e-5, atol=1e-7)


def test_health_models_defenses(sync_client):
    health = sync_client.health()
    assert health.ready and health.status == "ready" and health.models == ["tiny"]
    assert sync_client.health(ready=False).status == "alive"
    (model,) = sync_client.models()
    assert (model.name, model.input_size, model.weights, model.default, model.max_batch_size) == \
        ("tiny", 32, "random", True, 4)
    assert model.default_lambda == 3.5
    defenses = sync_client.defenses()
    assert [d.name for d in defenses] == list(DEFENSES)
    slgs = next(d for d in defenses if d.name == "slgs")
    assert slgs.needs_saliency and slgs.parameters["lambda"].maximum == 10
    assert slgs.parameters["threshold"].default == pytest.approx(0.2)


def test_classify_equals_the_engine(sync_client, photo_png):
    result = sync_client.classify(photo_png)
    assert isinstance(result, ClassifyResult)
    assert (result.model, result.weights, result.batch_size) == ("tiny", "random", 1)
    assert_same_predictions(result.predictions, engine_result(photo_png, task="classify").predictions)
    assert result.top1 == result.predictions[0] and "total" in result.timing_ms


@pytest.mark.parametrize("method", list(DEFENSES))
def test_defend_equals_the_engine(sync_client, photo_png, method, tmp_path):
    result = sync_client.defend(photo_png, method=method, lam=2.0, threshold=0.3)
    expected = engine_result(photo_png, task="defend", method=method, lam=2.0, threshold=0.3)
    assert isinstance(result, DefendResult) and result.method == method
    assert (result.lam, result.threshold) == (expected.lam, expected.threshold)
    assert_same_predictions(result.predictions, expected.defended_predictions)
    assert_same_predictions(result.original_predictions, expected.predictions)
    assert result.image.mode == "RGB" and result.image.size == (32, 32)
    assert result.mask.mode == "L" and result.mask.size == (32, 32)
    difference = np.abs(np.asarray(result.image, dtype=int) - np.asarray(tensor_to_image(expected.image), dtype=int))
    assert difference.max() <= 1
    written = result.save(tmp_path / "out")
    assert written == {"image": tmp_path / "out" / f"{method}.png", "mask": tmp_path / "out" / f"{method}_mask.png"}
    assert written["image"].read_bytes() == result.image_png and written["mask"].read_bytes() == result.mask_png
    assert np.array_equal(np.asarray(Image.open(written["mask"])), np.asarray(result.mask))


def test_defend_defaults_come_from_the_server(sync_client, photo_png):
    result = sync_client.defend(photo_png)
    assert (result.method, result.lam, result.threshold) == ("slgs", 3.5, pytest.approx(0.2))
    assert sync_client.defend(photo_png, method="jpeg").lam is None


def test_defend_auto_reports_its_path_and_stages(sync_client, photo_png):
    result = sync_client.defend(photo_png, method="auto", saliency="gradient", attack_threshold=0.0)
    expected = engine_result(photo_png, task="defend", method="auto", saliency="gradient", attack_threshold=0.0)
    assert result.method == "auto" and result.path == expected.path in ("screen", "strong")
    assert [stage.method for stage in result.stages] == [stage.method for stage in expected.stages]
    assert result.stages[0].method == "lgs" and result.stages[0].top1.index == expected.stages[0].predictions[0].index
    assert result.attacked is expected.attacked
    assert_same_predictions(result.final_predictions, expected.final_predictions)
    assert any(d.name == "auto" and d.cascade == {"screen": "lgs", "strong": "slgs"} for d in sync_client.defenses())


def test_saliency(sync_client, photo_png, tmp_path):
    result = sync_client.saliency(photo_png)
    expected = engine_result(photo_png, task="saliency")
    assert isinstance(result, SaliencyResult)
    assert_same_predictions(result.predictions, expected.predictions)
    assert result.saliency.size == (32, 32) and result.region.mode == "L"
    region = np.asarray(result.region)
    assert set(np.unique(region)) <= {0, 255}
    assert np.array_equal(region > 127, expected.region[0].numpy() > 0.5)
    written = result.save(tmp_path)
    assert written["region"].read_bytes() == result.region_png and written["saliency"].name == "saliency.png"


def test_defend_saliency_and_attack_verdict_equal_the_engine(sync_client, photo_png):
    spec = "smoothgrad:n=3,rectify=true"
    result = sync_client.defend(photo_png, method="wlgs", lam=6.0, saliency=spec, attack_threshold=0.0)
    expected = engine_result(photo_png, task="defend", method="wlgs", lam=6.0, saliency=spec, attack_threshold=0.0)
    assert result.saliency_method == expected.saliency_method == "smoothgrad:n=3,sigma=0.2,rectify=true,seed=0,quantile=0.9"
    assert result.attack_score == pytest.approx(expected.attack_score, abs=1e-5) and result.attack_score > 0
    assert result.attack_threshold == 0 and result.attacked is expected.attacked is not None
    assert_same_predictions(result.final_predictions, expected.final_predictions)
    assert result.final_top1 == (result.removal_top1 if result.attacked else result.original_predictions[0])
    assert [stage.method for stage in result.stages] == ["wlgs"] and result.stages[0].attack_score == result.attack_score
    assert result.removal_top1.index == expected.removal_prediction.index
    kept = sync_client.defend(photo_png, method="lgs", attack_threshold=2.0)
    assert kept.attacked is False and kept.final_predictions == kept.original_predictions
    assert kept.saliency_method is None
    uncalibrated = sync_client.defend(photo_png, method="lgs")
    changed = uncalibrated.predictions[0].index != uncalibrated.original_predictions[0].index
    assert uncalibrated.attacked is (None if changed else False)  # random weights: no threshold
    assert uncalibrated.final_predictions == (uncalibrated.predictions if changed else uncalibrated.original_predictions)
    saliency = sync_client.saliency(photo_png, saliency=spec)
    assert saliency.saliency_method == result.saliency_method
    assert sync_client.models()[0].default_saliency == "gradient"
    with pytest.raises(UnprocessableEntityError, match="unknown saliency estimator 'nope'"):
        sync_client.defend(photo_png, method="slgs", saliency="nope")


def _input_kinds(photo_png: bytes, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(photo_png)
    return {
        "path": path,
        "str path": str(path),
        "bytes": photo_png,
        "bytearray": bytearray(photo_png),
        "memoryview": memoryview(photo_png),
        "file object": io.BytesIO(photo_png),
        "open file": open(path, "rb"),  # noqa: SIM115 - closed below
        "PIL image": Image.open(io.BytesIO(photo_png)),
    }


def test_every_input_kind_gives_the_same_result(sync_client, photo_png, tmp_path):
    kinds = _input_kinds(photo_png, tmp_path)
    try:
        results = {kind: sync_client.defend(image, method="wlgs").model_dump(exclude={"timing_ms"})
                   for kind, image in kinds.items()}
    finally:
        kinds["open file"].close()
    reference = results.pop("path")
    for kind, result in results.items():
        assert result == reference, kind


def test_bad_inputs_fail_before_sending(sync_client, tmp_path, photo_png):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        sync_client.classify(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="int"):
        sync_client.classify(42)
    (tmp_path / "text.txt").write_text("hello")
    with open(tmp_path / "text.txt") as text_file, pytest.raises(TypeError, match="binary mode"):
        sync_client.classify(text_file)
    with pytest.raises(ValueError, match="method"):
        sync_client.defend(photo_png, method="../models")


def test_errors_are_typed_with_the_servers_detail(make_service, photo_png):
    from fastapi.testclient import TestClient

    from elgs_client import Client

    service = make_service(max_pixels=32 * 32)
    with TestClient(service.app) as http:
        client = Client("http://testserver", http_client=http, max_retries=0)
        small = io.BytesIO()
        Image.new("RGB", (20, 20), (200, 10, 10)).save(small, format="PNG")
        cases = [
            (lambda: client.defend(small.getvalue(), method="nope"), NotFoundError, 404, "unknown defence 'nope'"),
            (lambda: client.classify(small.getvalue(), model="vgg99"), NotFoundError, 404, "vgg99"),
            (lambda: client.defend(small.getvalue(), lam=11), UnprocessableEntityError, 422, "lambda"),
            (lambda: client.defend(small.getvalue(), threshold=-1), UnprocessableEntityError, 422, "threshold"),
            (lambda: client.classify(b"plain text, not an image"), UnsupportedMediaTypeError, 415, "image format"),
            (lambda: client.classify(small.getvalue()[:60]), BadRequestError, 400, "could not be decoded"),
            (lambda: client.classify(photo_png), PayloadTooLargeError, 413, "90x60"),
        ]
        for call, error_type, status, detail in cases:
            with pytest.raises(error_type) as caught:
                call()
            assert caught.value.status_code == status and detail in caught.value.detail
            assert caught.value.response.status_code == status and str(status) in str(caught.value)


async def test_async_gives_the_same_results_as_sync(sync_client, async_client, photo_png):
    assert (await async_client.health()).ready
    assert await async_client.models() == sync_client.models()
    assert await async_client.defenses() == sync_client.defenses()
    pairs = [
        (await async_client.classify(photo_png), sync_client.classify(photo_png)),
        (await async_client.saliency(photo_png), sync_client.saliency(photo_png)),
    ]
    for method in ("lgs", "slgs", "wlgs", "median"):
        pairs.append((await async_client.defend(photo_png, method=method, lam=1.5),
                      sync_client.defend(photo_png, method=method, lam=1.5)))
    for from_async, from_sync in pairs:
        assert type(from_async) is type(from_sync)
        assert from_async.model_dump(exclude={"timing_ms"}) == from_sync.model_dump(exclude={"timing_ms"})
    with pytest.raises(NotFoundError):
        await async_client.defend(photo_png, method="nope")


async def test_async_client_takes_every_input_kind(service, photo_png, tmp_path):
    kinds = _input_kinds(photo_png, tmp_path)
    async with async_client_for(service.app) as client:
        try:
            results = [(await client.classify(image)).predictions for image in kinds.values()]
        finally:
            kinds["open file"].close()
    assert all(predictions == results[0] for predictions in results)
