"""Patch training on the tiny CNN: through a defence, checkpoint and resume, the saved sidecar."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from elgs.attacks.data import predict_labels
from elgs.attacks.patches import patch_mask, square_mask
from elgs.attacks.through import constant_saliency, defend_differentiable, logits_through, resolve_saliency
from elgs.attacks.train import AttackConfig, PatchParameter, attack_loss, patched_batch, save_patch, train_patch
from elgs.engine import Engine, Request
from elgs.images import open_image


@pytest.fixture
def tiny_data(tiny_model, photos):
    images = torch.stack(list(photos.values()))
    return images, predict_labels(tiny_model, images)


def _config(**overrides) -> AttackConfig:
    settings = dict(attack="lavan", target=3, patch_size=8, image_size=32, epochs=2, batches_per_epoch=2,
                    batch_size=4, optimizer="adam", lr=0.2, seed=0)
    settings.update(overrides)
    return AttackConfig(**settings)


@pytest.mark.parametrize("method", ["lgs", "slgs", "wlgs"])
def test_differentiable_defence_equals_the_engine(tiny_model, photos, method):
    images = torch.stack(list(photos.values())[:4])
    results = Engine(tiny_model).run([Request(image=x, task="defend", method=method, lam=3.5) for x in images])
    ours = defend_differentiable(tiny_model, images, method, 3.5)
    assert torch.allclose(ours, torch.stack([r.image for r in results]), atol=1e-5)


@pytest.mark.parametrize("method", ["slgs", "wlgs"])
def test_training_path_uses_the_services_saliency_estimator(tiny_model, photos, method):
    """A model whose default estimator is smoothgrad: the attack sees the engine's saliency map and defended
    image, not the paper's gradient map."""
    model = dataclasses.replace(tiny_model, spec=dataclasses.replace(
        tiny_model.spec, default_saliency="smoothgrad:n=3,sigma=0.3,rectify=false,seed=0,quantile=0.9"))
    images = torch.stack(list(photos.values())[:4])
    results = Engine(model).run([Request(image=x, task="defend", method=method, lam=3.5) for x in images])
    assert {r.saliency_method for r in results} == {resolve_saliency(model).spec}
    served_maps = torch.stack([r.saliency for r in results])
    maps, quantile = constant_saliency(model, images)
    assert torch.allclose(maps, served_maps, rtol=1e-4, atol=1e-9)
    assert quantile.tolist() == pytest.approx([0.9] * 4)
    plain, _ = constant_saliency(model, images, "gradient")
    assert not torch.allclose(plain, served_maps, rtol=0.05)
    served = torch.stack([r.image for r in results])
    assert torch.allclose(defend_differentiable(model, images, method, 3.5), served, atol=1e-5)
    config = train_patch(model, (images, predict_labels(model, images)),
                         _config(through=method, epochs=1, batches_per_epoch=1), progress=False).config
    assert config.through_saliency == resolve_saliency(model).spec  # recorded in the sidecar


@pytest.mark.parametrize("method", ["lgs", "slgs", "wlgs"])
@pytest.mark.parametrize("attack", ["lavan", "patch"])
def test_training_through_a_defence_has_nonzero_gradients(tiny_model, tiny_data, method, attack):
    config = _config(attack=attack, through=method, placement="random")
    images, labels = tiny_data
    parameter = PatchParameter(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)), "sigmoid")
    patched = patched_batch(images, parameter.patch(), patch_mask(config.shape, 8), config,
                            torch.Generator().manual_seed(0))
    loss = attack_loss(logits_through(tiny_model, patched, method, 3.5), labels, config)
    loss.backward()
    grad = parameter.tensor.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.module.parameters())  # the model stays frozen


def test_gradient_flows_through_the_smoothing(tiny_model, tiny_data):
    images, labels = tiny_data
    config = _config()
    gradients = {}
    for through, lam in (("none", 0.0), ("lgs", 0.0), ("lgs", 3.5)):
        parameter = PatchParameter(torch.full((3, 8, 8), 0.3), "clamp")
        patched = patched_batch(images, parameter.patch(), square_mask(8), config, torch.Generator())
        logits = logits_through(tiny_model, patched, None if through == "none" else through, lam)
        attack_loss(logits, labels, config).backward()
        gradients[(through, lam)] = parameter.tensor.grad
    # lambda 0 is the identity, and so is its gradient; at lambda 3.5 the defence changes the gradient.
    assert torch.allclose(gradients[("lgs", 0.0)], gradients[("none", 0.0)], atol=1e-6)
    assert not torch.allclose(gradients[("lgs", 3.5)], gradients[("none", 0.0)], atol=1e-6)


def test_train_patch_lowers_the_loss_and_saves_patch_and_sidecar(tiny_model, tiny_data, tmp_path):
    result = train_patch(tiny_model, tiny_data, _config(epochs=3, batches_per_epoch=3), progress=False)
    assert result.patch.shape == (3, 8, 8) and 0 <= result.patch.min() and result.patch.max() <= 1
    assert torch.equal(result.patch, (result.patch * 255).round() / 255)  # what the PNG stores
    assert result.epoch_loss[-1] < result.epoch_loss[0]
    sidecar = save_patch(result, tmp_path / "p.png", tiny_model)
    record = json.loads(sidecar.read_text())
    assert {k: record[k] for k in ("attack", "shape", "model", "target", "patch_size", "epochs")} == {
        "attack": "lavan", "shape": "square", "model": "tiny", "target": 3, "patch_size": 8, "epochs": 3}
    assert record["epoch_loss"] == result.epoch_loss and 0 <= record["final_success_rate"] <= 1
    assert open_image(tmp_path / "p.png").size == (8, 8)


def test_resume_continues_where_the_checkpoint_stopped(tiny_model, tiny_data, tmp_path):
    config = _config(epochs=3, optimizer="sgd", lr=0.5, attack="patch", placement="random")
    uninterrupted = train_patch(tiny_model, tiny_data, config, progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, loss, success):
        if epoch == 0:
            raise Stop

    checkpoint = tmp_path / "runs" / "run.ckpt.pt"  # a folder that does not exist yet
    with pytest.raises(Stop):
        train_patch(tiny_model, tiny_data, config, checkpoint=checkpoint, progress=False, on_epoch=stop_after_first)
    resumed = train_patch(tiny_model, tiny_data, config, checkpoint=checkpoint, resume=True, progress=False)
    assert torch.equal(resumed.patch, uninterrupted.patch)
    assert resumed.epoch_loss == pytest.approx(uninterrupted.epoch_loss)
    with pytest.raises(ValueError, match="another run"):
        train_patch(tiny_model, tiny_data, _config(epochs=3, optimizer="sgd", lr=0.5, attack="patch", target=4,
                                                   placement="random"), checkpoint=checkpoint, resume=True,
                    progress=False)


def test_config_checks_name_the_bad_value():
    with pytest.raises(ValueError, match="slgs2"):
        _config(through="slgs2")
    with pytest.raises(ValueError, match="does not fit"):
        _config(patch_size=30)
    with pytest.raises(ValueError, match=r"through_lambda must be a number in \[0, 10\], got 11"):
        _config(through="lgs", through_lambda=11.0)
    with pytest.raises(ValueError, match="threshold .* got nan"):
        _config(threshold=float("nan"))
    assert _config(optimizer="sgd", lr=None).lr == 1.0 and _config(optimizer="sgd").parametrization == "clamp"


def test_initial_patch_from_an_image_or_seeded_noise():
    from elgs.attacks.train import initial_patch
    from elgs.images import image_to_tensor, sample_photo

    config = _config()
    assert torch.equal(initial_patch(config, "skimage:chelsea"), image_to_tensor(sample_photo("chelsea"), 8))
    assert torch.equal(initial_patch(config), initial_patch(_config()))
    assert not torch.equal(initial_patch(config), initial_patch(_config(seed=1)))
    # The sigmoid parametrisation starts from the same patch (up to the 1e-3 clamp of the logit).
    parameter = PatchParameter(initial_patch(config), "sigmoid")
    assert torch.allclose(parameter.patch(), initial_patch(config).clamp(1e-3, 1 - 1e-3), atol=1e-5)
