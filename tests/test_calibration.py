"""Attack-score thresholds: the FPR rule, lookup with interpolation and fall-backs, files, calibration = engine."""

import json

import pytest
import torch

from elgs.calibration import Setting, calibrate, clean_scores, clean_views, settings_for, threshold_at_fpr
from elgs.engine import Engine, Request
from elgs.thresholds import REMOVAL_VIEW, AttackThresholds, ThresholdEntry, load_thresholds, read_calibration, write_calibration
from tests.conftest import make_tiny_model

SMOOTH = "smoothgrad:n=4,sigma=0.2,rectify=true,seed=0,quantile=0.9"
TABLE = AttackThresholds(
    model="m", input_size=224, fpr=0.05, images=100, data="x", default_saliency=SMOOTH,
    entries=(ThresholdEntry("lgs", 2.3, None, 0.2), ThresholdEntry("lgs", 3.5, None, 0.5),
             ThresholdEntry("slgs", 3.5, SMOOTH, 0.1), ThresholdEntry("slgs", 3.5, "gradient:rectify=false,quantile=1", 0.01),
             ThresholdEntry("jpeg", None, None, 0.3)),
)


def test_threshold_at_fpr_by_hand():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0], dtype=torch.float64)
    assert threshold_at_fpr(scores, 0.2) == pytest.approx(0.8)  # 0.9 and 1.0 above: 2 of 10
    assert threshold_at_fpr(scores, 0.05) == pytest.approx(1.0)  # ceil(9.5) = 10th smallest: none above
    assert threshold_at_fpr(scores, 0.0) == pytest.approx(1.0)
    assert threshold_at_fpr(scores, 0.5) == pytest.approx(0.5)
    assert threshold_at_fpr(torch.tensor([0.3]), 0.5) == pytest.approx(0.3)
    for fpr in (0.0, 0.05, 0.1, 0.25, 0.33, 0.9):
        assert float((scores > threshold_at_fpr(scores, fpr)).double().mean()) <= fpr + 1e-12
    with pytest.raises(ValueError, match="fpr must be in"):
        threshold_at_fpr(scores, 1.0)
    with pytest.raises(ValueError, match=r"got \(0,\)"):
        threshold_at_fpr(torch.empty(0), 0.05)


def test_lookup_interpolates_in_lambda_and_clamps_outside():
    assert TABLE.lookup("lgs", 2.3) == 0.2 and TABLE.lookup("lgs", 3.5) == 0.5
    assert TABLE.lookup("lgs", 2.9) == pytest.approx(0.35)
    assert TABLE.lookup("lgs", 0.5) == 0.2 and TABLE.lookup("lgs", 10.0) == 0.5
    assert TABLE.lookup("jpeg", None) == 0.3
    assert TABLE.lookup("median", None) is None and TABLE.lookup("wlgs", 3.5, SMOOTH) is None


def test_lookup_picks_the_estimator_then_falls_back_to_the_model_default():
    assert TABLE.lookup("slgs", 3.5, SMOOTH) == 0.1
    assert TABLE.lookup("slgs", 3.5, "gradient:rectify=false,quantile=1") == 0.01
    assert TABLE.lookup("slgs", 3.5, "smoothgrad:n=8,sigma=0.2,rectify=true,seed=0,quantile=0.9") == 0.1


def test_files_round_trip_keep_other_models_and_user_file_wins(tmp_path):
    user, shipped = tmp_path / "user.json", tmp_path / "shipped.json"
    write_calibration(shipped, TABLE)
    write_calibration(shipped, AttackThresholds(model="other", input_size=32, fpr=0.1, images=3, data=""))
    assert set(read_calibration(shipped)) == {"m", "other"}
    loaded = load_thresholds("m", 224, paths=(user, shipped))
    assert loaded == TABLE and loaded.source == str(shipped)
    write_calibration(user, AttackThresholds(model="m", input_size=224, fpr=0.01, images=5, data="mine"))
    assert load_thresholds("m", 224, paths=(user, shipped)).data == "mine"
    assert load_thresholds("m", 400, paths=(user, shipped)) is None  # calibrated at another input size
    assert load_thresholds("m", 224, weights="random", paths=(user, shipped)) is None
    assert load_thresholds("nope", 224, paths=(user, shipped)) is None
    (tmp_path / "bad.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="not an elgs calibration file"):
        read_calibration(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_thresholds("m", 224, paths=(tmp_path / "broken.json",))


def test_shipped_calibration_covers_efficientnet_lite0_defaults():
    from elgs.models import get_model_spec
    from elgs.thresholds import shipped_calibration_path

    thresholds = load_thresholds("efficientnet_lite0", 224, paths=(shipped_calibration_path(),))
    assert thresholds is not None and thresholds.fpr == 0.05 and thresholds.images >= 100
    spec = get_model_spec("efficientnet_lite0")
    from elgs.defenses import parse_saliency

    default = parse_saliency(spec.default_saliency).spec
    for method in ("lgs", "slgs", "wlgs"):
        assert thresholds.lookup(method, spec.default_lambda, default if method != "lgs" else None) is not None


def test_settings_cover_methods_lambdas_and_estimators():
    model = make_tiny_model()
    settings = settings_for(model, ["lgs", "slgs", "jpeg"], [2.3], ["smoothgrad:n=2"])
    gradient, smooth = "gradient:rectify=false,quantile=1", "smoothgrad:n=2,sigma=0.2,rectify=false,seed=0,quantile=0.9"
    assert settings == [Setting("lgs", 2.3, None), Setting("lgs", 3.5, None),
                        Setting("slgs", 2.3, gradient), Setting("slgs", 2.3, smooth),
                        Setting("slgs", 3.5, gradient), Setting("slgs", 3.5, smooth), Setting("jpeg", None, None)]


def test_calibration_scores_are_the_engine_scores(photos):
    model = make_tiny_model()
    x = torch.stack(list(photos.values()))
    settings = settings_for(model, ["lgs", "slgs", "wlgs", "median"], [5.0], ["smoothgrad:n=3,rectify=true"])
    scores = clean_scores(model, [x[:5], x[5:]], settings)
    engine = Engine(model)
    for setting in settings:
        results = engine.run([Request(image=image, method=setting.method, lam=setting.lam, saliency=setting.saliency)
                              for image in x])
        torch.testing.assert_close(scores[setting], torch.tensor([r.attack_score for r in results]),
                                   rtol=1e-4, atol=1e-5)
    thresholds = calibrate(model, [x], fpr=0.25, verdict_fpr=0.0, methods=["lgs"], lambdas=[5.0])
    entry = next(e for e in thresholds.entries if e.lam == 5.0 and e.method == "lgs")
    lgs = clean_views(model, [x], [Setting("lgs", 5.0, None)])[Setting("lgs", 5.0, None)]
    torch.testing.assert_close(lgs.scores, scores[Setting("lgs", 5.0, None)])
    # the removal view first (no clean image called attacked by it alone), then the larger of the score's
    # threshold and the full verdict's (here: no clean image called attacked by either view)
    (removal,) = [e for e in thresholds.entries if e.method == REMOVAL_VIEW and e.lam == 5.0]
    assert removal.lam == 5.0 and removal.threshold == pytest.approx(
        threshold_at_fpr(lgs.removal_verdict_scores(), 0.0)) and removal.false_positive_rate == 0.0
    expected = max(threshold_at_fpr(lgs.scores, 0.25), threshold_at_fpr(lgs.verdict_scores(removal.threshold), 0.0))
    assert entry.clean_flagged <= 0.25 and entry.false_positive_rate == 0.0
    assert not lgs.attacked(entry.threshold, removal.threshold).any()
    assert entry.threshold == pytest.approx(expected) and entry.threshold >= threshold_at_fpr(lgs.scores, 0.25)
    assert thresholds.images == 8 and thresholds.input_size == 32


def test_create_app_reads_the_calibration_file_of_its_settings(tmp_path, monkeypatch):
    """``create_app(Settings(calibration_file=F))`` judges with F, whatever the environment says."""
    import dataclasses

    from fastapi.testclient import TestClient

    from elgs.api import create_app
    from tests.api.helpers import photo_png, tiny_settings

    monkeypatch.setenv("ELGS_CALIBRATION_FILE", str(tmp_path / "elsewhere.json"))  # not the one passed
    calibration = write_calibration(tmp_path / "calibration.json", AttackThresholds(
        model="tiny", input_size=32, fpr=0.05, images=8, data="test",
        entries=(ThresholdEntry(method="lgs", lam=3.5, saliency=None, threshold=0.123),)))
    model = dataclasses.replace(make_tiny_model(), weights="pretrained")  # random weights are never calibrated
    with TestClient(create_app(tiny_settings(calibration_file=calibration), models=[model])) as client:
        answer = client.post("/defend/lgs", params={"lambda": 3.5},
                             files={"image": ("cat.png", photo_png("chelsea"), "image/png")}).json()
    assert answer["attack_threshold"] == 0.123


def test_clean_views_leave_out_answers_the_model_does_not_give(photos):
    """The calibration judges as the engine does: an original top-1 below MIN_ANSWER_PROBABILITY is never attacked,
    so its scores set no threshold."""
    from elgs.calibration import CleanViews

    views = CleanViews(scores=torch.tensor([1.5, 1.5, 0.2]), original=torch.tensor([3, 3, 3]),
                       defended=torch.tensor([4, 4, 3]), removal=torch.tensor([5, 5, 6]),
                       removal_scores=torch.tensor([1.8, 1.8, 1.2]), kinds=["photos"] * 3,
                       probability=torch.tensor([0.05, 0.5, 0.5]))
    torch.testing.assert_close(views.removal_verdict_scores(), torch.tensor([0.0, 1.8, 1.2]))
    torch.testing.assert_close(views.verdict_scores(), torch.tensor([0.0, 1.5, 0.0]))
    assert views.attacked(1.0, 1.0).tolist() == [False, True, True]
    model = make_tiny_model()
    x = torch.stack(list(photos.values()))
    (lgs,) = clean_views(model, [x], [Setting("lgs", 3.5, None)]).values()
    results = Engine(model).run([Request(image=image, method="lgs", lam=3.5) for image in x])
    torch.testing.assert_close(lgs.probability, torch.tensor([r.predictions[0].score for r in results]))
