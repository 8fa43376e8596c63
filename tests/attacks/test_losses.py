"""Attack losses with values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from elgs.attacks.losses import lavan_loss, lavan_margin, target_cross_entropy, targeted_success

LOGITS = torch.tensor([[1.0, 3.0, 0.5],
                       [2.0, -1.0, 4.0]])


def test_lavan_margin_by_hand():
    # Target 1; sources 0 and 2: 3 - 1 = 2 and -1 - 4 = -5.
    assert torch.equal(lavan_margin(LOGITS, 1, torch.tensor([0, 2])), torch.tensor([2.0, -5.0]))
    assert torch.equal(lavan_margin(LOGITS, torch.tensor([2, 0]), torch.tensor([0, 2])), torch.tensor([-0.5, -2.0]))


def test_lavan_loss_is_minus_the_mean_margin():
    assert lavan_loss(LOGITS, 1, torch.tensor([0, 2])).item() == pytest.approx(1.5)  # -(2 - 5) / 2
    weight = torch.tensor([1.0, 0.0])  # the second image's true class is the target: left out
    assert lavan_loss(LOGITS, 1, torch.tensor([0, 2]), weight).item() == pytest.approx(-2.0)


def test_lavan_gradient_only_touches_target_and_source():
    logits = LOGITS.clone().requires_grad_(True)
    lavan_loss(logits, 1, torch.tensor([0, 2])).backward()
    assert torch.equal(logits.grad, torch.tensor([[0.5, -0.5, 0.0], [0.0, -0.5, 0.5]]))


def test_target_cross_entropy_by_hand():
    assert target_cross_entropy(torch.zeros(1, 2), 0).item() == pytest.approx(math.log(2))
    # Row 0, target 1: -log(e^3 / (e + e^3 + e^0.5)); row 1, target 1: -log(e^-1 / (e^2 + e^-1 + e^4)).
    row0 = -(3 - math.log(math.e + math.e**3 + math.e**0.5))
    row1 = -(-1 - math.log(math.e**2 + math.e**-1 + math.e**4))
    assert target_cross_entropy(LOGITS, 1).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert target_cross_entropy(LOGITS, 1, torch.tensor([0.0, 1.0])).item() == pytest.approx(row1, rel=1e-6)


def test_targeted_success():
    assert targeted_success(LOGITS, 1).tolist() == [True, False]
    assert targeted_success(LOGITS, torch.tensor([1, 2])).tolist() == [True, True]


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match=r"\(3,\)"):
        lavan_margin(torch.zeros(3), 1, torch.tensor([0]))
    with pytest.raises(ValueError, match="7"):
        target_cross_entropy(LOGITS, 7)
