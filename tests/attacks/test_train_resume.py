"""``attack train --resume`` refuses a checkpoint written with any other training setting (issue 11)."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from elgs.attacks.data import predict_labels
from elgs.attacks.train import AttackConfig, train_patch

BASE = dict(attack="patch", target=3, patch_size=8, image_size=32, epochs=2, batches_per_epoch=1, batch_size=4,
            optimizer="sgd", lr=0.5, placement="random", seed=0)
# One changed value per setting; each changes what training computes.
CHANGED = {"momentum": 0.5, "through": "lgs", "through_lambda": 2.0, "threshold": 0.3, "scale_range": (0.9, 1.1),
           "max_rotation_deg": 10.0, "target": 4, "epochs": 3, "lr": 0.25, "seed": 1, "parametrization": "sigmoid"}


@pytest.fixture
def checkpoint(tiny_model, photos, tmp_path):
    images = torch.stack(list(photos.values()))
    data = images, predict_labels(tiny_model, images)

    class Stop(Exception):
        pass

    def stop(epoch, loss, success):
        raise Stop

    path = tmp_path / "run.ckpt.pt"
    with pytest.raises(Stop):
        train_patch(tiny_model, data, AttackConfig(**BASE), checkpoint=path, progress=False, on_epoch=stop)
    return path, data


def test_every_setting_is_compared():
    assert set(AttackConfig(**BASE).identity()) == {field.name for field in fields(AttackConfig)}


@pytest.mark.parametrize("name", list(CHANGED))
def test_resume_refuses_a_checkpoint_of_other_settings(tiny_model, checkpoint, name):
    path, data = checkpoint
    with pytest.raises(ValueError, match=f"another run.*'{name}'"):
        train_patch(tiny_model, data, AttackConfig(**{**BASE, name: CHANGED[name]}), checkpoint=path, resume=True,
                    progress=False)
    resumed = train_patch(tiny_model, data, AttackConfig(**BASE), checkpoint=path, resume=True, progress=False)
    assert len(resumed.epoch_loss) == BASE["epochs"]
