"""Smoke tests of the research benchmarks behind `elgs bench` (tiny settings): each runs and reports sane figures."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from elgs.attacks.data import predict_labels
from elgs.cli import main
from elgs.images import SAMPLE_PHOTOS, image_to_tensor, sample_photo
from tests.api.helpers import LiveServer, tiny_settings
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def tiny_data():
    model = make_tiny_model()
    images = torch.stack([image_to_tensor(sample_photo(name), 32) for name in SAMPLE_PHOTOS[:8]])
    return model, images, predict_labels(model, images)


def test_flood_counts_every_request_and_probes(capsys):
    with LiveServer(tiny_settings(max_queue=2), [make_tiny_model()]) as server:
        assert main(["bench", "flood", "--url", server.url, "--requests", "12", "--path", "/defend/lgs?model=tiny",
                     "--probe-after-s", "0.2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sum(report["statuses"].values()) == 12 and set(report["statuses"]) <= {"200", "503"}
    assert report["statuses"].get("200", 0) >= 1 and report["probe"]["status"] in (200, 503)


@pytest.mark.slow
def test_placement_measures_in_a_fresh_process(capsys):
    from elgs.bench.placement import run_placements

    rows = run_placements(["main"], model="efficientnet_lite0", repeats=1, weights="random", input_size=64)
    assert [row["placement"] for row in rows] == ["main"] and rows[0]["median_ms"] > 0 and rows[0]["os_threads"] >= 1
    assert main(["bench", "placement", "--placements", "main,nowhere"]) == 2
    assert "--placements: choose from main, split" in capsys.readouterr().err


@pytest.mark.slow
def test_precision_of_float32_against_itself_agrees_everywhere():
    from elgs.bench.precision import run_precision

    rows = run_precision("efficientnet_lite0", ["float32"], device="cpu", weights="random", input_size=32,
                         photos=["chelsea", "coffee"])
    assert rows == [{"dtype": "float32", "original_agreement": 2, "defended_agreement": 2,
                     "max_probability_difference": 0.0, "ms_per_image": rows[0]["ms_per_image"], "differing": []}]


def test_estimators_at_lambda_zero_keep_every_clean_answer(tiny_data, tmp_path):
    from elgs.bench.estimators import run_estimator_benchmark

    model, images, labels = tiny_data
    patch = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    report = run_estimator_benchmark(model, images, labels, patch, 2, lam=0.0, estimators=["gradient"],
                                     quantiles=(1.0, 0.9), chunk=4, out=tmp_path / "estimators.json")
    lgs, gradient = report["rows"]
    assert lgs["clean_kept"] == 1.0  # lambda 0 is the identity and labels are the model's answers
    assert gradient["estimator"].startswith("gradient:") and gradient["pass1_ms_per_image"] > 0
    assert gradient["slgs"]["clean_kept"] == 1.0 and set(gradient["wlgs"]) == {"1.0", "0.9"}
    assert json.loads((tmp_path / "estimators.json").read_text())["rows"][1]["estimator"] == gradient["estimator"]


def test_saliency_probe_from_the_command_line(tmp_path, capsys):
    """EfficientNet-Lite0 (random weights, 64 px) on three images: the four losses, the stem and gradient x input."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        sample_photo(name).resize((64, 64)).save(data / f"{name}.png")
    Image.new("RGB", (16, 16), (250, 10, 10)).save(tmp_path / "patch.png")
    assert main(["bench", "saliency-probe", str(data), str(tmp_path / "patch.png"), "--weights", "random",
                 "--input-size", "64", "--device", "cpu", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 + 2 + 1 and lines[0].startswith("top-5 CE (DESIGN 2.3)")
    assert lines[4].startswith("patched: stem units clipped by ReLU6")
    for share in re.findall(r"(-?[\d.]+)%", "\n".join(lines)):
        assert 0 <= float(share) <= 100


def test_through_cost_times_each_setting(tiny_data, capsys):
    from elgs.bench.through_cost import run_through_cost

    model, images, labels = tiny_data
    medians = run_through_cost(model, images[:4], labels[:4], repeats=1, patch_size=8, target=2)
    assert list(medians)[:3] == ["no defence", "lgs", "slgs, gradient"] and len(medians) == 4
    assert all(seconds > 0 for seconds in medians.values())
    assert "1.0x" in capsys.readouterr().out.splitlines()[1]  # the plain step against itself
