"""The verdict rule (engine.judge) by hand, and the auto cascade's rounds through the engine."""

from __future__ import annotations

import pytest
import torch

from elgs.engine import Engine, Request, judge, stage_defense
from elgs.thresholds import AttackThresholds, ThresholdEntry
from tests.conftest import make_tiny_model


@pytest.mark.parametrize(("original", "defended", "score", "threshold", "removal", "expected"), [
    (3, 3, 1.9, 0.1, 5, (False, False)),     # the answer did not change: a harmless probability shift
    (3, 3, 1.9, None, None, (False, False)),  # ... even without a threshold
    (3, 4, 0.2, 0.5, 5, (False, False)),     # changed, but the softmax moved less than the threshold
    (3, 4, 0.9, 0.5, 5, (True, True)),       # changed a lot, and the original does not survive removal
    (3, 4, 0.9, 0.5, None, (True, True)),    # no removal check (baseline filters): flagged is attacked
    (3, 4, 0.9, 0.5, 3, (True, False)),      # the original survives removing the suspect: the defence was steered
    (3, 4, 0.9, None, 5, (None, None)),      # changed, no threshold: undecided
])
def test_judge_by_hand(original, defended, score, threshold, removal, expected):
    assert judge(original, defended, score, threshold, removal) == expected


def _thresholds(lgs: float, slgs: float) -> AttackThresholds:
    return AttackThresholds(model="tiny", input_size=32, fpr=0.05, images=10, data="", entries=(
        ThresholdEntry("lgs", 3.5, None, lgs), ThresholdEntry("slgs", 3.5, "gradient", slgs)),
        default_saliency="gradient")


def test_auto_answers_unflagged_images_at_the_screen_in_two_forwards(photos):
    model = make_tiny_model()
    engine = Engine(model, thresholds=_thresholds(lgs=0.5, slgs=0.5))
    images = [photos["chelsea"], photos["coffee"], photos["rocket"]]  # LGS keeps the tiny model's top-1 on these
    model.module.calls = 0
    results = engine.run([Request(image=x, method="auto", lam=3.5) for x in images])
    assert model.module.calls == 2  # one batched pass 1 (no gradient) and one pass 2, no strong round
    for result in results:
        assert result.path == "screen" and result.escalate is None and result.attacked is False
        assert [s.method for s in result.stages] == ["lgs"] and result.stages[0].attack_threshold == 0.5
        assert result.final_predictions == result.predictions and result.removal_prediction is None


def test_auto_escalates_a_flagged_image_to_slgs_and_judges_it_there(photos):
    model = make_tiny_model()
    engine = Engine(model, thresholds=_thresholds(lgs=0.5, slgs=0.5))
    x = photos["astronaut"]  # LGS 3.5 flips the tiny model's top-1 with a score of about 1.6
    (screened,) = engine.run_round([Request(image=x, method="auto", lam=3.5, saliency="gradient")])
    assert screened.path == "screen" and screened.stages[0].flagged is True and screened.escalate is not None
    strong_request = screened.escalate
    assert strong_request.screen == screened.stages[0] and stage_defense(engine.resolve(strong_request)).name == "slgs"
    model.module.calls = 0
    (final,) = engine.run_round([strong_request])
    assert model.module.calls == 2  # pass 1 with the gradient, pass 2 with the SLGS and the removal images
    (alone,) = engine.run([Request(image=x, method="slgs", lam=3.5, saliency="gradient")])
    assert final.path == "strong" and [s.method for s in final.stages] == ["lgs", "slgs"]
    assert final.attack_score == pytest.approx(alone.attack_score, abs=1e-6)
    assert final.defended_predictions == alone.defended_predictions and final.attacked == alone.attacked
    torch.testing.assert_close(final.image, alone.image)
    (whole,) = engine.run([Request(image=x, method="auto", lam=3.5, saliency="gradient")])
    assert whole.path == "strong" and whole.attack_score == pytest.approx(final.attack_score, abs=1e-6)


def test_auto_attack_threshold_applies_to_the_strong_stage_only(photos):
    engine = Engine(make_tiny_model(), thresholds=_thresholds(lgs=0.5, slgs=0.5))
    (result,) = engine.run([Request(image=photos["astronaut"], method="auto", lam=3.5, saliency="gradient",
                                    attack_threshold=1.99)])
    assert result.stages[0].attack_threshold == 0.5 and result.stages[1].attack_threshold == 1.99


def test_a_batch_mixing_rounds_equals_each_request_alone(photos):
    engine = Engine(make_tiny_model(), thresholds=_thresholds(lgs=0.5, slgs=0.5))
    requests = [Request(image=photos[name], method=method, lam=3.5, saliency="gradient")
                for name in ("astronaut", "chelsea") for method in ("auto", "lgs", "slgs")]
    batched = engine.run(requests)
    for request, result in zip(requests, batched):
        (alone,) = engine.run([request])
        assert result.path == alone.path and result.attacked == alone.attacked
        assert result.attack_score == pytest.approx(alone.attack_score, abs=1e-5)
        assert result.final_predictions[0].index == alone.final_predictions[0].index
