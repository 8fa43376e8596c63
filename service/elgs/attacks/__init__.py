"""Patch attacks and their evaluation: LaVAN and Adversarial Patch training, patch application,
white-box training through a defence, and the paper's accuracy tables (design.md, section 7).

Depends on ``elgs.models``, ``elgs.defenses`` and ``elgs.engine`` only.
"""

from elgs.attacks.losses import lavan_loss, lavan_margin, target_cross_entropy, targeted_success
from elgs.attacks.patches import (
    apply_patch,
    circle_mask,
    eot_apply_patch,
    patch_mask,
    random_positions,
    random_transforms,
    square_mask,
    top_right_position,
)
from elgs.attacks.schedule import paper_lr, paper_scheduler, scaled_milestones

__all__ = [
    "apply_patch", "circle_mask", "eot_apply_patch", "lavan_loss", "lavan_margin", "paper_lr", "paper_scheduler",
    "patch_mask", "random_positions", "random_transforms", "scaled_milestones", "square_mask",
    "target_cross_entropy", "targeted_success", "top_right_position",
]
