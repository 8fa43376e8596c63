"""Endpoints in-process (TestClient) with the tiny CNN: JSON shapes, PNG answers, auth, metrics, OpenAPI."""

import base64
import io
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from elgs.api import create_app
from elgs.defenses import DEFENSES
from elgs.images import encode_png
from tests.api.helpers import photo_png, tiny_settings
from tests.conftest import make_tiny_model, patched_photo

CAT = photo_png("chelsea")
ASTRONAUT = photo_png("astronaut", None)
PATCHED = encode_png(patched_photo())  # 32x32: decoded as it is


def _ready(client: TestClient) -> TestClient:
    deadline = time.monotonic() + 10
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.01)
    return client


@pytest.fixture
def client():
    with TestClient(create_app(tiny_settings(), models=[make_tiny_model()])) as client:
        yield _ready(client)


def _upload(data=CAT, name="chelsea.png", content_type="image/png"):
    return {"image": (name, data, content_type)}


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_defend_json_has_both_top5_lists_image_mask_and_timing(client):
    response = client.post("/defend/slgs", params={"lambda": 3.5, "threshold": 0.25}, files=_upload())
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model", "weights", "method", "lambda", "threshold", "predictions", "original_predictions",
                         "image", "mask", "timing_ms", "batch_size", "saliency", "attack_score", "attack_threshold",
                         "attacked", "final_predictions", "removal_top1", "removal_score", "removal_threshold",
                         "stages", "path"}
    assert body["saliency"] == "gradient:rectify=false,quantile=1"  # the tiny model's default
    assert 0 <= body["attack_score"] <= 2
    # random weights are never calibrated: a changed top-1 is undecided (the caller gets the defended answer),
    # an unchanged one is not attacked whatever the threshold
    changed = body["predictions"][0]["index"] != body["original_predictions"][0]["index"]
    assert body["attack_threshold"] is None and body["attacked"] is (None if changed else False)
    assert body["final_predictions"] == (body["predictions"] if changed else body["original_predictions"])
    assert [stage["method"] for stage in body["stages"]] == ["slgs"] and body["path"] is None
    assert body["stages"][0]["attack_score"] == body["attack_score"] and body["removal_top1"]["label"]
    assert 0 <= body["removal_score"] <= 2 and body["removal_threshold"] is None  # not calibrated
    assert (body["model"], body["weights"], body["method"]) == ("tiny", "random", "slgs")
    assert (body["lambda"], body["threshold"]) == (3.5, 0.25)
    for key in ("predictions", "original_predictions"):
        assert len(body[key]) == 5 and set(body[key][0]) == {"index", "label", "score"}
        assert body[key][0]["label"] == f"class_{body[key][0]['index']}"
    image, mask = _png(body["image"]), _png(body["mask"])
    assert (image.size, image.mode, mask.size, mask.mode) == ((32, 32), "RGB", (32, 32), "L")
    assert body["batch_size"] == 1
    assert {"decode", "queue", "pass1", "defense", "pass2", "encode", "total"} <= set(body["timing_ms"])


def test_defend_uses_the_model_default_lambda_and_reports_none_for_baselines(client):
    assert client.post("/defend/lgs", files=_upload()).json()["lambda"] == 3.5
    body = client.post("/defend/median", files=_upload()).json()
    assert body["lambda"] is None and body["threshold"] is None
    assert _png(body["mask"]).getextrema() == (255, 255)  # whole-image filter: mask is all ones


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_defend_response_png_is_the_same_as_in_json(client, kind):
    as_json = client.post("/defend/wlgs", params={"lambda": 2.0}, files=_upload()).json()
    response = client.post("/defend/wlgs", params={"lambda": 2.0, "response": kind}, files=_upload())
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-elgs-model"] == "tiny" and response.headers["x-elgs-weights"] == "random"
    assert response.content == base64.b64decode(as_json[kind])


def test_classify_and_saliency(client):
    classified = client.post("/classify", files=_upload()).json()
    assert set(classified) == {"model", "weights", "predictions", "timing_ms", "batch_size"}
    defended = client.post("/defend/none", files=_upload()).json()
    assert classified["predictions"] == defended["original_predictions"] == defended["predictions"]
    saliency = client.post("/saliency", files=_upload()).json()
    assert saliency["predictions"] == classified["predictions"]
    region = _png(saliency["region"])
    assert region.size == (32, 32) and set(np.unique(np.asarray(region)).tolist()) <= {0, 255}
    assert _png(saliency["saliency"]).getextrema() == (0, 255)  # scaled for display


def test_models_and_defenses_list_defaults_and_ranges(client):
    models = client.get("/models").json()
    assert models["default"] == "tiny" and models["available"] == ["vgg16", "inception_v3", "efficientnet_lite0"]
    (tiny,) = models["models"]
    summary = (tiny["input_size"], tiny["default_lambda"], tiny["weights"], tiny["max_batch_size"])
    assert summary == (32, 3.5, "random", 4)
    defenses = {d["name"]: d for d in client.get("/defenses").json()["defenses"]}
    assert list(defenses) == list(DEFENSES)
    assert defenses["slgs"]["parameters"]["lambda"] == {"minimum": 0.0, "maximum": 10.0, "default": "per model"}
    assert defenses["slgs"]["needs_saliency"] and defenses["jpeg"]["parameters"] == {}


def test_defend_attack_threshold_decides_and_picks_final_predictions(client):
    patched = _upload(PATCHED, "patched.png")  # LGS 3.5 changes the tiny model's top-1 on it, and so does removing the suspect
    flagged = client.post("/defend/lgs", params={"lambda": 3.5, "attack_threshold": 0}, files=patched).json()
    assert flagged["predictions"][0]["index"] != flagged["original_predictions"][0]["index"]
    assert flagged["attack_score"] > 0 and flagged["attack_threshold"] == 0 and flagged["attacked"] is True
    assert flagged["final_predictions"][0] == flagged["removal_top1"]  # attacked: the suspect removed outright
    kept = client.post("/defend/lgs", params={"lambda": 3.5, "attack_threshold": 2}, files=patched).json()
    assert kept["attacked"] is False and kept["final_predictions"] == kept["original_predictions"]
    assert kept["attack_score"] == flagged["attack_score"]
    assert kept["saliency"] is None  # lgs uses no saliency
    unchanged = client.post("/defend/lgs", params={"lambda": 10, "attack_threshold": 0}, files=_upload()).json()
    assert unchanged["predictions"][0]["index"] == unchanged["original_predictions"][0]["index"]
    assert unchanged["attack_score"] > 0 and unchanged["attacked"] is False  # the answer kept: not attacked
    none = client.post("/defend/none", params={"attack_threshold": 0.5}, files=_upload()).json()
    assert none["attack_score"] == 0 and none["attacked"] is False


def test_defend_auto_screens_then_escalates_through_the_batcher(client):
    clean = client.post("/defend/auto", params={"attack_threshold": 0.5}, files=_upload()).json()
    assert clean["path"] == "screen" and [s["method"] for s in clean["stages"]] == ["lgs"]
    assert clean["attacked"] is False and clean["final_predictions"] == clean["original_predictions"]
    assert clean["saliency"] is None and clean["removal_top1"]["label"]  # the screen has the removal view too
    flagged = client.post("/defend/auto", params={"saliency": "gradient", "attack_threshold": 0},
                          files=_upload(ASTRONAUT, "astronaut.png")).json()
    assert flagged["path"] == "strong" and [s["method"] for s in flagged["stages"]] == ["lgs", "slgs"]
    assert flagged["stages"][0]["flagged"] is None  # random weights: the screen has no threshold, the change escalates
    assert flagged["saliency"] == "gradient:rectify=false,quantile=1" and flagged["stages"][1]["attack_threshold"] == 0
    slgs = client.post("/defend/slgs", params={"saliency": "gradient", "attack_threshold": 0},
                       files=_upload(ASTRONAUT, "astronaut.png")).json()
    assert flagged["attack_score"] == pytest.approx(slgs["attack_score"], abs=1e-5)
    assert flagged["final_predictions"] == slgs["final_predictions"] and flagged["attacked"] == slgs["attacked"]
    metrics = client.get("/metrics").text
    assert 'elgs_cascade_answers_total{attacked="false",method="auto",model="tiny",path="screen"} 1.0' in metrics
    verdict = {None: "unknown", True: "true", False: "false"}[flagged["attacked"]]
    assert f'elgs_cascade_answers_total{{attacked="{verdict}",method="auto",model="tiny",path="strong"}} 1.0' in metrics


@pytest.mark.parametrize("params, fragment", [
    ({"saliency": "blur"}, "unknown saliency estimator 'blur'"),
    ({"saliency": "smoothgrad:n=0"}, "n must be in [1, 32], got 0"),
    ({"saliency": "smoothgrad:sigma=abc"}, "sigma must be a number, got 'abc'"),
    ({"saliency": "gradient:n=4"}, "gradient has no parameter 'n'"),
    ({"saliency": "smoothgrad:rectify=maybe"}, "rectify must be true or false, got 'maybe'"),
    ({"attack_threshold": 2.5}, "attack_threshold"),
    ({"attack_threshold": "nan"}, "attack_threshold"),
])
def test_defend_bad_saliency_or_attack_threshold_is_422_naming_it(client, params, fragment):
    response = client.post("/defend/slgs", params=params, files=_upload())
    assert response.status_code == 422, response.text
    assert fragment in response.text


def test_saliency_parameter_on_defend_and_saliency_endpoints(client):
    spec = "smoothgrad:n=3,sigma=0.1"
    defended = client.post("/defend/wlgs", params={"saliency": spec}, files=_upload()).json()
    assert defended["saliency"] == "smoothgrad:n=3,sigma=0.1,rectify=false,seed=0,quantile=0.9"
    again = client.post("/defend/wlgs", params={"saliency": spec}, files=_upload()).json()
    assert again["image"] == defended["image"]  # seeded noise: the same request gives the same answer
    plain = client.post("/defend/wlgs", files=_upload()).json()
    assert plain["image"] != defended["image"]
    saliency = client.post("/saliency", params={"saliency": spec}, files=_upload()).json()
    assert saliency["saliency_method"] == defended["saliency"]
    assert client.post("/saliency", files=_upload()).json()["saliency_method"] == "gradient:rectify=false,quantile=1"
    assert client.post("/saliency", params={"saliency": "nope"}, files=_upload()).status_code == 422


def test_defenses_lists_saliency_estimators_with_defaults(client):
    body = client.get("/defenses").json()
    estimators = {e["name"]: e for e in body["saliency_estimators"]}
    assert list(estimators) == ["gradient", "smoothgrad"]
    smoothgrad = estimators["smoothgrad"]["parameters"]
    assert smoothgrad["n"] == {"type": "int", "default": 4, "minimum": 1, "maximum": 32,
                               "description": smoothgrad["n"]["description"]}
    assert smoothgrad["rectify"]["default"] is False and smoothgrad["sigma"]["default"] == 0.2
    assert client.get("/models").json()["models"][0]["default_saliency"] == "gradient"


def test_health_and_readiness(client):
    assert client.get("/health/live").json() == {"status": "alive", "models": []}
    assert client.get("/health/ready").json() == {"status": "ready", "models": ["tiny"]}


def test_ready_is_503_until_warm_up_is_done():
    app = create_app(tiny_settings(warmup=False), models=[make_tiny_model()])
    with TestClient(app) as client:
        assert client.get("/health/ready").status_code == 200
        app.state.service.runtimes["tiny"].ready = False
        response = client.get("/health/ready")
        assert response.status_code == 503 and response.json() == {"detail": "not ready: warming up tiny"}


def test_api_key_guards_everything_but_health_and_metrics():
    app = create_app(tiny_settings(api_key="s3cret"), models=[make_tiny_model()])
    with TestClient(app) as client:
        _ready(client)
        calls = [("post", "/defend/lgs", {"files": _upload()}), ("post", "/classify", {"files": _upload()}),
                 ("post", "/saliency", {"files": _upload()}), ("get", "/models", {}), ("get", "/defenses", {})]
        for method, path, kwargs in calls:
            missing = getattr(client, method)(path, **kwargs)
            assert missing.status_code == 401 and "missing API key" in missing.json()["detail"], path
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = getattr(client, method)(path, headers={"Authorization": "Bearer s3creT"}, **kwargs)
            assert wrong.status_code == 401
            assert wrong.json() == {"detail": "wrong API key in 'Authorization: Bearer <key>'"}
            right = getattr(client, method)(path, headers={"Authorization": "Bearer s3cret"}, **kwargs)
            assert right.status_code == 200, path
        for path in ("/health/live", "/health/ready", "/metrics", "/"):
            assert client.get(path).status_code == 200, path


def test_metrics_are_per_app_and_count_requests_batches_and_queue(client):
    client.post("/defend/slgs", files=_upload())
    client.post("/defend/nope", files=_upload())
    with TestClient(create_app(tiny_settings(), models=[make_tiny_model()])) as other:  # its own registry
        assert 'endpoint="/defend/slgs"' not in other.get("/metrics").text
    text = client.get("/metrics").text
    assert 'elgs_requests_total{endpoint="/defend/slgs",method="POST",status="200"} 1.0' in text
    assert 'elgs_requests_total{endpoint="/defend/{method}",method="POST",status="404"} 1.0' in text
    assert 'elgs_batch_size_count{model="tiny"} 1.0' in text
    assert 'elgs_queue_wait_seconds_count{model="tiny"} 1.0' in text
    assert 'elgs_model_pass_seconds_count{model="tiny"} 1.0' in text
    assert 'elgs_queue_depth{model="tiny"} 0.0' in text
    assert 'elgs_request_latency_seconds_count{endpoint="/defend/slgs"} 1.0' in text


def test_openapi_documents_parameters_ranges_and_errors(client):
    spec = client.get("/openapi.json").json()
    defend = spec["paths"]["/defend/{method}"]["post"]
    parameters = {p["name"]: p for p in defend["parameters"]}
    assert set(parameters) == {"method", "model", "lambda", "threshold", "saliency", "attack_threshold", "response"}
    assert all(p.get("description") for p in parameters.values())
    lam = parameters["lambda"]["schema"]["anyOf"][0]
    assert (lam["minimum"], lam["maximum"]) == (0.0, 10.0)
    assert {"200", "400", "401", "404", "413", "415", "422", "503", "504"} <= set(defend["responses"])
    assert "image/png" in defend["responses"]["200"]["content"]
    assert "slgs" in parameters["method"]["description"]
    assert client.get("/docs").status_code == 200


def test_web_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="image"' in page.text and "static/app.js" in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "defend/" in script.text


def test_unknown_route_and_method_use_the_detail_body(client):
    assert client.get("/nope").json() == {"detail": "Not Found"}
    assert client.get("/classify").status_code == 405
