"""The verdict rule (engine.judge) by hand, and the auto cascade's rounds through the engine."""

from __future__ import annotations

import pytest
import torch

from elgs.engine import Engine, Request, judge, stage_defense, verdicts
from elgs.thresholds import REMOVAL_VIEW, AttackThresholds, ThresholdEntry
from tests.conftest import make_tiny_model, patched_photo


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


@pytest.mark.parametrize(("defended", "score", "threshold", "removal", "removal_score", "expected"), [
    (3, 0.1, 0.5, 5, 1.8, (True, True)),     # the defended view kept the answer, the removal view moved it far
    (4, 0.1, 0.5, 5, 1.8, (True, True)),     # ... also when the defended view changed it a little
    (3, 0.1, None, 5, 1.8, (True, True)),    # ... and without a threshold for the defended view
    (3, 0.1, 0.5, 5, 0.9, (False, False)),   # the removal view moved it, but less than its threshold
    (3, 0.1, 0.5, 3, 1.8, (False, False)),   # the removal view kept the answer: its score does not matter
    (4, 0.9, 0.5, 3, 0.1, (True, False)),    # the defended view flags, the original survives removal: steered
    (4, 0.1, None, 3, 0.1, (None, None)),    # changed, no threshold, the removal view does not flag: undecided
])
def test_judge_with_the_removal_view_by_hand(defended, score, threshold, removal, removal_score, expected):
    assert judge(3, defended, score, threshold, removal, removal_score, removal_threshold=1.0) == expected
    if threshold is not None:  # the vectorised verdict says the same
        flagged, attacked = verdicts(torch.tensor([3]), torch.tensor([defended]), torch.tensor([score]), threshold,
                                     torch.tensor([removal]), torch.tensor([removal_score]), 1.0)
        assert (bool(flagged), bool(attacked)) == expected
    # without a removal threshold only the defended view flags
    assert judge(3, defended, score, threshold, removal, removal_score)[1] == (
        None if threshold is None and defended != 3 else bool(defended != 3 and threshold is not None
                                                              and score > threshold and removal != 3))


@pytest.mark.parametrize(("probability", "expected"), [
    (0.05, (False, False)),  # a flat softmax (a texture photograph): no answer to protect, never attacked
    (0.0999, (False, False)),
    (0.1, (True, True)),     # MIN_ANSWER_PROBABILITY and above: judged as before
    (0.9, (True, True)),
])
def test_no_verdict_on_an_answer_the_model_does_not_give(probability, expected):
    from elgs.engine import MIN_ANSWER_PROBABILITY

    assert MIN_ANSWER_PROBABILITY == 0.1
    assert judge(3, 4, 1.9, 0.5, 5, 1.9, 1.0, probability=probability) == expected  # both views flag
    assert judge(3, 3, 0.1, 0.5, 5, 1.9, 1.0, probability=probability) == expected  # the removal view alone
    undecided = judge(3, 4, 1.9, None, 5, 0.1, 1.0, probability=probability)  # no threshold
    assert undecided == ((False, False) if probability < 0.1 else (None, None))
    flagged, attacked = verdicts(torch.tensor([3, 3]), torch.tensor([4, 4]), torch.tensor([1.9, 1.9]), 0.5,
                                 torch.tensor([5, 5]), torch.tensor([1.9, 1.9]), 1.0,
                                 torch.tensor([probability, 0.9]))
    assert (bool(flagged[0]), bool(attacked[0])) == expected and bool(attacked[1])


def _thresholds(lgs: float, slgs: float, removal: float | None = None) -> AttackThresholds:
    removal_entry = () if removal is None else (ThresholdEntry(REMOVAL_VIEW, 3.5, None, removal),)
    return AttackThresholds(model="tiny", input_size=32, fpr=0.05, images=10, data="", entries=(
        ThresholdEntry("lgs", 3.5, None, lgs), ThresholdEntry("slgs", 3.5, "gradient", slgs), *removal_entry),
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
        assert result.final_predictions == result.predictions and result.removal_prediction is not None
        assert 0 <= result.removal_score <= 2 and result.removal_threshold is None


def test_the_removal_view_alone_escalates_and_decides(photos):
    """A patch that survives the smoothing is invisible to the defended views; the removal view still sees it."""
    model = make_tiny_model()
    x = patched_photo()  # LGS 3.5 and the removal view both change the tiny model's top-1 on it
    blind = Engine(model, thresholds=_thresholds(lgs=2.0, slgs=2.0))  # the defended views never flag
    (unseen,) = blind.run([Request(image=x, method="auto", lam=3.5, saliency="gradient")])
    assert unseen.path == "screen" and unseen.attacked is False and unseen.final_predictions == unseen.predictions
    engine = Engine(model, thresholds=_thresholds(lgs=2.0, slgs=2.0, removal=unseen.removal_score / 2))
    (screened,) = engine.run_round([Request(image=x, method="auto", lam=3.5, saliency="gradient")])
    assert screened.stages[0].flagged is True and screened.escalate is not None
    assert screened.removal_threshold == unseen.removal_score / 2
    (result,) = engine.run([Request(image=x, method="auto", lam=3.5, saliency="gradient")])
    assert result.path == "strong" and result.attacked is True and result.stages[1].flagged is True
    assert result.final_predictions[0] == result.removal_prediction != result.predictions[0]
    (high,) = Engine(model, thresholds=_thresholds(lgs=2.0, slgs=2.0, removal=2.0)).run(
        [Request(image=x, method="slgs", lam=3.5, saliency="gradient")])
    assert high.attacked is False and high.removal_threshold == 2.0


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
