"""Saliency estimators: specs, the gradient map kept exact, SmoothGrad averaging, rectified backward, WLGS weights."""

import contextlib
import math

import pytest
import torch
from torch import nn

from elgs.defenses import (
    estimate_saliency,
    minmax_normalize,
    parse_saliency,
    rectified_activations,
    robust_normalize,
    saliency_pass,
    topk_saliency,
    wlgs_mask,
)
from elgs.defenses.estimators import average_copies, noise, rectified_gate
from tests.conftest import TinyCNN


def identity(x):
    return x


class TwoClass(nn.Module):
    """Logits ``(u, -u)`` with ``u = a * act(x[:, 0, 0, 0])``: ``dL/dx_r = 2 a tanh(u) act'`` for L the 2-class loss."""

    def __init__(self, a: float = 1.0, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.a = a
        self.activation = activation or nn.Identity()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        u = self.activation(self.a * x[:, 0, 0, 0])
        return torch.stack([u, -u], dim=1)


# --- specs ---------------------------------------------------------------------------------------

def test_parse_fills_defaults_and_canonical_spec_round_trips():
    assert parse_saliency("gradient").spec == "gradient:rectify=false,quantile=1"
    config = parse_saliency(" smoothgrad : n=8 , rectify=yes ")
    assert (config.n, config.sigma, config.rectify, config.seed, config.quantile) == (8, 0.2, True, 0, 0.9)
    assert config.spec == "smoothgrad:n=8,sigma=0.2,rectify=true,seed=0,quantile=0.9"
    assert parse_saliency(config.spec) == config
    assert parse_saliency(config) == config


def test_parse_takes_unspecified_parameters_from_a_base_of_the_same_estimator():
    base = "smoothgrad:n=4,sigma=0.2,rectify=true"
    assert parse_saliency("smoothgrad:n=8", base=base).rectify is True
    assert parse_saliency("smoothgrad", base=base) == parse_saliency(base)
    assert parse_saliency("gradient", base=base).rectify is False  # another estimator: its own defaults


@pytest.mark.parametrize("spec, message", [
    ("blur", "unknown saliency estimator 'blur'"),
    ("smoothgrad:n=0", "n must be in [1, 32], got 0"),
    ("smoothgrad:n=2.5", "n must be an integer, got '2.5'"),
    ("smoothgrad:sigma=nan", "sigma must be in [0, 1], got nan"),
    ("smoothgrad:quantile=0.2", "quantile must be in [0.5, 1], got 0.2"),
    ("smoothgrad:n", "saliency parameter 'n' must be written key=value"),
    ("gradient:sigma=0.1", "gradient has no parameter 'sigma'; it takes rectify, quantile"),
    ("gradient:rectify=2", "rectify must be true or false, got '2'"),
])
def test_parse_rejects_bad_specs_naming_the_value(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_saliency(spec)


# --- gradient stays the paper's map ------------------------------------------------------------

def test_gradient_estimator_is_topk_saliency_bit_for_bit(photos):
    model = TinyCNN().eval().double()
    x = torch.stack(list(photos.values())).double()
    normalize = lambda t: (t - 0.5) / 0.25  # noqa: E731
    reference = topk_saliency(model, x, normalize)
    assert torch.equal(estimate_saliency(model, x, normalize, "gradient"), reference)
    assert torch.equal(estimate_saliency(model, x, normalize, "smoothgrad:n=1,sigma=0.3"), reference)


def test_hand_computed_gradient_and_smoothgrad_on_a_two_class_model():
    # L = CE(z, 0) + CE(z, 1) = 2 logsumexp(z) - z0 - z1, z = (u, -u): dL/du = 2 tanh(u), so S = 2 |tanh(x_r)|.
    x = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    x[0, :, 0, 0] = torch.tensor([0.3, 0.9, 0.1], dtype=torch.float64)
    model = TwoClass()
    plain = estimate_saliency(model, x, identity, "gradient", k=2)
    assert plain.shape == (1, 1, 1)
    assert plain.item() == pytest.approx(2 * math.tanh(0.3), rel=1e-12)
    config = parse_saliency("smoothgrad:n=3,sigma=0.5,seed=7")
    drawn = noise(config, (3, 1, 1), dtype=torch.float64)  # the two noisy copies
    expected = (2 * math.tanh(0.3) + sum(2 * abs(math.tanh(0.3 + float(d[0, 0, 0]))) for d in drawn)) / 3
    assert estimate_saliency(model, x, identity, config, k=2).item() == pytest.approx(expected, rel=1e-12)
    assert model.calls == 2  # one call each, the copies batched with the clean image


def test_noise_is_seeded_sigma_scaled_and_the_same_for_every_image():
    config = parse_saliency("smoothgrad:n=4,sigma=0.1,seed=3")
    first, second = noise(config, (3, 2, 2)), noise(config, (3, 2, 2))
    assert first.shape == (3, 3, 2, 2) and torch.equal(first, second)
    generator = torch.Generator().manual_seed(3)
    torch.testing.assert_close(first, torch.randn((3, 3, 2, 2), generator=generator) * 0.1, rtol=0, atol=0)


def test_average_copies_by_hand():
    per_row = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64).view(5, 1, 1)
    groups = torch.tensor([[0, 2, 3], [1, 4, 4]])
    assert average_copies(per_row, groups).flatten().tolist() == [13 / 3, 34 / 3]


def test_smoothgrad_map_does_not_depend_on_batch_mates(photos):
    model = TinyCNN().eval().double()
    x = torch.stack(list(photos.values())).double()
    configs = [parse_saliency(s) for s in ("smoothgrad:n=3", "gradient", "smoothgrad:n=5,sigma=0.1,rectify=true",
                                           "smoothgrad:n=3")]
    configs = (configs + [None]) * 2
    together = saliency_pass(model, x, identity, configs[: len(x)])
    for i, config in enumerate(configs[: len(x)]):
        alone = saliency_pass(model, x[i : i + 1], identity, [config])
        torch.testing.assert_close(alone.logits, together.logits[i : i + 1], rtol=1e-10, atol=1e-12)
        if config is None:
            assert together.saliency[i].abs().sum() == 0
        else:
            torch.testing.assert_close(alone.saliency[0], together.saliency[i], rtol=1e-9, atol=1e-12)


def test_smoothgrad_costs_one_model_call_and_no_weight_gradients(photos):
    model = TinyCNN().eval().requires_grad_(False)
    x = torch.stack(list(photos.values()))
    configs = [parse_saliency("smoothgrad:n=8")] * 4 + [parse_saliency("gradient"), None, None, None]
    result = saliency_pass(model, x, identity, configs)
    assert model.calls == 1 and result.logits.shape == (8, 10) and result.saliency.shape == (8, 32, 32)
    assert all(p.grad is None for p in model.parameters())


def test_logits_come_from_the_clean_images():
    model = TinyCNN().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    result = saliency_pass(model, x, identity, [parse_saliency("smoothgrad:n=6,sigma=0.5")] * 2)
    torch.testing.assert_close(result.logits, expected, rtol=1e-5, atol=1e-6)


# --- rectify -----------------------------------------------------------------------------------

def test_rectified_gate_by_hand():
    values = torch.tensor([[-1.0, 0.0, 3.0, 6.0, 7.0], [-1.0, 0.0, 3.0, 6.0, 7.0]])
    assert rectified_gate(values, 0.0, 6.0).tolist() == [[False, False, True, True, True]] * 2
    gate = rectified_gate(values, 0.0, 6.0, rows=torch.tensor([False, True]))
    assert gate.tolist() == [[False, False, True, False, False], [False, False, True, True, True]]


@pytest.mark.parametrize("inplace", [False, True])
def test_rectify_passes_the_gradient_above_the_clip_and_keeps_the_forward(inplace):
    # pre-activation 2 * 4 = 8 > 6: ReLU6 stops the gradient; rectified, dS/dx_r = 2 * 2 tanh(6).
    x = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    x[0, 0, 0, 0] = 4.0
    model = TwoClass(a=2.0, activation=nn.ReLU6(inplace=inplace))
    assert estimate_saliency(model, x, identity, "gradient", k=2).item() == 0.0
    rectified = estimate_saliency(model, x, identity, "gradient:rectify=true", k=2).item()
    assert rectified == pytest.approx(4 * math.tanh(6.0), rel=1e-12)
    assert model.activation.inplace is inplace  # restored
    assert not model.activation._forward_hooks


def test_rectify_leaves_logits_bit_identical_and_other_rows_exact(photos):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 4, 3, padding=1), nn.Hardtanh(-1, 1),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)).eval().requires_grad_(False)
    with torch.no_grad():
        model[0].weight.mul_(20)  # drive units into the clips
    x = torch.stack(list(photos.values())[:4])
    with torch.inference_mode():
        plain = model(x)
    with torch.enable_grad(), rectified_activations(model) as count:
        rectified = model(x.clone().requires_grad_(True))
    assert count == 2 and torch.equal(plain, rectified.detach())
    configs = [parse_saliency("gradient:rectify=true"), parse_saliency("gradient")] * 2
    mixed = saliency_pass(model, x, identity, configs)
    reference = saliency_pass(model, x, identity, [parse_saliency("gradient")] * 4)
    assert torch.equal(mixed.logits, reference.logits)
    assert torch.equal(mixed.saliency[1::2], reference.saliency[1::2])
    assert not torch.equal(mixed.saliency[0::2], reference.saliency[0::2])


def test_rectify_on_efficientnet_lite0_keeps_logits_bit_identical():
    from elgs.images import image_to_tensor, sample_photo
    from elgs.models import load_model

    model = load_model("efficientnet_lite0", device="cpu")
    x = image_to_tensor(sample_photo("chelsea"), 224)[None]
    with torch.inference_mode():
        plain = model.module(model.normalize(x))
    with torch.enable_grad(), rectified_activations(model.module) as count:
        rectified = model.module(model.normalize(x.clone().requires_grad_(True)))
    assert count > 0 and torch.equal(plain, rectified.detach())


# --- WLGS weights ------------------------------------------------------------------------------

def test_robust_normalize_by_hand():
    saliency = torch.arange(10, dtype=torch.float64).view(1, 1, 2, 5)
    # 0.9 quantile of 0..9: position 0.9 * 9 = 8.1 -> 8.1; weights S / 8.1 clamped to 1.
    expected = (torch.arange(10, dtype=torch.float64) / 8.1).clamp(max=1).view(1, 1, 2, 5)
    torch.testing.assert_close(robust_normalize(saliency, 0.9), expected, rtol=1e-12, atol=0)
    shifted = robust_normalize(saliency + 5, 0.5)  # min 5, median 9.5: (S - 5) / 4.5
    torch.testing.assert_close(shifted, ((saliency) / 4.5).clamp(max=1), rtol=1e-12, atol=0)
    assert robust_normalize(torch.full((1, 1, 3, 3), 2.0), 0.9).abs().sum() == 0


def test_robust_normalize_quantile_one_is_minmax_bit_for_bit_even_in_a_mixed_batch():
    saliency = torch.rand(3, 1, 17, 13)
    assert torch.equal(robust_normalize(saliency, 1.0), minmax_normalize(saliency))
    mixed = robust_normalize(saliency, torch.tensor([1.0, 0.9, 1.0]))
    assert torch.equal(mixed[0::2], minmax_normalize(saliency)[0::2])
    assert torch.equal(mixed[1], robust_normalize(saliency[1:2], 0.9)[0])
    assert mixed[1].max() == 1 and (mixed[1] == 1).float().mean() > 0.09


@pytest.mark.parametrize("quantile", [0.4, 1.5, float("nan")])
def test_robust_normalize_rejects_bad_quantiles(quantile):
    with pytest.raises(ValueError, match="quantile must be"):
        robust_normalize(torch.rand(1, 1, 4, 4), quantile)


def test_wlgs_mask_default_is_the_paper_weighting():
    xn = torch.randn(2, 3, 30, 30, dtype=torch.float64)
    saliency = torch.rand(2, 30, 30, dtype=torch.float64)
    from elgs.defenses import local_gradient_map

    expected = minmax_normalize(saliency.unsqueeze(1)) * local_gradient_map(xn)
    assert torch.equal(wlgs_mask(xn, saliency), expected)
    assert (wlgs_mask(xn, saliency, quantile=0.8) >= expected).all()


class _GatedClip(nn.Module):
    """Reference for rectify: the forward of a clip, the backward gated by :func:`rectified_gate` per row."""

    def __init__(self, min_val: float, max_val: float, rows: torch.Tensor | None) -> None:
        super().__init__()
        self.min_val, self.max_val, self.rows = min_val, max_val, rows

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        gate = rectified_gate(a.detach(), self.min_val, self.max_val, self.rows).to(a.dtype)
        return a * gate + (a.clamp(self.min_val, self.max_val) - a * gate).detach()


@pytest.mark.parametrize("rows", [None, [True, False, True]])
def test_rectified_backward_matches_the_gate_reference_in_float64(rows):
    torch.manual_seed(0)
    rows = None if rows is None else torch.tensor(rows)

    def network(first: nn.Module, second: nn.Module) -> nn.Sequential:
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), first, nn.Conv2d(6, 6, 3, padding=1), second,
                            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))
        with torch.no_grad():
            net[0].weight.mul_(15)  # drive units past both clips
        return net.double().eval().requires_grad_(False)

    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    hooked = network(nn.ReLU6(), nn.Hardtanh(-1.0, 1.0))
    reference = network(_GatedClip(0.0, 6.0, rows), _GatedClip(-1.0, 1.0, rows))

    def input_gradient(model: nn.Module, context) -> torch.Tensor:
        with torch.enable_grad(), context:
            xi = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(xi).logsumexp(1).sum(), xi)
        return grad

    got = input_gradient(hooked, rectified_activations(hooked, rows))
    expected = input_gradient(reference, contextlib.nullcontext())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    plain = input_gradient(hooked, contextlib.nullcontext())
    assert not torch.allclose(got, plain)  # the clips were hit: rectifying changed the gradient
