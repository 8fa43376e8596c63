"""benchmarks/service_robustness.py against a live tiny-model server: the HTTP figures equal `attack eval`'s."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elgs.attacks.data import predict_labels
from elgs.attacks.evaluate import PatchSpec, evaluate
from elgs.attacks.train import AttackConfig, save_patch, train_patch
from elgs.images import SAMPLE_PHOTOS, image_to_tensor, sample_photo
from elgs.thresholds import AttackThresholds, ThresholdEntry, write_calibration
from tests.api.helpers import LiveServer, tiny_settings
from tests.conftest import make_tiny_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "service_robustness.py"


@pytest.fixture(scope="module")
def robustness():
    spec = importlib.util.spec_from_file_location("service_robustness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paste_puts_the_patch_at_the_test_placement(robustness):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    patch = np.full((10, 10, 3), 200, dtype=np.uint8)
    pasted = robustness.paste(image, patch)
    assert image.max() == 0  # not modified in place
    assert (pasted[10:20, 12:22] == 200).all() and pasted.sum() == 200 * 300  # top 10, left 32 - 10 - 10


def test_figures_through_http_equal_the_in_process_evaluation(robustness, tmp_path):
    """A 10 px patch trained on 12 photographs (tiny CNN, 32 px), the other photographs held out."""
    model = make_tiny_model()
    photos = torch.stack([image_to_tensor(sample_photo(name), 32) for name in SAMPLE_PHOTOS])
    config = AttackConfig(attack="lavan", target=2, patch_size=10, image_size=32, epochs=2, batches_per_epoch=15,
                          batch_size=8, optimizer="adam", lr=0.3, seed=0)
    save_patch(train_patch(model, (photos[:12], predict_labels(model, photos[:12])), config, progress=False),
               tmp_path / "patch.png", model)
    data = tmp_path / "heldout"
    data.mkdir()
    for name, image in zip(SAMPLE_PHOTOS[12:], photos[12:]):
        encode = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(encode).save(data / f"{name}.png")
    out, decided = tmp_path / "robustness.json", tmp_path / "decided.json"
    calibration = write_calibration(tmp_path / "calibration.json", AttackThresholds(
        model="tiny", input_size=32, fpr=0.05, images=6, data="test",
        entries=(ThresholdEntry(method="lgs", lam=3.5, saliency=None, threshold=0.3),)))
    arguments = ["--data", str(data), "--patch", str(tmp_path / "patch.png"), "--model", "tiny", "--methods",
                 "none,lgs", "--lambda", "3.5", "--workers", "4"]
    with LiveServer(tiny_settings(), [make_tiny_model()]) as server:
        code = robustness.main(["--url", server.url, *arguments, "--json", str(out)])
        robustness.main(["--url", server.url, *arguments, "--json", str(decided), "--thresholds", str(calibration)])
    report = json.loads(out.read_text())
    # Decided afterwards at the calibration file's threshold, with the engine's rule (the service had none).
    lgs = json.loads(decided.read_text())["rows"]["lgs"]
    per_image = lgs["per_image"]
    assert lgs["attack_threshold"] == 0.3 and "afterwards" in lgs["decided_by"]
    assert per_image["attacked"] == [score > 0.3 for score in per_image["score"]]
    assert per_image["final"] == [d if a else o for o, d, a in zip(per_image["original"], per_image["defended"],
                                                                   per_image["attacked"])]
    assert lgs["clean_flagged"] == pytest.approx(np.mean(per_image["attacked"][: len(per_image["labels"])]))
    assert report["rows"]["lgs"]["decided_by"] == "service"
    assert code == (0 if all(check["pass"] for check in report["checks"]) else 1)
    names = sorted(p.name for p in data.iterdir() if p.suffix == ".png")
    images = torch.stack([image_to_tensor(Image.open(data / name), 32) for name in names])
    expected = evaluate(model, (images, predict_labels(model, images)), [PatchSpec.load(tmp_path / "patch.png")],
                        methods=["none", "lgs"], lambdas=[3.5], batch_size=4, progress=False)
    for row in expected["rows"]:
        http = report["rows"][row["method"]]
        attack = next(iter(row["attacks"].values()))
        assert http["clean_accuracy"] == pytest.approx(row["clean_accuracy"])
        assert http["patched_accuracy"] == pytest.approx(attack["accuracy"])
        assert http["undefended_success_rate"] == pytest.approx(attack["undefended_success_rate"])
        assert http["restored_rate"] == pytest.approx(attack["restored_rate"])
        assert http["auroc"] == pytest.approx(attack["auroc"], abs=1e-6)
        assert http["final_clean_accuracy"] == pytest.approx(row["clean_final_accuracy"])
        assert http["final_patched_accuracy"] == pytest.approx(attack["final_accuracy"])
        assert http["clean_flagged"] is None and http["attack_threshold"] is None  # random weights: uncalibrated
    assert report["rows"]["none"]["auroc"] == 0.5
    assert report["rows"]["none"]["fooled"] >= 3  # the patch works, so restored rates are measured
    assert report["rows"]["lgs"]["auroc_fooled"] is not None
