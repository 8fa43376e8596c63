"""Evaluation through the engine, the saliency-overlap finding, and a small attack-then-defend pipeline."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from elgs.attacks.data import predict_labels
from elgs.attacks.evaluate import (
    PatchSpec,
    evaluate,
    format_table,
    mean_ssim,
    plot_accuracy,
    rethreshold,
    run_engine,
    saliency_overlap,
    settings,
    write_report,
)
from elgs.attacks.metrics import auroc
from elgs.attacks.patches import apply_patch, fixed_positions, square_mask
from elgs.attacks.train import AttackConfig, save_patch, train_patch
from elgs.engine import Engine, Request
from elgs.images import SAMPLE_PHOTOS, image_to_tensor, sample_photo
from elgs.thresholds import REMOVAL_VIEW, AttackThresholds, ThresholdEntry

from tests.compare import nested_close


def test_settings_expand_lambdas_only_where_used():
    assert settings(["none", "lgs", "jpeg"], [1.0, 2.0]) == [("none", None), ("lgs", 1.0), ("lgs", 2.0),
                                                             ("jpeg", None)]


def test_mean_ssim_of_identical_images_is_one_and_drops_with_noise(photos):
    images = torch.stack(list(photos.values())[:3])
    assert mean_ssim(images, images) == pytest.approx(1.0)
    noisy = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert mean_ssim(images, noisy) < 0.9


def test_saliency_overlap_by_hand():
    # S = 1 on rows/cols 4..11 of a 16x16 map: mean 0.25, so the binary map is that 8x8 square; two
    # erosions leave rows/cols 6..9 and three dilations give rows/cols 3..12 (100 pixels). The 8x8 patch
    # at the top-left corner (rows/cols 0..7) shares rows/cols 3..7 with it: 25 pixels.
    saliency = torch.zeros(1, 16, 16)
    saliency[:, 4:12, 4:12] = 1.0
    patch = torch.zeros(1, 1, 16, 16)
    patch[..., :8, :8] = 1.0
    overlap = saliency_overlap(saliency, patch)
    assert overlap["region_in_patch"] == pytest.approx(25 / 100)
    assert overlap["patch_in_region"] == pytest.approx(25 / 64)
    assert overlap["saliency_mass_in_patch"] == pytest.approx(16 / 64)
    assert overlap["patch_area"] == pytest.approx(64 / 256)
    # A second image whose saliency (scaled by 5) sits on the patch: the pair averages per image.
    second = torch.zeros(1, 16, 16)
    second[:, :8, :8] = 5.0
    pair = saliency_overlap(torch.cat([saliency, second]), torch.cat([patch, patch]))
    # Second image: region rows/cols 0..7 eroded twice (0..5), dilated three times (0..8): 81 px, 64 inside.
    assert pair["saliency_mass_in_patch"] == pytest.approx((16 / 64 + 1.0) / 2)
    assert pair["region_in_patch"] == pytest.approx((25 / 100 + 64 / 81) / 2)
    assert pair["patch_in_region"] == pytest.approx((25 / 64 + 1.0) / 2)


TARGET = 2  # a class of the tiny CNN that none of the photographs gets


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Train a 10 px LaVAN patch on 12 photographs (tiny CNN, 32 px), save it, evaluate on 6 others."""
    from tests.conftest import make_tiny_model

    model = make_tiny_model()
    photos = torch.stack([image_to_tensor(sample_photo(name), 32) for name in SAMPLE_PHOTOS])
    labels = predict_labels(model, photos)
    assert (labels != TARGET).all()
    config = AttackConfig(attack="lavan", target=TARGET, patch_size=10, image_size=32, epochs=2, batches_per_epoch=15,
                          batch_size=8, optimizer="adam", lr=0.3, seed=0)
    result = train_patch(model, (photos[:12], labels[:12]), config, progress=False)
    out = tmp_path_factory.mktemp("pipeline")
    save_patch(result, out / "patch.png", model)
    spec = PatchSpec.load(out / "patch.png")
    report = evaluate(model, (photos[12:], labels[12:]), [spec], methods=["none", "lgs", "slgs", "jpeg"],
                      lambdas=[3.5], batch_size=4, progress=False).to_dict()
    return model, photos[12:], spec, report, out


def test_patch_raises_the_target_probability_and_lgs_lowers_it(pipeline):
    model, images, spec, _, _ = pipeline
    patched = apply_patch(images, spec.patch, square_mask(10), fixed_positions(len(images), 32, 10))
    results = Engine(model).run([Request(image=x, task="defend", method="lgs", lam=3.5) for x in patched])
    defended = torch.stack([r.image for r in results])
    with torch.no_grad():
        probability = {name: torch.softmax(model.module(model.normalize(x)), dim=1)[:, TARGET].mean().item()
                       for name, x in (("clean", images), ("patched", patched), ("defended", defended))}
    assert probability["patched"] > probability["clean"] + 0.5
    assert probability["defended"] < probability["patched"] - 0.3


def test_evaluation_table_numbers(pipeline):
    _, images, spec, report, _ = pipeline
    rows = {(row["method"], row["lambda"]): row for row in report["rows"]}
    assert list(rows) == [("none", None), ("lgs", 3.5), ("slgs", 3.5), ("jpeg", None)]
    none, lgs = rows[("none", None)], rows[("lgs", 3.5)]
    # Labels are the model's clean predictions, and "none" returns the input: 100% and SSIM 1 by construction.
    assert none["clean_accuracy"] == 1.0 and none["ssim_clean"] == pytest.approx(1.0)
    attacked, defended = none["attacks"][spec.name], lgs["attacks"][spec.name]
    assert attacked["success_rate"] >= 0.8 and attacked["accuracy"] <= 0.2
    # Six held-out images: LGS must take the target from at least one (it does from two here); a fixed drop
    # such as 0.3 would sit one image away from failing on another CPU's rounding.
    assert defended["success_rate"] < attacked["success_rate"]
    assert defended["restored_rate"] is not None and 0 < lgs["ssim_clean"] < 1
    assert 0 <= rows[("slgs", 3.5)]["attacks"][spec.name]["saliency"]["region_in_patch"] <= 1
    assert all(row["images_per_second"] > 0 for row in report["rows"])
    assert report["patches"][0]["target"] == TARGET and report["images"] == len(images)


def test_table_json_and_plot_are_written(pipeline):
    _, _, _, report, out = pipeline
    table = format_table(report)
    assert "no defence" in table and "LGS 3.5" in table and "SLGS saliency region" in table
    write_report(report, out / "eval.json")
    assert json.loads((out / "eval.json").read_text())["rows"][1]["method"] == "lgs"
    plot_accuracy(report, out / "eval.png")
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_pretrained_model_patch_raises_target_and_lgs_lowers_it():
    """EfficientNet-Lite0 (real weights, offline) at 96 px on eight photographs: a few Adam steps of a
    24 px LaVAN patch towards "toaster", then LGS at lambda 3.5 through the engine."""
    from elgs.models import load_model

    model = load_model("efficientnet_lite0", device="cpu", input_size=96)
    names = ("chelsea", "coffee", "astronaut", "rocket", "camera", "cat", "clock", "coins")
    images = torch.stack([image_to_tensor(sample_photo(name), 96) for name in names])
    labels = predict_labels(model, images)
    toaster = 859
    config = AttackConfig(attack="lavan", target=toaster, patch_size=24, image_size=96, epochs=3,
                          batches_per_epoch=12, batch_size=8, optimizer="adam", lr=0.1, seed=0)
    result = train_patch(model, (images, labels), config, progress=False, final_eval_images=0)
    patched = apply_patch(images, result.patch, square_mask(24), fixed_positions(8, 96, 24))
    engine = Engine(model)
    outputs = engine.run([Request(image=x, task="defend", method="lgs", lam=3.5) for x in patched])
    defended = torch.stack([r.image for r in outputs])
    with torch.no_grad():
        log_probability = {name: torch.log_softmax(model.module(model.normalize(x)), dim=1)[:, toaster].mean().item()
                           for name, x in (("clean", images), ("patched", patched), ("defended", defended))}
    # Mean log-probabilities: the patch multiplies the toaster probability many times over, LGS takes most back.
    assert log_probability["patched"] > log_probability["clean"] + 3
    assert log_probability["defended"] < log_probability["patched"] - 2


def test_streamed_chunks_give_the_same_numbers(pipeline):
    model, images, spec, report, _ = pipeline
    labels = predict_labels(model, images)
    report = copy.deepcopy(report)  # the fixture's report is shared with other tests: do not pop from it
    chunked = evaluate(model, (images, labels), [spec], methods=["none", "lgs", "slgs", "jpeg"], lambdas=[3.5],
                       batch_size=3, chunk=4, progress=False).to_dict()
    for whole, parts in zip(report["rows"], chunked["rows"]):
        whole.pop("images_per_second"), parts.pop("images_per_second")
        assert _close(parts, whole), (list(parts["attacks"].values())[0], list(whole["attacks"].values())[0])


def test_bad_settings_fail_before_any_work(pipeline):
    model, images, spec, _, _ = pipeline
    data = (images, predict_labels(model, images))
    with pytest.raises(ValueError, match="lambda must be a number in"):
        evaluate(model, data, [spec], methods=["lgs"], lambdas=[20.0], progress=False)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(model, data, [spec], methods=["lgs"], lambdas=[], progress=False)
    big = dataclasses.replace(spec, patch=torch.rand(3, 40, 40))  # larger than the 32 px images
    with pytest.raises(ValueError, match="does not fit"):
        evaluate(model, data, [big], methods=["none"], lambdas=[], progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        evaluate(model, data, [big], methods=["none"], lambdas=[], placement="random", progress=False)


def _close(a, b) -> bool:
    return nested_close(a, b, rel=1e-5, abs=1e-6)


def test_attack_score_detector_and_final_predictions(pipeline):
    """The detector columns against a direct engine run: AUROC of its scores, flags at a threshold, and
    final_predictions that follow the flag (never flagged: the original answer; always: the defended one)."""
    model, images, spec, _, _ = pipeline
    labels = predict_labels(model, images)
    patched = apply_patch(images, spec.patch, square_mask(10), fixed_positions(len(images), 32, 10))
    engine = Engine(model)
    scores = {name: torch.tensor([r.attack_score for r in engine.run(
        [Request(image=x, task="defend", method="lgs", lam=3.5) for x in batch])], dtype=torch.float64)
        for name, batch in (("clean", images), ("patched", patched))}
    middle = float(torch.cat(list(scores.values())).median())
    reports = {threshold: evaluate(model, (images, labels), [spec], methods=["none", "lgs"], lambdas=[3.5],
                                   batch_size=4, attack_threshold=threshold, progress=False).to_dict()
               for threshold in (0.0, middle, 2.0)}
    rows = {threshold: {row["method"]: row for row in report["rows"]} for threshold, report in reports.items()}
    lgs = rows[middle]["lgs"]
    attack = lgs["attacks"][spec.name]
    assert attack["auroc"] == pytest.approx(auroc(scores["clean"], scores["patched"]))
    assert lgs["attack_threshold"] == middle
    def verdict_share(batch, threshold):  # the engine's verdict (changed top-1, score, removal check)
        return float(np.mean([r.attacked for r in engine.run([Request(image=x, task="defend", method="lgs", lam=3.5,
                                                                      attack_threshold=threshold) for x in batch])]))

    assert lgs["clean_flagged"] == pytest.approx(verdict_share(images, middle))
    assert attack["detection_rate"] == pytest.approx(verdict_share(patched, middle))
    fooled = rows[middle]["none"]["attacks"][spec.name]["undefended_success_rate"]
    assert fooled > 0 and attack["auroc_fooled"] is not None
    # Threshold 2: nothing is flagged, the final answer is the original one (what 'none' scores).
    never = rows[2.0]["lgs"]
    assert never["clean_flagged"] == 0 and never["attacks"][spec.name]["detection_rate"] == 0
    assert never["clean_final_accuracy"] == 1.0  # labels are the clean predictions
    assert never["attacks"][spec.name]["final_accuracy"] == rows[2.0]["none"]["attacks"][spec.name]["accuracy"]
    assert never["attacks"][spec.name]["final_restored_rate"] == 0
    # Threshold 0: every image whose top-1 LGS changed (and removal does not keep) is flagged, answered by the
    # removal view; the others keep their own answer. The report's figures are the engine's.
    always = rows[0.0]["lgs"]
    assert always["attacks"][spec.name]["detection_rate"] == pytest.approx(verdict_share(patched, 0.0))
    assert always["attacks"][spec.name]["detection_rate"] > 0
    for batch, final_accuracy in ((images, always["clean_final_accuracy"]),
                                  (patched, always["attacks"][spec.name]["final_accuracy"])):
        at_zero = run_engine(engine, batch, "lgs", 3.5, 0.2, 4, attack_threshold=0.0).records
        assert final_accuracy == pytest.approx(float((at_zero.final == labels.numpy()).mean()))
    # The flags and final answers derived in the report are the engine's own.
    served = run_engine(engine, patched, "lgs", 3.5, 0.2, 4, attack_threshold=middle).records
    assert attack["detection_rate"] == pytest.approx(float(served.attacked.mean()))
    assert attack["final_accuracy"] == pytest.approx(float((served.final == labels.numpy()).mean()))
    # Re-deciding the report at other thresholds gives what running at them gives.
    for threshold in (0.0, 2.0):
        redone = rethreshold(reports[middle], _FixedThreshold(threshold))
        for ran, again in zip(reports[threshold]["rows"], redone["rows"]):
            ran, again = dict(ran), dict(again)
            ran.pop("images_per_second"), again.pop("images_per_second")  # wall time differs run to run
            assert _close(again, ran), (again["method"], threshold)
    # ... and with a calibration file that has a removal-view threshold, what an engine reading that file gives.
    patched_removal = torch.tensor([r.removal_score for r in engine.run(
        [Request(image=x, task="defend", method="lgs", lam=3.5) for x in patched])])
    calibrated = AttackThresholds(model="tiny", input_size=32, fpr=0.05, images=8, data="test", entries=(
        ThresholdEntry("lgs", 3.5, None, 2.0), ThresholdEntry(REMOVAL_VIEW, 3.5, None,
                                                               float(patched_removal.median()))))
    redone = {row["method"]: row for row in rethreshold(reports[middle], calibrated)["rows"]}["lgs"]
    served = run_engine(Engine(model, thresholds=calibrated), patched, "lgs", 3.5, 0.2, 4).records
    assert redone["attacks"][spec.name]["per_image"]["attacked"] == served.attacked.tolist()
    assert redone["attacks"][spec.name]["per_image"]["final"] == served.final.tolist()
    assert 0 < served.attacked.sum() < len(patched)  # the removal view alone flags some (the defended one never)
    # 'none' changes nothing: score 0 everywhere, so the score separates nothing.
    assert rows[middle]["none"]["attacks"][spec.name]["auroc"] == 0.5
    table = format_table(reports[middle])
    assert "AUROC fooled" in table and f"{attack['auroc']:.3f}" in table


class _FixedThreshold:
    """The lookup interface of :class:`elgs.thresholds.AttackThresholds`: one threshold for every defended
    view, none for the removal view (as a run with ``attack_threshold`` and no calibration has)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def lookup(self, method, lam, saliency=None) -> float | None:
        return None if method == REMOVAL_VIEW else self.threshold


def test_without_a_threshold_nothing_is_flagged_and_final_is_the_defended_answer(pipeline):
    _, _, spec, report, _ = pipeline  # the tiny model has random weights: no calibration applies
    lgs = next(row for row in report["rows"] if row["method"] == "lgs")
    assert lgs["attack_threshold"] is None and lgs["clean_flagged"] is None
    assert lgs["attacks"][spec.name]["detection_rate"] is None
    assert lgs["attacks"][spec.name]["final_accuracy"] == lgs["attacks"][spec.name]["accuracy"]
    assert 0 <= lgs["attacks"][spec.name]["auroc"] <= 1
