import pytest
import torch

from elgs.defenses import parse_saliency
from elgs.engine import Engine, InvalidParameterError, Request, UnknownMethodError
from tests.conftest import make_tiny_model, patched_photo


def _mixed_requests(photos):
    images = list(photos.values())
    plan = [("defend", "slgs", 3.5), ("defend", "wlgs", 2.3), ("defend", "lgs", 1.0), ("defend", "none", None),
            ("classify", "none", None), ("defend", "slgs", 0.0), ("saliency", "none", None), ("defend", "median", None)]
    return [Request(image=images[i], task=task, method=method, lam=lam) for i, (task, method, lam) in enumerate(plan)]


def test_mixed_batch_costs_two_model_calls_and_no_weight_grads(tiny_model, photos):
    engine = Engine(tiny_model)
    results = engine.run(_mixed_requests(photos))
    assert tiny_model.module.calls == 2
    assert all(p.grad is None for p in tiny_model.module.parameters())
    assert all(r.batch_size == 8 for r in results)
    assert results[0].defended_predictions is not None and results[0].saliency is not None
    assert results[2].saliency is None  # lgs needs no saliency
    assert results[4].defended_predictions is None and results[4].image is None
    assert results[6].region is not None and results[6].region.shape == (1, 32, 32)
    assert results[3].lam is None and results[0].lam == 3.5


def test_classify_only_batch_costs_one_call(tiny_model, photos):
    Engine(tiny_model).run([Request(image=x, task="classify") for x in photos.values()])
    assert tiny_model.module.calls == 1


def test_batch_equals_each_request_alone(photos):
    model = make_tiny_model()
    engine = Engine(model)
    requests = _mixed_requests(photos)
    batched = engine.run(requests)
    for request, together in zip(requests, batched):
        (alone,) = engine.run([request])
        assert [p.index for p in alone.predictions] == [p.index for p in together.predictions]
        for a, b in zip(alone.predictions, together.predictions):
            assert abs(a.score - b.score) < 1e-5
        if request.task == "defend":
            torch.testing.assert_close(alone.image, together.image, atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.mask, together.mask, atol=1e-5, rtol=0)
            assert [p.index for p in alone.defended_predictions] == [p.index for p in together.defended_predictions]


def test_lambda_zero_defended_equals_original(tiny_model, photos):
    x = photos["chelsea"]
    before = x.clone()
    for method in ("lgs", "slgs", "wlgs", "none"):
        (result,) = Engine(tiny_model).run([Request(image=x, method=method, lam=0.0)])
        assert torch.equal(result.image, x)
        assert [p.index for p in result.defended_predictions] == [p.index for p in result.predictions]
    assert torch.equal(x, before)


def test_defaults_filled_from_model(tiny_model, photos):
    (result,) = Engine(tiny_model).run([Request(image=photos["coffee"], method="slgs")])
    assert result.lam == tiny_model.spec.default_lambda and result.threshold == 0.2
    assert result.image.min() >= 0 and result.image.max() <= 1


@pytest.mark.parametrize("lam", [-1.0, 11.0, float("nan"), float("inf")])
def test_lambda_out_of_range_rejected_before_any_pass(tiny_model, photos, lam):
    with pytest.raises(InvalidParameterError, match="lambda must be a number in \\[0, 10\\]"):
        Engine(tiny_model).run([Request(image=photos["chelsea"], method="lgs", lam=lam)])
    assert tiny_model.module.calls == 0


def test_unknown_method_and_bad_shape(tiny_model):
    engine = Engine(tiny_model)
    with pytest.raises(UnknownMethodError, match="unknown defence 'blur'"):
        engine.run([Request(image=torch.rand(3, 32, 32), method="blur")])
    with pytest.raises(InvalidParameterError, match=r"\(3, 32, 32\)"):
        engine.run([Request(image=torch.rand(3, 30, 32), method="lgs")])
    with pytest.raises(InvalidParameterError, match="threshold"):
        engine.run([Request(image=torch.rand(3, 32, 32), method="lgs", threshold=1.5)])
    assert engine.run([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: nothing to compare the CPU with")
def test_engine_on_cuda_matches_cpu(photos):
    cpu_results = Engine(make_tiny_model()).run(_mixed_requests(photos))
    device_results = Engine(make_tiny_model(device="cuda")).run(_mixed_requests(photos))
    for a, b in zip(cpu_results, device_results):
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
        if a.image is not None:
            torch.testing.assert_close(a.image, b.image, atol=1e-4, rtol=0)


# --- saliency estimators, attack score and decision (issue 9) -------------------------------------

def test_smoothgrad_requests_still_cost_two_model_calls(tiny_model, photos):
    images = list(photos.values())
    requests = [Request(image=images[0], method="slgs", saliency="smoothgrad:n=8"),
                Request(image=images[1], method="wlgs", saliency="smoothgrad:n=3,rectify=true"),
                Request(image=images[2], method="slgs"), Request(image=images[3], method="lgs"),
                Request(image=images[4], task="saliency", saliency="smoothgrad:n=2"),
                Request(image=images[5], task="classify")]
    results = Engine(tiny_model).run(requests)
    assert tiny_model.module.calls == 2
    assert [r.saliency_method for r in results] == [
        "smoothgrad:n=8,sigma=0.2,rectify=false,seed=0,quantile=0.9",
        "smoothgrad:n=3,sigma=0.2,rectify=true,seed=0,quantile=0.9",
        "gradient:rectify=false,quantile=1", None, "smoothgrad:n=2,sigma=0.2,rectify=false,seed=0,quantile=0.9", None]


def test_default_gradient_request_matches_the_paper_map(tiny_model, photos):
    from elgs.defenses import topk_saliency

    x = torch.stack(list(photos.values()))
    results = Engine(tiny_model).run([Request(image=image, method="slgs") for image in x])
    reference = topk_saliency(tiny_model.module, x, tiny_model.normalize)
    assert torch.equal(torch.stack([r.saliency for r in results]), reference)


def test_bad_saliency_spec_or_attack_threshold_is_rejected_before_any_pass(tiny_model, photos):
    engine = Engine(tiny_model)
    with pytest.raises(InvalidParameterError, match="saliency: smoothgrad has no parameter 'k'"):
        engine.run([Request(image=photos["chelsea"], method="slgs", saliency="smoothgrad:k=3")])
    with pytest.raises(InvalidParameterError, match=r"attack_threshold must be a number in \[0, 2\], got 3.0"):
        engine.run([Request(image=photos["chelsea"], method="lgs", attack_threshold=3)])
    assert tiny_model.module.calls == 0


def test_attack_score_by_hand():
    from elgs.engine import attack_scores, decide

    original = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    defended = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]))
    scores = attack_scores(original, defended)
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.0]), rtol=0, atol=1e-6)
    assert attack_scores(torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 100.0]])).item() == pytest.approx(2.0)
    assert decide(0.5, 0.4) is True and decide(0.5, 0.5) is False and decide(0.5, None) is None


def test_attack_score_decision_and_final_predictions(photos):
    from elgs.thresholds import AttackThresholds, ThresholdEntry

    model = make_tiny_model()
    x = patched_photo()  # the patch makes the tiny model's 9 a 1; LGS 3.5 and the removal view both give 9 back
    (free,) = Engine(model).run([Request(image=x, method="lgs", lam=3.5)])
    score = free.attack_score
    assert free.defended_predictions[0].index != free.predictions[0].index
    assert 0 < score <= 2 and free.attacked is None and free.final_predictions == free.defended_predictions
    assert free.removal_prediction.index != free.predictions[0].index
    assert [s.method for s in free.stages] == ["lgs"] and free.path is None and free.escalate is None
    below = AttackThresholds(model="tiny", input_size=32, fpr=0.05, images=10, data="",
                             entries=(ThresholdEntry("lgs", 3.5, None, score / 2),))
    (flagged,) = Engine(model, thresholds=below).run([Request(image=x, method="lgs", lam=3.5)])
    assert flagged.attacked is True and flagged.attack_threshold == score / 2 and flagged.stages[0].flagged is True
    # attacked: the answer with the suspect removed outright (its top-1 is the removal check's)
    assert flagged.final_predictions[0] == flagged.removal_prediction != flagged.predictions[0]
    (kept,) = Engine(model, thresholds=below).run([Request(image=x, method="lgs", lam=3.5, attack_threshold=2.0)])
    assert kept.attacked is False and kept.final_predictions == kept.predictions
    (unchanged,) = Engine(model).run([Request(image=photos["chelsea"], method="lgs", lam=10.0)])
    assert unchanged.defended_predictions[0].index == unchanged.predictions[0].index and unchanged.attack_score > 0.05
    assert unchanged.attacked is False and unchanged.final_predictions == unchanged.predictions  # no threshold needed
    (uncalibrated,) = Engine(model, thresholds=below).run([Request(image=x, method="median")])
    assert uncalibrated.attack_threshold is None and uncalibrated.removal_prediction is None
    assert uncalibrated.attacked is (None if uncalibrated.defended_predictions[0].index != 1 else False)
    assert flagged.predictions[0].index == 1 and flagged.final_predictions[0].index == 9  # the clean answer
    (classified,) = Engine(model).run([Request(image=x, task="classify")])
    assert classified.attack_score is None and classified.final_predictions is None


def test_attack_score_equals_the_softmax_l1_of_both_passes(tiny_model, photos):
    results = Engine(tiny_model).run([Request(image=x, method="wlgs", lam=5.0) for x in photos.values()])
    for image, result in zip(photos.values(), results):
        with torch.inference_mode():
            before = torch.softmax(tiny_model.module(tiny_model.normalize(image[None])), 1)
            after = torch.softmax(tiny_model.module(tiny_model.normalize(result.image[None])), 1)
        assert result.attack_score == pytest.approx(float((before - after).abs().sum()), abs=1e-4)


def test_resolve_request_checks_parameters_without_an_image_and_is_idempotent():
    import numpy as np

    from elgs.engine import InvalidParameterError, ModelDefaults, resolve_request

    model = ModelDefaults(name="m", input_size=32, default_lambda=2.7, default_saliency="smoothgrad:n=4")
    resolved = resolve_request(Request(image=None, method="slgs", saliency="smoothgrad:sigma=0.3"), model)
    assert (resolved.lam, resolved.threshold) == (2.7, 0.2)
    assert resolved.saliency == parse_saliency("smoothgrad:n=4,sigma=0.3").spec  # n from the model's default
    assert resolve_request(resolved, model) == resolved
    assert resolve_request(Request(image=None, method="lgs", saliency="bogus"), model).saliency is None
    with pytest.raises(UnknownMethodError, match="nope"):
        resolve_request(Request(image=None, method="nope"), model)
    with pytest.raises(InvalidParameterError, match="lambda must be a number in"):
        resolve_request(Request(image=None, method="lgs", lam=99.0), model)
    with pytest.raises(InvalidParameterError, match="saliency"):
        resolve_request(Request(image=None, method="wlgs", saliency="smoothgrad:n=0"), model)
    with pytest.raises(InvalidParameterError, match=r"uint8 of shape \(32, 32, 3\) for m, got float32"):
        resolve_request(Request(image=np.zeros((32, 32, 3), np.float32), task="classify"), model)
    with pytest.raises(InvalidParameterError, match=r"shape \(3, 32, 32\) for m, got \(3, 16, 16\)"):
        resolve_request(Request(image=torch.zeros(3, 16, 16), task="classify"), model)
    assert resolve_request(Request(image=np.zeros((32, 32, 3), np.uint8), task="classify"), model).task == "classify"
