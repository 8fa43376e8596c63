"""The paper's lr schedule scaled to the number of epochs."""

from __future__ import annotations

import pytest
import torch

from elgs.attacks.schedule import paper_lr, paper_scheduler, scaled_milestones


def test_milestones_scale_with_epochs():
    assert scaled_milestones(200) == (160, 180)
    assert scaled_milestones(10) == (8, 9)
    assert scaled_milestones(20) == (16, 18)
    assert scaled_milestones(1) == (1, 1)  # a single epoch runs at lr 1 throughout
    assert scaled_milestones(2) == (2, 2)
    assert scaled_milestones(5) == (3, 4)  # every stage keeps an epoch: 1, 1, 1, 0.1, 0.01
    assert scaled_milestones(3) == (1, 2)
    assert scaled_milestones(25) == (20, 23)  # 22.5 rounds half up
    with pytest.raises(ValueError, match="0"):
        scaled_milestones(0)


def test_paper_lr_over_200_epochs():
    assert [paper_lr(e, 200) for e in (0, 159, 160, 179, 180, 199)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert paper_lr(9, 10, base_lr=0.5) == pytest.approx(0.005)


def test_scheduler_steps_per_epoch():
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=1.0, momentum=0.9)
    scheduler = paper_scheduler(optimizer, 10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1.0] * 8 + [0.1, 0.01])
