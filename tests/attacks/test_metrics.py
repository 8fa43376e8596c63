"""AUROC of the attack score: hand-computed cases, ties, and agreement with a pairwise count."""

import pytest
import torch

from elgs.attacks.metrics import auroc, average_ranks


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([0.3, 0.1, 0.3, 0.7])).tolist() == [2.5, 1.0, 2.5, 4.0]
    assert average_ranks(torch.tensor([2.0, 2.0, 2.0])).tolist() == [2.0, 2.0, 2.0]


def test_auroc_hand_computed_with_a_tie():
    # pairs (positive, negative): 0.8 beats all three (3); 0.4 beats 0.1 and 0.35 and ties 0.4 (2.5) -> 5.5 / 6
    assert auroc(torch.tensor([0.1, 0.4, 0.35]), torch.tensor([0.8, 0.4])) == pytest.approx(5.5 / 6)


def test_auroc_extremes_and_chance():
    assert auroc(torch.tensor([0.0, 0.1]), torch.tensor([0.5, 2.0])) == 1.0
    assert auroc(torch.tensor([0.5, 2.0]), torch.tensor([0.0, 0.1])) == 0.0
    assert auroc(torch.zeros(7), torch.zeros(3)) == 0.5  # a constant score (e.g. no defence) separates nothing


def test_auroc_matches_the_pairwise_definition():
    generator = torch.Generator().manual_seed(0)
    negatives = torch.randint(0, 6, (40,), generator=generator).float() / 5  # many ties
    positives = torch.randint(2, 9, (25,), generator=generator).float() / 5
    difference = positives[:, None] - negatives[None, :]
    pairwise = float(((difference > 0).double() + 0.5 * (difference == 0).double()).mean())
    assert auroc(negatives, positives) == pytest.approx(pairwise, abs=1e-12)


def test_auroc_rejects_empty_and_non_finite_scores():
    with pytest.raises(ValueError, match="0 positives"):
        auroc(torch.tensor([0.1]), torch.tensor([]))
    with pytest.raises(ValueError, match="nan"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0.2]))
